"""Large-batch training of a small byte-level GPT on GCIDE: AdamW, LAMB and K-FAC at equal tokens.

Every run sees the same number of training tokens (``base_steps`` steps of the baseline batch), so a
batch ``k`` times larger takes ``k`` times fewer steps. Each method gets a small LR grid per batch
size; the best LR (lowest final validation loss, seed 0) is rerun with seed 1 ("the chosen point").
The schedule is the same shape for every run: linear warmup over the first 10% of the steps, then
cosine decay to 10% of the peak LR.

Methods:

* ``adamw``: AdamW, betas (0.9, 0.95), weight decay 0.1 on matrices and embeddings (the baseline);
* ``lamb``: :class:`lightning_lbo.LAMB` with the same decay split (no trust ratio on biases/norms);
* ``kfac``: :class:`lightning_lbo.KFAC`, its momentum form (momentum 0.9, MC Fisher, damping 1e-3,
  weight decay 1e-4, no KL clipping);
* ``kfac_adam``: :class:`KFACPreconditioner` in front of AdamW (the same AdamW as the baseline).

K-FAC refreshes factors and inverses every ``10 // multiplier`` steps (every step at 16x) and
preconditions every weight of the GPT (embeddings, attention, feed-forward, LayerNorm, head).

Each unit of work (one run, or the side-by-side timing) holds the shared benchmark lock
(:mod:`benchmarks.bench_lock`) and writes one JSON file under ``benchmarks/results/lm/runs``; a run
whose file exists is skipped, so the study resumes where it stopped. ``--report`` writes
``results.csv``, ``goals.md`` and the plots from whatever runs exist.

Usage::

    python benchmarks/lm_large_batch.py --phase priority  # the order used on the shared machine
    python benchmarks/lm_large_batch.py --phase grid      # LR grids, most informative cells first
    python benchmarks/lm_large_batch.py --phase seeds     # seed 1 at each chosen LR
    python benchmarks/lm_large_batch.py --phase timing    # K-FAC / AdamW step time, side by side
    python benchmarks/lm_large_batch.py --phase timing --interval 10  # ... refreshing every 10 steps
    python benchmarks/lm_large_batch.py --phase variants  # K-FAC at 16x: longer warmup, more damping, ...
    python benchmarks/lm_large_batch.py --phase coverage  # share of parameters K-FAC preconditions
    python benchmarks/lm_large_batch.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_lock import bench_lock  # noqa: E402
from lightning_lbo.lm import GPT, next_token_loss  # noqa: E402
from lightning_lbo.optim.kfac import KFAC, KFACPreconditioner  # noqa: E402
from lightning_lbo.optim.lamb import LAMB  # noqa: E402
from lightning_lbo.param_groups import param_groups  # noqa: E402
from lightning_lbo.schedules import cosine, lambda_lr, warmup_then  # noqa: E402
from lightning_lbo.text import ByteSequenceDataset, load_gcide_splits  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "lm"
RUNS = OUT / "runs"
# classes_last=False: logits [N, V, T], so K-FAC's MC Fisher samples from the forward's own output.
MODEL = dict(vocab_size=256, seq_len=64, d_model=64, n_heads=4, n_layers=2, classes_last=False)
BASE_BATCH, BASE_STEPS = 32, 1024
MULTIPLIERS = (1, 4, 16)
WEIGHT_DECAY = 0.1
VAL_SEQUENCES = 256
EVALS = 16  # validation points per run, evenly spaced in tokens

# LR grids per (method, batch multiplier), grown past an edge by phase_grid. The 4x grids (two points,
# run without growth to fit the shared machine) were set after the 1x and 16x grids, near their chosen LRs.
GRIDS: dict[str, dict[int, tuple[float, ...]]] = {
    "adamw": {1: (1e-3, 2e-3, 4e-3), 4: (4e-3, 8e-3), 16: (4e-3, 8e-3, 1.6e-2)},
    "lamb": {1: (2e-3, 5e-3, 1e-2), 4: (4e-2, 8e-2), 16: (1e-2, 2e-2, 4e-2)},
    "kfac": {1: (0.05, 0.1, 0.2), 4: (0.025, 0.05), 16: (0.1, 0.2, 0.4)},  # 4x: 0.05 diverged, 0.1 not run
    "kfac_adam": {1: (1e-3, 2e-3, 4e-3), 4: (4e-3, 8e-3), 16: (4e-3, 8e-3, 1.6e-2)},
}
# Cells in the order they are run: the 16x comparison and its baseline first, then the middle batch.
ORDER = [("adamw", 1), ("adamw", 16), ("lamb", 16), ("kfac", 16), ("kfac_adam", 16),
         ("adamw", 4), ("lamb", 4), ("kfac", 4), ("kfac_adam", 4), ("kfac", 1), ("lamb", 1), ("kfac_adam", 1)]
KFAC_DAMPING = 1e-3
WARMUP_FRACTION = 0.1
MAX_EXTENSIONS = 3  # how far a grid may grow past its edge (x2 or /2 per step)
# Variants of K-FAC, run with seed 0 (at 16x: at a method's chosen LR) and compared on validation loss only.
VARIANTS: dict[str, dict[str, float]] = {
    "warmup25": {"warmup_fraction": 0.25},  # 16 of 64 steps of warmup instead of 6
    "damping1e-2": {"damping": 1e-2},
    "refresh1": {"refresh_interval": 1},  # factors and inverses every step at any batch
}


def refresh_interval(multiplier: int) -> int:
    """Steps between K-FAC factor/inverse refreshes: every step at 16x, every 10 steps at the baseline."""
    return max(1, 10 // multiplier)


def build_optimizer(method: str, model: torch.nn.Module, lr: float, multiplier: int, *,
                    damping: float = KFAC_DAMPING, interval: int | None = None
                    ) -> tuple[torch.optim.Optimizer, KFACPreconditioner | None]:
    """The optimizer of ``method`` (and the preconditioner in front of it, for ``kfac_adam``).

    ``interval`` overrides K-FAC's refresh interval (default: :func:`refresh_interval` of the multiplier).
    """
    groups = param_groups(model, WEIGHT_DECAY)
    interval = interval or refresh_interval(multiplier)
    kfac_kwargs = dict(damping=damping, fisher="mc",
                       factor_update_interval=interval, inverse_update_interval=interval)
    if method == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95)), None
    if method == "lamb":
        return LAMB(groups, lr=lr, betas=(0.9, 0.95)), None
    if method == "kfac":
        # kl_clip off: in a 16-step probe at batch 512 (lr 0.2) the default kl_clip=1e-3 bound every step
        # (validation loss 4.01 after 16 steps; 1e-2: 3.39; off: 2.97), which makes the LR grid moot.
        return KFAC(model, lr=lr, momentum=0.9, weight_decay=1e-4, kl_clip=None, **kfac_kwargs), None
    if method == "kfac_adam":
        pre = KFACPreconditioner(model, kl_clip=None, **kfac_kwargs)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95)), pre
    raise ValueError(f"Invalid method: {method!r}. Supported: {tuple(GRIDS)}.")


def preconditioned_share(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         pre: KFACPreconditioner | None) -> dict[str, Any]:
    """Fraction of parameters (by count) inside a K-FAC block, and the names of the others."""
    pre = pre or getattr(optimizer, "preconditioner", None)
    if pre is None:
        return {}
    covered = {id(p) for st in pre.states for p in st.block.params} if hasattr(pre, "states") else set()
    if not covered and hasattr(pre, "blocks"):
        covered = {id(p) for b in pre.blocks for p in b.params}
    total = sum(p.numel() for p in model.parameters())
    rest = [n for n, p in model.named_parameters() if id(p) not in covered]
    share = sum(p.numel() for p in model.parameters() if id(p) in covered) / total
    return {"preconditioned_fraction": share, "not_preconditioned": rest}


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = val
    losses = [next_token_loss(model(x[i:i + 128]), y[i:i + 128], classes_last=False)
              for i in range(0, x.shape[0], 128)]
    model.train()
    return float(torch.stack(losses).mean())


def run_name(method: str, multiplier: int, lr: float, seed: int, variant: str | None = None) -> str:
    return f"{method}-b{BASE_BATCH * multiplier}-lr{lr:g}-s{seed}" + (f"-{variant}" if variant else "")


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "malloc": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
            "loadavg_1m": os.getloadavg()[0]}


def train_run(method: str, multiplier: int, lr: float, seed: int, train: ByteSequenceDataset,
              val: tuple[torch.Tensor, torch.Tensor], variant: str | None = None) -> dict[str, Any]:
    """One training run at equal tokens; returns the record written to its JSON file."""
    batch = BASE_BATCH * multiplier
    steps = BASE_STEPS // multiplier
    settings = {"warmup_fraction": WARMUP_FRACTION, "damping": KFAC_DAMPING,
                "refresh_interval": refresh_interval(multiplier), **VARIANTS.get(variant or "", {})}
    torch.manual_seed(seed)
    model = GPT(**MODEL)
    optimizer, pre = build_optimizer(method, model, lr, multiplier, damping=settings["damping"],
                                     interval=int(settings["refresh_interval"]))
    warmup = max(1, int(steps * settings["warmup_fraction"]))
    scheduler = lambda_lr(optimizer, warmup_then(cosine(steps - warmup, end_factor=0.1), warmup, start_factor=0.0))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    eval_every = max(1, steps // EVALS)
    history = [(0, 0, evaluate(model, val))]
    step_times, nonfinite = [], 0
    start_load, start_time = os.getloadavg()[0], time.perf_counter()
    for step in range(steps):
        idx = order[(step * batch) % len(order): (step * batch) % len(order) + batch].tolist()
        x, y = train.__getitems__(idx)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss(model(x), y, classes_last=False)
        # The loop's only sync (the CPU runs synchronously anyway). A non-finite loss skips the update:
        # K-FAC's MC Fisher cannot sample labels from non-finite logits, and the run counts as diverged.
        if not math.isfinite(loss.item()):
            nonfinite += 1
            scheduler.step()
            if nonfinite > 3:
                break
            continue
        loss.backward()
        if pre is not None:
            pre.step(lr=optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        step_times.append(time.perf_counter() - t0)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            history.append((step + 1, (step + 1) * batch * MODEL["seq_len"], evaluate(model, val)))
    return {"method": method, "multiplier": multiplier, "batch": batch, "lr": lr, "seed": seed, "steps": steps,
            "variant": variant, "warmup_steps": warmup,
            "tokens": steps * batch * MODEL["seq_len"], "model": MODEL, "weight_decay": WEIGHT_DECAY,
            "kfac_damping": settings["damping"] if method.startswith("kfac") else None,
            "kfac_refresh_interval": settings["refresh_interval"] if method.startswith("kfac") else None,
            "kfac_kl_clip": None, "commit": _commit(),
            "final_val_loss": history[-1][2] if nonfinite <= 3 else float("nan"), "history": history,
            "median_step_s": statistics.median(step_times) if step_times else float("nan"),
            "wall_s": time.perf_counter() - start_time,
            "diverged": nonfinite > 3,
            **preconditioned_share(model, optimizer, pre),
            "machine": machine(), "loadavg_1m_start": start_load}


def load_data(val_sequences: int = VAL_SEQUENCES) -> tuple[ByteSequenceDataset, tuple[torch.Tensor, torch.Tensor]]:
    train_tokens, val_tokens = load_gcide_splits()
    train = ByteSequenceDataset(train_tokens, MODEL["seq_len"])
    val_set = ByteSequenceDataset(val_tokens, MODEL["seq_len"])
    # A fixed validation sample spread over the whole held-out text (every letter of the alphabet).
    idx = torch.linspace(0, len(val_set) - 1, val_sequences).long().tolist()
    return train, val_set.__getitems__(idx)


def load_runs() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def diverged(run: dict[str, Any]) -> bool:
    """A run whose loss went non-finite, or whose final validation loss is above its initial one."""
    history = run["history"]
    return run["diverged"] or not history[-1][2] < history[0][2]


def loss_text(run: dict[str, Any]) -> str:
    return "diverged" if diverged(run) else f"{run['final_val_loss']:.4f}"


def best_lr(runs: list[dict[str, Any]], method: str, multiplier: int) -> float | None:
    cell = [r for r in runs if r["method"] == method and r["multiplier"] == multiplier and r["seed"] == 0
            and r.get("variant") is None and not diverged(r)]
    return min(cell, key=lambda r: r["final_val_loss"])["lr"] if cell else None


def do_run(method: str, multiplier: int, lr: float, seed: int, data, variant: str | None = None) -> None:
    path = RUNS / f"{run_name(method, multiplier, lr, seed, variant)}.json"
    if path.exists():
        return
    with bench_lock():
        record = train_run(method, multiplier, lr, seed, *data, variant=variant)
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"{path.name}: final val loss {record['final_val_loss']:.4f}, {record['median_step_s'] * 1e3:.0f} ms/step",
          flush=True)


def grid_edge_step(runs: list[dict[str, Any]], method: str, multiplier: int) -> float | None:
    """The next LR to try when a cell's best LR (seed 0) sits on the edge of the LRs tried, else None.

    A diverged run counts as tried, so a grid never grows past an LR that diverged.
    """
    tried = sorted(r["lr"] for r in runs if r["method"] == method and r["multiplier"] == multiplier
                   and r["seed"] == 0 and r.get("variant") is None)
    best = best_lr(runs, method, multiplier)
    if best is None or len(tried) < 2:
        return None
    if best == tried[-1]:
        return best * 2
    if best == tried[0]:
        return best / 2
    return None


def phase_grid(data, cells, max_extensions: int = MAX_EXTENSIONS) -> None:
    for method, multiplier in cells:
        for lr in GRIDS[method][multiplier]:
            do_run(method, multiplier, lr, 0, data)
        # Grow the grid outwards (x2 or /2) while the best LR sits on its edge.
        for _ in range(max_extensions):
            lr = grid_edge_step(load_runs(), method, multiplier)
            if lr is None:
                break
            do_run(method, multiplier, lr, 0, data)


def phase_variants(data, methods=("kfac", "kfac_adam"), variants=tuple(VARIANTS), multiplier: int = 16) -> None:
    """Each K-FAC variant at the method's chosen LR (seed 0)."""
    for method in methods:
        lr = best_lr(load_runs(), method, multiplier)
        for variant in variants if lr is not None else ():
            do_run(method, multiplier, lr, 0, data, variant)


