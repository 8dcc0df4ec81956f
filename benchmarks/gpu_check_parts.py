"""The parts of the GPU check that run Python code on the device (driver: ``benchmarks/gpu_check.py``).

Each ``part_*`` function takes a :class:`PartContext` and returns a :class:`PartResult`: named checks
(pass/fail with a detail), figures, notes. The driver runs each part in its own process with a time
budget, so a crash, a hang or a CUDA error in one part cannot take the report down with it.

Every part runs on ``cuda`` or, for the smoke run, on ``cpu`` with tiny sizes; the code path is the same
except where the CPU lacks the feature (``set_sync_debug_mode``: there host syncs are counted with a
dispatch mode; Lightning's ``"16-mixed"`` flag: there the same ``MixedPrecision`` plugin is given a CPU
``GradScaler``). Only the package's public API is used (factors: ``preconditioner.factors(layer)``,
through ``tests/gpu/accessors.py``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
_CHECKER_FILES = {str(Path(__file__).resolve()), str(Path(__file__).resolve().with_name("gpu_check.py"))}


@dataclass
class PartContext:
    """What a part needs to know: the device, smoke sizes or full ones, its time budget, a scratch folder."""

    device: str
    smoke: bool
    budget_s: float
    work_dir: Path
    started: float = field(default_factory=time.perf_counter)

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


@dataclass
class PartResult:
    """Checks (``{"name", "ok", "detail"}``), figures and notes of one part."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def as_dict(self) -> dict[str, Any]:
        status = "pass" if self.checks and all(c["ok"] for c in self.checks) else "fail"
        return {"status": status, **asdict(self), "notes": list(dict.fromkeys(self.notes))}


# ---------------------------------------------------------------------------------------------- shared
def _synthetic_batches(steps: int, batch: int, image: int, channels: int, classes: int, seed: int = 0):
    """A learnable task: labels from a fixed random linear teacher of the image, one batch per step."""
    import torch

    teacher = torch.randn(channels * image * image, classes, generator=torch.Generator().manual_seed(seed))
    out = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed + 1 + step)
        x = torch.randn(batch, channels, image, image, generator=gen)
        out.append((x, (x.flatten(1) @ teacher).argmax(1)))
    return out