def phase_priority(data) -> None:
    """The study on a busy shared machine: each method's central LR at 16x first, the step-time ratio,
    the baseline's grid, the side LRs at 16x, seed 1 at the chosen points, then the middle batch (4x)."""
    big = ("adamw", "kfac", "kfac_adam", "lamb")
    for method in big:
        do_run(method, 16, GRIDS[method][16][1], 0, data)
    if not (OUT / "timing-b512.json").exists():
        phase_timing(16, repeats=6)
    for lr in GRIDS["adamw"][1]:
        do_run("adamw", 1, lr, 0, data)
    for method in big:
        for lr in (GRIDS[method][16][2], GRIDS[method][16][0]):
            do_run(method, 16, lr, 0, data)
    phase_seeds(data, [("adamw", 1)] + [(m, 16) for m in big])
    phase_grid(data, [(m, 4) for m in big])


def phase_seeds(data, cells) -> None:
    for method, multiplier in cells:
        lr = best_lr(load_runs(), method, multiplier)
        if lr is not None:
            do_run(method, multiplier, lr, 1, data)


def phase_timing(multiplier: int = 16, repeats: int = 12, interval: int | None = None,
                 methods: tuple[str, ...] = ("adamw", "lamb", "kfac", "kfac_adam")) -> None:
    """K-FAC (both forms) and LAMB step time over AdamW's, interleaved in one process on the same batch.

    With the refresh every step the statistic is the median step; with a longer ``interval`` (refresh
    steps cost more than the others) it is the mean over ``repeats`` steps, a whole number of intervals.
    """
    interval = interval or refresh_interval(multiplier)
    if repeats % interval:
        raise ValueError(f"Invalid repeats: {repeats}; use a multiple of the refresh interval {interval}.")
    suffix = "" if interval == refresh_interval(multiplier) else f"-refresh{interval}"
    path = OUT / f"timing-b{BASE_BATCH * multiplier}{suffix}.json"
    batch = BASE_BATCH * multiplier
    x = torch.randint(0, 256, (batch, MODEL["seq_len"]), generator=torch.Generator().manual_seed(0))
    with bench_lock(exclusive=True):
        setups = {}
        for method in methods:
            torch.manual_seed(0)
            model = GPT(**MODEL)
            setups[method] = (model, *build_optimizer(method, model, 1e-3, multiplier, interval=interval))
        times = {m: [] for m in setups}
        for rep in range(repeats + 2):
            for method, (model, opt, pre) in setups.items():
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                next_token_loss(model(x), x, classes_last=False).backward()
                if pre is not None:
                    pre.step(lr=1e-3)
                opt.step()
                if rep >= 2:  # the first two steps build factors and inverses for the first time
                    times[method].append(time.perf_counter() - t0)
    statistic = "median" if interval == 1 else "mean"
    summary = {m: (statistics.median if interval == 1 else statistics.mean)(t) for m, t in times.items()}
    record = {"batch": batch, "refresh_interval": interval, "repeats": repeats, "statistic": statistic,
              f"{statistic}_step_s": summary, "ratio_to_adamw": {m: summary[m] / summary["adamw"] for m in summary},
              "machine": machine()}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record["ratio_to_adamw"]), flush=True)


def phase_coverage() -> None:
    """Parameters inside a K-FAC block, for Lightning's demo Transformer and for the benchmark GPT."""
    import warnings

    from lightning.pytorch.demos import Transformer

    record = {}
    for name, model in (("lightning.pytorch.demos.Transformer()", Transformer()), ("benchmark GPT", GPT(**MODEL))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pre = KFACPreconditioner(model, fisher="empirical")
        record[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                        "blocks": sorted({type(b).__name__ for b in pre.blocks}),
                        **preconditioned_share(model, torch.optim.SGD(model.parameters(), lr=0.0), pre)}
        pre.remove_hooks()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "coverage.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1), flush=True)


def chosen(runs: list[dict[str, Any]], method: str, multiplier: int) -> list[dict[str, Any]]:
    """The runs (all seeds) at the chosen LR of a cell."""
    lr = best_lr(runs, method, multiplier)
    return [r for r in runs if r["method"] == method and r["multiplier"] == multiplier and r["lr"] == lr
            and r.get("variant") is None]


def steps_to_reach(run: dict[str, Any], target: float) -> float | None:
    """First step at which the validation loss is <= target (linear between evaluations), else None."""
    history = run["history"]
    for (s0, _, l0), (s1, _, l1) in zip(history, history[1:], strict=False):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def write_report(runs: list[dict[str, Any]]) -> None:
    """results.csv (one line per run), goals.md (the issue's goal table) and two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    header = "method,batch,lr,seed,steps,tokens,final_val_loss,median_step_ms,preconditioned_fraction,loadavg_1m"
    lines = [header] + [
        f"{r['method']},{r['batch']},{r['lr']:g},{r['seed']},{r['steps']},{r['tokens']},{r['final_val_loss']:.4f},"
        f"{r['median_step_s'] * 1e3:.1f},{r.get('preconditioned_fraction', '')},{r['machine']['loadavg_1m']:.1f}"
        for r in sorted(runs, key=lambda r: (r["method"], r["batch"], r["lr"], r["seed"]))]
    (OUT / "results.csv").write_text("\n".join(lines) + "\n")

    def mean_final(cell: list[dict[str, Any]]) -> float:
        return statistics.mean(r["final_val_loss"] for r in cell)

    fig, (ax_b, ax_s, ax_t) = plt.subplots(1, 3, figsize=(17, 4.5))
    colors = {"adamw": "C0", "lamb": "C1", "kfac": "C2", "kfac_adam": "C3"}
    for method in GRIDS:
        points = [(BASE_BATCH * k, mean_final(chosen(runs, method, k))) for k in MULTIPLIERS if chosen(runs, method, k)]
        if points:
            ax_b.plot(*zip(*points, strict=True), "o-", color=colors[method], label=f"{method} (mean; x: each seed)")
            seeds = [(r["batch"], r["final_val_loss"]) for k in MULTIPLIERS for r in chosen(runs, method, k)]
            ax_b.plot(*zip(*seeds, strict=True), "x", color=colors[method], alpha=0.6)
        for k, style in zip(MULTIPLIERS, (":", "--", "-"), strict=True):
            for r in chosen(runs, method, k)[:1]:
                steps, tokens, losses = zip(*r["history"][1:], strict=True)  # step 0 has no place on a log axis
                label = f"{method} b{r['batch']} lr{r['lr']:g}"
                ax_s.plot(steps, losses, style, color=colors[method], label=label)
                ax_t.plot([t / 1e6 for t in tokens], losses, style, color=colors[method], label=label)
    ax_b.set(xscale="log", xlabel="batch (sequences of 64 bytes)", ylabel="final validation loss (nats/byte)",
             title=f"Equal tokens ({BASE_BATCH * BASE_STEPS * MODEL['seq_len'] / 1e6:.1f}M), best LR per cell")
    ax_b.set_xticks([BASE_BATCH * k for k in MULTIPLIERS], [str(BASE_BATCH * k) for k in MULTIPLIERS])
    ax_b.minorticks_off()
    ax_s.set(xscale="log", xlabel="optimizer step", ylabel="validation loss", title="Validation loss vs steps (seed 0)",
             ylim=(None, 3.5))
    ax_t.set(xlabel="training tokens (millions)", ylabel="validation loss", title="Validation loss vs tokens (seed 0)",
             ylim=(None, 3.5))
    for ax in (ax_b, ax_s, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "val_loss.png", dpi=120)
    plt.close(fig)

    base = chosen(runs, "adamw", 1)
    out = ["# LM large-batch goals (generated by `python benchmarks/lm_large_batch.py --report`)", ""]
    if not base:
        out.append("No baseline run yet.")
    else:
        target = mean_final(base)
        out += [f"Baseline: AdamW, batch {BASE_BATCH}, lr {base[0]['lr']:g}, final validation loss "
                f"{target:.4f} (mean of {len(base)} seed(s)).", "",
                "| method | batch | chosen lr | seeds | final val loss: mean (per seed) | vs baseline | "
                "steps to baseline loss | steps to AdamW's final loss at this batch (share of the run) |",
                "|---|---|---|---|---|---|---|---|"]

        def reach_text(cell: list[dict[str, Any]], loss: float) -> str:
            total = cell[0]["steps"]
            reach = [steps_to_reach(r, loss) for r in cell]
            return ", ".join(f"{s:.0f} ({s / total:.2f}x)" if s is not None else "not reached" for s in reach) + \
                f" of {total}"

        best_gap = {}
        for k in MULTIPLIERS:
            adamw = chosen(runs, "adamw", k)
            for method in GRIDS:
                cell = chosen(runs, method, k)
                if not cell:
                    continue
                final = mean_final(cell)
                if k > 1 and final < best_gap.get(k, (None, math.inf))[1]:
                    best_gap[k] = (method, final)
                seeds = ", ".join(f"{r['final_val_loss']:.4f}" for r in sorted(cell, key=lambda r: r["seed"]))
                same_batch = reach_text(cell, mean_final(adamw)) if adamw else "no AdamW run"
                out.append(f"| {method} | {BASE_BATCH * k} | {cell[0]['lr']:g} | {len(cell)} | {final:.4f} ({seeds}) | "
                           f"{100 * (final / target - 1):+.1f}% | {reach_text(cell, target)} | {same_batch} |")
        out += [""] + [f"Best at batch {BASE_BATCH * k}: {m}, {100 * (f / target - 1):+.1f}% over the baseline."
                       for k, (m, f) in sorted(best_gap.items())]
        out += ["", "LR grids (seed 0, final validation loss; * chosen):", ""]
        for k in MULTIPLIERS:
            for method in GRIDS:
                cell = sorted((r for r in runs if r["method"] == method and r["multiplier"] == k and r["seed"] == 0
                               and r.get("variant") is None), key=lambda r: r["lr"])
                if cell:
                    best = best_lr(runs, method, k)
                    points = ", ".join(f"{r['lr']:g}: {loss_text(r)}{'*' if r['lr'] == best else ''}" for r in cell)
                    out.append(f"* {method}, batch {BASE_BATCH * k}: {points}")
    variants = [r for r in runs if r.get("variant")]
    if variants:
        out += ["", "K-FAC variants (seed 0), against the same run without the variant:", "",
                "| method | batch | lr | variant | final val loss | without | difference |",
                "|---|---|---|---|---|---|---|"]
        for r in sorted(variants, key=lambda r: (r["method"], r["batch"], r["variant"])):
            plain = [q for q in runs if q.get("variant") is None and all(
                q[key] == r[key] for key in ("method", "multiplier", "lr", "seed"))]
            ref = loss_text(plain[0]) if plain else "no run"
            diff = f"{r['final_val_loss'] - plain[0]['final_val_loss']:+.4f}" if plain and not (
                diverged(r) or diverged(plain[0])) else ""
            out.append(f"| {r['method']} | {r['batch']} | {r['lr']:g} | {r['variant']} "
                       f"({VARIANTS[r['variant']]}) | {loss_text(r)} | {ref} | {diff} |")
    timing = sorted(OUT.glob("timing-*.json"))
    for path in timing:
        t = json.loads(path.read_text())
        ratios = ", ".join(f"{m} {v:.2f}x" for m, v in t["ratio_to_adamw"].items())
        out += ["", f"Step time / AdamW step time at batch {t['batch']} (same process, interleaved, "
                f"{t.get('statistic', 'median')} of {t['repeats']}; K-FAC refresh every {t['refresh_interval']} "
                f"step(s)): {ratios}."]
    (OUT / "goals.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=("priority", "grid", "seeds", "timing", "variants", "coverage", "all"),
                        default=None)
    parser.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS,
                        help="grid: how many points an LR grid may grow past its edge")
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=tuple(VARIANTS),
                        help="variants: which to run")
    parser.add_argument("--interval", type=int, default=None,
                        help="timing: K-FAC refresh interval (default: the study's, every step at 16x)")
    parser.add_argument("--methods", nargs="*", default=None, help="restrict to these methods")
    parser.add_argument("--multipliers", nargs="*", type=int, default=None, help="restrict to these batch multipliers")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (on the oversubscribed shared 2-core machine 2 ran 10x slower)")
    parser.add_argument("--report", action="store_true", help="write results.csv, goals.md and plots")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = [(m, k) for m, k in ORDER if (args.methods is None or m in args.methods)
             and (args.multipliers is None or k in args.multipliers)]
    if args.phase == "priority":
        phase_priority(load_data())
    if args.phase in ("grid", "all"):
        phase_grid(load_data(), cells, args.max_extensions)
    if args.phase in ("seeds", "all"):
        phase_seeds(load_data(), cells)
    if args.phase in ("timing", "all"):
        if args.interval:
            phase_timing(repeats=2 * args.interval, interval=args.interval, methods=("adamw", "kfac", "kfac_adam"))
        else:
            phase_timing()
    if args.phase in ("variants", "all"):
        phase_variants(load_data(), [m for m in ("kfac", "kfac_adam") if args.methods is None or m in args.methods],
                       args.variants)
    if args.phase in ("coverage", "all"):
        phase_coverage()
    if args.report:
        write_report(load_runs())


if __name__ == "__main__":
    main()