class _BatchList:
    """A map-style dataset whose items are whole batches (``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.batches[i]


def _trainer(pl, ctx: PartContext, tmp: Path, **kwargs: Any):
    defaults = dict(accelerator="gpu" if ctx.device == "cuda" else "cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp))
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _precision_kwargs(pl, precision: str, device: str) -> dict[str, Any]:
    """Trainer arguments for ``precision``: the flag on CUDA; on the CPU the same plugin with a CPU GradScaler."""
    if device == "cuda" or precision != "16-mixed":
        return {"precision": precision}
    import torch

    # Lightning refuses the "16-mixed" flag on CPU; its MixedPrecision plugin runs there with a CPU scaler.
    return {"plugins": [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


def _rel_error(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- part 2: AMP
def part_amp(ctx: PartContext) -> PartResult:
    """K-FAC under 16-mixed (a real GradScaler) and bf16-mixed: scale-free finite factors, skips counted."""
    import torch
    import torch.nn.functional as F

    from lightning_lbo import KFAC
    from lightning_lbo.callbacks import KFACCallback
    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.compat import callback_bases, lightning_package
    from lightning_lbo.models import SmallCNN
    from tests.gpu.accessors import layer_factors

    pl = lightning_package()
    result = PartResult()
    steps, batch = (8, 16) if ctx.smoke else (300, 128)
    nan_steps = {3, 6} if ctx.smoke else {20, 55}  # one on a refresh step (every 10), one between

    class Recorder(*callback_bases()):
        """Losses per step and the GradScaler's skips (each skipped step halves the scale)."""

        def __init__(self) -> None:
            self.losses, self.scaler_skips, self.last_scale = [], 0, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                scale = float(scaler.get_scale())
                if self.last_scale is not None and scale < self.last_scale:
                    self.scaler_skips += 1
                self.last_scale = scale

    for precision in ("16-mixed", "bf16-mixed"):
        tag = precision
        # (a) Scale-free: lr 0 on one fixed batch, factors every step; equal to an fp32 loop's factors.
        x, y = _synthetic_batches(1, batch, 28, 1, 10)[0]
        torch.manual_seed(0)
        reference = SmallCNN().to(ctx.device)
        ref_opt = KFAC(reference, lr=0.0, factor_update_interval=1, inverse_update_interval=1)
        F.cross_entropy(reference(x.to(ctx.device)), y.to(ctx.device)).backward()
        ref_opt.step()
        torch.manual_seed(0)
        module = ClassifierModule(SmallCNN(), optimizer=lambda m: KFAC(m, lr=0.0, factor_update_interval=1,
                                                                        inverse_update_interval=1))
        recorder = Recorder()
        trainer = _trainer(pl, ctx, ctx.work_dir, max_steps=3, callbacks=[KFACCallback(), recorder],
                           **_precision_kwargs(pl, precision, ctx.device))
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_BatchList([(x, y)] * 3), batch_size=None))
        # Same layers in the same order; the LightningModule prefixes the names with "model.".
        pairs = {f"{layer}.{s}": (got[s], want[s]) for (layer, want), got in
                 zip(layer_factors(ref_opt).items(), layer_factors(trainer.optimizers[0]).values(), strict=True)
                 for s in want}
        errors = {key: _rel_error(got, want) for key, (got, want) in pairs.items()}
        worst = max(errors, key=errors.get)
        ratio = float(sum(got.norm() for key, (got, _) in pairs.items() if not key.endswith(".A"))
                      / sum(want.norm() for key, (_, want) in pairs.items() if not key.endswith(".A")))
        result.figures[f"{tag} scale check"] = {"worst_factor": worst, "rel_error": errors[worst],
                                               "G_norm_ratio": ratio, "scaler_scale": recorder.last_scale}
        # 16-bit autocast rounds activations and output gradients to 8-11 mantissa bits; a leaked loss scale
        # would multiply G by scale^2 (2^32 at the default initial scale).
        result.check(f"{tag}: factors equal the fp32 loop's (loss scale removed)", errors[worst] <= 5e-2,
                     f"worst {worst}: relative error {errors[worst]:.2e} (<= 5e-2), ||G|| ratio {ratio:.4f}")

        # (b) A few hundred steps with non-finite batches injected.
        batches = _synthetic_batches(steps, batch, 28, 1, 10, seed=1)
        for s in nan_steps:
            batches[s] = (torch.full_like(batches[s][0], float("nan")), batches[s][1])
        torch.manual_seed(0)
        module = ClassifierModule(SmallCNN(), optimizer=lambda m: KFAC(m, lr=0.05, momentum=0.9,
                                                                        factor_update_interval=10,
                                                                        inverse_update_interval=100))
        recorder = Recorder()
        trainer = _trainer(pl, ctx, ctx.work_dir, max_steps=steps, callbacks=[KFACCallback(), recorder],
                           **_precision_kwargs(pl, precision, ctx.device))
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_BatchList(batches), batch_size=None))
        seconds = time.perf_counter() - t0
        opt = trainer.optimizers[0]
        factors = layer_factors(opt)
        finite_factors = all(bool(torch.isfinite(t).all()) for stats in factors.values() for t in stats.values())
        finite_weights = all(bool(torch.isfinite(p).all()) for p in module.parameters())
        kfac_skips = int(opt.nonfinite_skips)
        losses = [v for v in recorder.losses if v == v and abs(v) != float("inf")]
        k = max(1, min(20, len(losses) // 4))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        result.figures[f"{tag} training"] = {
            "steps": steps, "injected_nonfinite_steps": sorted(nan_steps), "kfac_skipped_steps": kfac_skips,
            "scaler_skipped_steps": recorder.scaler_skips, "loss_first": first, "loss_last": last,
            "seconds": round(seconds, 2), "layers": len(factors)}
        result.check(f"{tag}: factors and weights finite after {steps} steps", finite_factors and finite_weights,
                     f"factors finite {finite_factors}, weights finite {finite_weights}")
        if precision == "16-mixed":
            # The scaler skips the optimizer step itself (K-FAC never sees it) and halves its scale.
            result.check(f"{tag}: skipped steps counted by the GradScaler",
                         recorder.scaler_skips >= len(nan_steps) and kfac_skips == 0,
                         f"scaler skips {recorder.scaler_skips} (>= {len(nan_steps)} injected), K-FAC skips "
                         f"{kfac_skips} (0: the scaler stepped around it)")
        else:
            result.check(f"{tag}: skipped steps counted by K-FAC", kfac_skips == len(nan_steps),
                         f"K-FAC skips {kfac_skips}, injected {len(nan_steps)}")
        if not ctx.smoke:
            result.check(f"{tag}: loss decreases", last < first,
                         f"mean of first {k}: {first:.3f}, last {k}: {last:.3f}")
    return result


# ---------------------------------------------------------------------------------- part 3: host syncs
@contextlib.contextmanager
def count_host_syncs(device: str) -> Iterator[collections.Counter]:
    """Count host synchronisations by the code that asked for them (see :func:`_caller`).

    CUDA: the sync debug mode in "warn" mode, each warning attributed when it is issued (the stack is
    then still the one that made the sync). CPU: scalar reads (``aten._local_scalar_dense``: ``.item()``,
    ``float(t)``, ``bool(t)``) seen by a dispatch mode.
    """
    import torch

    counts: collections.Counter = collections.Counter()
    if device == "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            original = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
                if "synchroniz" in str(message):
                    counts[_caller()] += 1
                else:
                    original(message, category, filename, lineno, file, line)

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                counts[_caller()] += 1
            return func(*args, **(kwargs or {}))

    with ScalarReads():
        yield counts


def _short(filename: str) -> str:
    """A path relative to the repository, or from its package folder for an installed library."""
    with contextlib.suppress(ValueError):
        return str(Path(filename).resolve().relative_to(REPO_ROOT))
    return filename.split("site-packages/")[-1]


def _origin(frames: list[traceback.FrameSummary]) -> str:
    """``file:line`` of the code that asked for a sync: the innermost frame outside torch (and this checker)."""
    import torch

    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    for frame in reversed(frames):
        path = os.path.realpath(frame.filename)
        if path not in _CHECKER_FILES and not path.startswith(torch_dir) and not path.endswith("warnings.py"):
            return f"{_short(frame.filename)}:{frame.lineno}"
    return "<unknown>"


def _caller() -> str:
    return _origin(traceback.extract_stack()[:-1])


def part_sync(ctx: PartContext) -> PartResult:
    """K-FAC steps that refresh nothing make no host sync (counted, then CUDA's "error" mode)."""
    import torch
    import torch.nn.functional as F

    from lightning_lbo import KFAC
    from lightning_lbo.models import SmallCNN

    result = PartResult()
    batch = 8 if ctx.smoke else 256
    x = torch.randn(batch, 1, 28, 28).to(ctx.device)
    y = torch.randint(0, 10, (batch,)).to(ctx.device)
    for variant in ("fp32", "bf16 autocast"):
        torch.manual_seed(0)
        model = SmallCNN().to(ctx.device)
        # Factors every 10 steps, inverses every 100: step 0 refreshes both, steps 1-9 refresh nothing.
        opt = KFAC(model, lr=0.01, momentum=0.9, factor_update_interval=10, inverse_update_interval=100)

        def step(model=model, opt=opt, autocast=variant != "fp32") -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        step()  # step 0: refresh
        with count_host_syncs(ctx.device) as counts:
            for _ in range(4):  # steps 1-4
                step()
        total = sum(counts.values())
        result.figures[f"{variant}: syncs in 4 non-refresh steps"] = dict(counts.most_common(8))
        where = f"; at {', '.join(k for k, _ in counts.most_common(3))}" if total else ""
        result.check(f"{variant}: no host sync in steps that refresh nothing (counted)", total == 0,
                     f"{total} in 4 steps{where}")
        if ctx.device == "cuda":
            error = ""
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(4):  # steps 5-8
                    step()
            except RuntimeError as exc:
                error = f"{_origin(traceback.extract_tb(exc.__traceback__))}: {str(exc)[:160]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            result.check(f"{variant}: 4 non-refresh steps under set_sync_debug_mode('error')", not error,
                         error or "no error raised")
        else:
            for _ in range(4):
                step()
            result.notes.append("set_sync_debug_mode is CUDA-only: on the CPU syncs are counted as scalar reads")
        step()  # step 9: the last step before the next refresh
        with count_host_syncs(ctx.device) as counts:
            step()  # step 10: factors refresh (may sync: informational)
        result.figures[f"{variant}: syncs in the refresh step"] = dict(counts.most_common(8))
    counts = _trainer_syncs(ctx, batch)
    ours = {k: v for k, v in counts.items() if k.startswith("lightning_lbo/")}
    result.figures["Trainer (KFACCallback, LRSchedule): syncs in 4 non-refresh steps"] = dict(counts.most_common(8))
    result.check("Trainer: no host sync from lightning_lbo in 4 steps that refresh nothing", not ours,
                 f"{sum(ours.values())} at {', '.join(ours)}" if ours else
                 f"none ({sum(counts.values())} elsewhere: Lightning's own, for information)")
    return result


def _trainer_syncs(ctx: PartContext, batch: int) -> collections.Counter:
    """Host syncs in training steps 1-4 of a Lightning run with ``KFACCallback`` (logging every step) and
    ``LRSchedule``, counted from each step's start to its end (data loading and its copy excluded)."""
    import torch

    from lightning_lbo import KFAC
    from lightning_lbo.callbacks import KFACCallback, LRSchedule
    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.compat import callback_bases, lightning_package
    from lightning_lbo.models import SmallCNN

    total: collections.Counter = collections.Counter()

    class SyncWindow(*callback_bases()):
        def __init__(self) -> None:
            self.window, self.counts = None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if 1 <= batch_idx <= 4:
                self.window = count_host_syncs(ctx.device)
                self.counts = self.window.__enter__()  # filled while the window is open

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.window is not None:
                self.window.__exit__(None, None, None)
                total.update(self.counts)
                self.window = None

    torch.manual_seed(0)
    module = ClassifierModule(SmallCNN(), optimizer=lambda m: KFAC(m, lr=0.05, momentum=0.9,
                                                                    factor_update_interval=10,
                                                                    inverse_update_interval=100))
    schedule = LRSchedule(warmup_steps=3, warmup_start_factor=0.1, decay="poly", total_steps=6, batch_size=batch)
    trainer = _trainer(lightning_package(), ctx, ctx.work_dir, max_steps=6,
                       callbacks=[KFACCallback(), schedule, SyncWindow()])
    batches = _synthetic_batches(6, batch, 28, 1, 10)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_BatchList(batches), batch_size=None))
    return total


# -------------------------------------------------------------------------------------- part 4: DDP
DDP_STEPS, DDP_BATCH = 12, 32
DDP_COLLECTIVE_TIMEOUT_S = 45


def _ddp_module(pl_package: str):
    import torch

    from lightning_lbo import KFAC
    from lightning_lbo.classifier import classifier_module_class

    torch.manual_seed(0)
    return classifier_module_class(pl_package)(
        "cnn", optimizer=lambda m: KFAC(m, lr=0.05, momentum=0.9, weight_decay=1e-4, damping=1e-2,
                                        factor_update_interval=2, inverse_update_interval=4))


def ddp_worker(args: Any) -> None:
    """One rank (under torchrun): train with ``ddp_kfac``, compare the ranks' weights, rank 0 writes JSON."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from lightning_lbo.compat import PYTORCH_LIGHTNING, lightning_package
    from lightning_lbo.strategies import kfac_ddp_strategy_class

    pl = lightning_package(PYTORCH_LIGHTNING)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    batches = _synthetic_batches(DDP_STEPS, DDP_BATCH, 28, 1, 10)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    # Rank r reads the examples r, r + world, ... in order: together the ranks' step-s micro-batches are exactly
    # the single-process batch s (Lightning's DistributedSampler would shuffle: use_distributed_sampler=False).
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[rank::world], y[rank::world]),
                                         batch_size=DDP_BATCH // world)
    # World 1: the registered name (NCCL on CUDA). Two ranks: the class, for the backend and a collective
    # timeout that turns a rank left waiting (its peer refused by NCCL) into an error instead of a hang.
    strategy = "ddp_kfac" if world == 1 else kfac_ddp_strategy_class(PYTORCH_LIGHTNING)(
        process_group_backend=args.backend, timeout=datetime.timedelta(seconds=DDP_COLLECTIVE_TIMEOUT_S))
    module = _ddp_module(PYTORCH_LIGHTNING)
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, num_nodes=world,
                         strategy=strategy, max_epochs=1, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = trainer.strategy.all_gather(flat)
    gathered = gathered.reshape(world, -1)
    out = {"world_size": world, "backend": dist.get_backend() if dist.is_initialized() else "none",
           "device": str(flat.device), "finite": bool(torch.isfinite(flat).all()),
           "max_abs_diff_between_ranks": float((gathered - gathered[0]).abs().max()),
           "ranks_bit_identical": bool(all(torch.equal(g, gathered[0]) for g in gathered))}
    if world == 1:
        reference = _ddp_module(PYTORCH_LIGHTNING).to(flat.device)
        opt = reference.configure_optimizers()
        for bx, by in batches:
            opt.zero_grad()
            F.cross_entropy(reference(bx.to(flat.device)), by.to(flat.device)).backward()
            opt.step()
        ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        out["rel_diff_to_single_process"] = _rel_error(flat, ref)
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    if dist.is_initialized():  # leave together: a gloo group left to interpreter exit can abort a rank (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bounded(cmds: list[list[str]], timeout: float, env: dict[str, str] | None = None,
                log: Path | None = None) -> tuple[list[int | None], bool, str]:
    """Run commands side by side, each in its own process group; kill every group after ``timeout`` s.

    Returns (exit codes, timed out, the combined output's last 4000 characters).
    """
    import signal

    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for cmd in cmds]
    deadline, timed_out, outputs = time.monotonic() + timeout, False, []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        outputs.append(out or "")
    text = "\n".join(outputs)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(text)
    return [p.returncode for p in procs], timed_out, text[-4000:]


def _launch_ddp(ctx: PartContext, world: int, backend: str, timeout: float) -> tuple[dict | None, str]:
    """``world`` single-process torchrun "nodes" on this machine (every rank on device 0)."""
    result_path = ctx.work_dir / f"ddp_{world}_{backend}.json"
    result_path.unlink(missing_ok=True)
    port = _free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={world}", f"--node_rank={node}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             str(Path(__file__).resolve().with_name("gpu_check.py")), "--ddp-worker", "--device", ctx.device,
             "--backend", backend, "--result", str(result_path)] for node in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}
    codes, timed_out, tail = run_bounded(cmds, timeout, env)
    print(f"--- ddp world {world} {backend}: exit codes {codes}, timed out {timed_out}\n{tail}", flush=True)
    if timed_out:
        return None, f"timed out after {timeout:.0f} s: {tail[-600:]}"
    if any(codes) or not result_path.exists():
        return None, f"exit codes {codes}: {tail[-600:]}"
    return json.loads(result_path.read_text()), ""


def part_ddp(ctx: PartContext) -> PartResult:
    """``ddp_kfac`` with world size 1 (NCCL on CUDA) and 2 processes on the one device; ranks must agree."""
    result = PartResult()
    default = "nccl" if ctx.device == "cuda" else "gloo"
    one, error = _launch_ddp(ctx, 1, default, min(120.0, ctx.remaining() - 10))
    if one is None:
        result.check(f"world size 1 ({default}): trains", False, error)
    else:
        result.figures[f"world 1 {default}"] = one
        result.check(f"world size 1 ({default}): finite and equal to one plain process",
                     one["finite"] and one["rel_diff_to_single_process"] <= 1e-4,
                     f"relative difference {one['rel_diff_to_single_process']:.2e} (<= 1e-4)")
    backends = [default] + (["gloo"] if default != "gloo" else [])
    two = None
    for backend in backends:
        remaining = ctx.remaining() - 5
        if remaining < 20:
            result.notes.append(f"no time left for 2 processes over {backend}")
            break
        two, error = _launch_ddp(ctx, 2, backend, min(DDP_COLLECTIVE_TIMEOUT_S + 60.0, remaining))
        if two is not None:
            break
        result.notes.append(f"2 processes on one device over {backend} failed: {error[-300:]}")
    if two is None:
        result.check("2 processes on one device: trains", False, "; ".join(result.notes[-2:]))
        return result
    result.figures[f"world 2 {two['backend']}"] = two
    result.check(f"2 processes on one device ({two['backend']}): weights finite", two["finite"])
    result.check(f"2 processes ({two['backend']}): ranks hold bit-identical weights", two["ranks_bit_identical"],
                 f"max |difference| {two['max_abs_diff_between_ranks']:.3g}")
    return result


# ------------------------------------------------------------------------------------ part 5: speed
SPEED_CASES = {
    # name: (model, image, channels, batch, bf16 autocast, K-FAC arguments, steps per block, rounds)
    "resnet50": ("resnet50", 224, 3, 128, True, dict(factor_update_interval=10, inverse_update_interval=100), 10, 20),
    "smallcnn": ("smallcnn", 28, 1, 1024, False, {}, 10, 6),
}
SMOKE_SPEED_CASES = {
    # A small torchvision model for the torchvision path (resnet18 costs a minute here on a loaded CPU).
    "squeezenet1_1 (smoke)": ("squeezenet1_1", 32, 3, 4, True, dict(factor_update_interval=2,
                                                                     inverse_update_interval=2), 1, 2),
    "smallcnn (smoke)": ("smallcnn", 28, 1, 16, False, dict(factor_update_interval=1, inverse_update_interval=2), 1, 2),
}


class _AsdlStep:
    """One step of ASDL's K-FAC under the case's autocast, or in fp32 where ASDL fails under bf16.

    Under bf16 autocast ASDL's factors are bf16 and its Cholesky can fail; then the step is rebuilt
    without autocast (a fresh model) and :attr:`fallback` says so, since the conditions then differ.
    """

    def __init__(self, make: Callable[[], Callable[[], None] | None], amp: dict[str, Any]) -> None:
        self.make, self.amp, self.fallback = make, amp, None
        self.fn = make()

    def __call__(self) -> None:
        import torch

        try:
            with torch.autocast(**self.amp):
                self.fn()
        except Exception as exc:  # noqa: BLE001 - any failure under autocast gets one fp32 retry
            if self.fallback is not None or not self.amp["enabled"]:
                raise
            self.fallback = (f"ASDL failed under bf16 autocast ({type(exc).__name__}: {str(exc)[:120]}); "
                             "measured in fp32")
            self.amp = {**self.amp, "enabled": False}
            self.fn = self.make()
            self.fn()


def _speed_steps(device: str, model_name: str, image: int, channels: int, batch: int, autocast: bool,
                 kfac_kwargs: dict[str, int]) -> tuple[dict[str, Callable[[], None]], list[str]]:
    """One training-step closure per implementation (momentum SGD, our K-FAC, ASDL's K-FAC if installed)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from benchmarks.kfac_overhead import asdl_step_fn
    from lightning_lbo import KFAC
    from lightning_lbo.models import SmallCNN

    classes = 1000 if image >= 224 else 10

    def build():
        torch.manual_seed(0)
        if model_name == "smallcnn":
            return SmallCNN().to(device)
        return getattr(torchvision.models, model_name)(num_classes=classes).to(device)

    x = torch.randn(batch, channels, image, image, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=autocast)
    steps, notes = {}, []
    for name in ("sgd", "kfac"):
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if name == "sgd" else \
            KFAC(model, lr=0.01, momentum=0.9, **kfac_kwargs)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        steps[name] = step
    asdl = _AsdlStep(lambda: asdl_step_fn(build(), x, y, 0.01, kfac_kwargs), amp)
    if asdl.fn is None:
        notes.append("ASDL (asdfghjkl) is not installed: carry its wheel (make gpu-wheels) to measure it")
    else:
        steps["asdl"] = asdl
    return steps, notes


def _time_interleaved(device: str, steps: dict[str, Callable[[], None]], block: int, rounds: int,
                      deadline: float) -> tuple[dict[str, float], int, dict[str, str]]:
    """Total seconds per implementation over whole rounds (each round: ``block`` steps of each, in turn).

    An implementation that raises is dropped (with its error) and the others go on.
    """
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    errors: dict[str, str] = {}

    def run(name: str, n: int) -> float | None:
        try:
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                steps[name]()
            sync()
            return time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one implementation failing must not stop the others
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            del steps[name]
            return None

    for name in list(steps):  # warm-up: allocations, cuDNN autotuning, the first inverses
        run(name, 3 if device == "cuda" else 1)
    totals = {name: 0.0 for name in steps}
    done = 0
    for _ in range(rounds):
        start = time.perf_counter()
        for name in list(steps):
            seconds = run(name, block)
            if seconds is None:
                del totals[name]
            else:
                totals[name] += seconds
        done += 1
        if time.perf_counter() + (time.perf_counter() - start) > deadline:
            break
    return totals, done, errors


def part_speed(ctx: PartContext) -> PartResult:
    """K-FAC / momentum-SGD step-time ratios, interleaved in one process, with ASDL's beside."""
    import torch

    result = PartResult()
    cases = SMOKE_SPEED_CASES if ctx.smoke else SPEED_CASES
    if ctx.device == "cuda":
        torch.backends.cudnn.benchmark = True
    shares = {"resnet50": 0.75, "smallcnn": 0.25}
    for name, (model, image, channels, batch, autocast, kfac_kwargs, block, rounds) in cases.items():
        deadline = time.perf_counter() + shares.get(name, 0.5) * (ctx.remaining() - 15)
        steps, notes = _speed_steps(ctx.device, model, image, channels, batch, autocast, kfac_kwargs)
        result.notes.extend(notes)
        totals, done, errors = _time_interleaved(ctx.device, steps, block, rounds, deadline)
        for impl, error in errors.items():
            result.notes.append(f"{name}: {impl} failed: {error}")
        n = done * block
        if "sgd" not in totals or "kfac" not in totals or not n:
            result.check(f"{name}: measured", False, "; ".join(errors.values()) or "no round completed")
            continue
        figure = {"config": f"{model} {image}x{image} batch {batch}, {'bf16 autocast' if autocast else 'fp32'}, "
                            f"K-FAC {kfac_kwargs or 'defaults'}", "steps_each": n, "block": block,
                  "ms_per_step": {k: round(1000 * v / n, 2) for k, v in totals.items()},
                  "ratio_to_sgd": {k: round(v / totals["sgd"], 3) for k, v in totals.items()}}
        fallback = getattr(steps.get("asdl"), "fallback", None)
        if fallback:
            figure["asdl_note"] = fallback
        result.figures[name] = figure
        period = kfac_kwargs.get("inverse_update_interval", 10)
        covered = n >= period
        result.check(f"{name}: measured over whole inverse periods", covered,
                     f"{n} steps each, inverse period {period}")
        if name == "resnet50":
            ratio = figure["ratio_to_sgd"]["kfac"]
            result.check("goal: resnet50 K-FAC/SGD step ratio <= 1.5", ratio <= 1.5, f"{ratio:.2f}x")
            if "asdl" in figure["ratio_to_sgd"]:
                asdl = figure["ratio_to_sgd"]["asdl"]
                result.check("goal: resnet50 K-FAC ahead of ASDL", ratio < asdl,
                             f"ours {ratio:.2f}x, ASDL {asdl:.2f}x" + (f" ({fallback})" if fallback else ""))
            else:
                result.check("goal: resnet50 K-FAC ahead of ASDL", False, "ASDL not measured")
        del steps
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    return result


PARTS: dict[str, Callable[[PartContext], PartResult]] = {"amp": part_amp, "sync": part_sync, "ddp": part_ddp,
                                                          "speed": part_speed}
