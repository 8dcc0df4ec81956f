"""K-FAC curvature communication under ``ddp_kfac``: bytes per step per rank, and 2-process step time.

Part 1 (bytes): two ranks (torchrun, gloo) train the reference SmallCNN on Fashion-MNIST with K-FAC;
the communicator counts the payload of every collective. The baseline is the naive scheme: every
Kronecker factor all-reduced as a full matrix on every step (each rank then inverts everything, so
nothing else is sent). A first configuration sends exactly that (no packing, fresh every step) and
must measure the baseline's bytes exactly, which checks the accounting.

Part 2 (time): median step time of one process with global batch B against two ``ddp_kfac``
processes with B/2 each (both grad-worker settings), in interleaved rounds of one run.

    python benchmarks/kfac_comm.py [--steps 30] [--batch 256] [--rounds 3] [--bytes-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> (KFAC kwargs, strategy kwargs)
BYTE_CONFIGS = {
    "naive (full matrices, every step)": (dict(factor_update_interval=1), dict(pack_symmetric=False)),
    "packed, every step": (dict(factor_update_interval=1), {}),
    "packed + stale statistics (SP-NGD policy)": (dict(factor_update_interval=1, stale_statistics="default"), {}),
    "packed + fixed interval 10 (KFAC default)": (dict(factor_update_interval=10), {}),
}
TIME_CONFIGS = {"1 process": None, "2 proc gwf=1": 1.0, "2 proc gwf=1/2": 0.5}


def _make_kfac(module, **kwargs):
    from lightning_lbo.optim.kfac import KFAC, StaleStatistics

    if kwargs.get("stale_statistics") == "default":
        kwargs["stale_statistics"] = StaleStatistics()
    return KFAC(module, lr=0.1, momentum=0.9, damping=1e-3, inverse_update_interval=10, **kwargs)


def _fit(kfac_kwargs: dict, strategy_kwargs: dict | None, batch: int, steps: int) -> dict:
    import pytorch_lightning as pl

    from lightning_lbo.classifier import ClassifierModule
    from lightning_lbo.data import FashionMNISTDataModule
    from lightning_lbo.strategies.ddp_kfac import KFACDDPStrategy

    world = int(os.environ.get("WORLD_SIZE", 1))
    times: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.t)

    pl.seed_everything(0, verbose=False)
    module = ClassifierModule("cnn", optimizer=partial(_make_kfac, **kfac_kwargs))
    dm = FashionMNISTDataModule(batch_size=batch // world, train_subset=batch * steps, drop_last=True)
    strategy = "auto" if strategy_kwargs is None else KFACDDPStrategy(**strategy_kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[StepTimer()])
    trainer.fit(module, datamodule=dm)
    pre = trainer.optimizers[0].preconditioner
    dense_per_step = sum(t.numel() * t.element_size() for st in pre.blocks for t in st.factors.values())
    comm = getattr(trainer.strategy, "communicator", None)
    out = {"steps": steps, "naive_bytes_per_step": dense_per_step, "step_time_median": statistics.median(times[3:]),
           "refreshes": sum(v for st in pre.blocks for v in st.refreshes.values())}
    if comm is not None:
        out |= {k: v / steps for k, v in comm.stats.as_dict().items()}
    return out


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    results = {}
    if args.part == "bytes":
        for name, (kfac_kwargs, strategy_kwargs) in BYTE_CONFIGS.items():
            results[name] = _fit(kfac_kwargs, strategy_kwargs, args.batch, args.steps)
    else:
        gwf = TIME_CONFIGS[args.config]
        results[args.config] = _fit({}, None if gwf is None else {"grad_worker_fraction": gwf}, args.batch, args.steps)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(results), flush=True)


def _launch(args: argparse.Namespace, part: str, nproc: int, config: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = [str(Path(__file__).resolve()), "--worker", "--part", part, "--config", config,
              "--steps", str(args.steps), "--batch", str(args.batch)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               "--master_port=29731", *script]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--part", default="bytes", choices=("bytes", "time"))
    parser.add_argument("--config", default="")
    parser.add_argument("--bytes-only", action="store_true", help="skip part 2 (step times)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"SmallCNN, Fashion-MNIST, global batch {args.batch}, {args.steps} steps, 2 ranks (gloo), load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    res = _launch(args, "bytes", 2)
    naive = next(iter(res.values()))["naive_bytes_per_step"]
    print("\n| configuration | factor KB/step/rank | x naive | + broadcast + decisions KB/step | total x naive |")
    print("|---|---:|---:|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['factor_bytes'] / 1e3:.1f} | {r['factor_bytes'] / naive:.3f} | "
              f"{(r['broadcast_bytes'] + r['decision_bytes']) / 1e3:.1f} | {r['total_bytes'] / naive:.3f} |")
    check = next(iter(res.values()))
    print(f"\naccounting check: naive model {naive} B/step, measured unpacked every-step {check['factor_bytes']:.0f}")
    if args.bytes_only:
        return

    times: dict[str, list[float]] = {name: [] for name in TIME_CONFIGS}
    for _ in range(args.rounds):
        for name in TIME_CONFIGS:
            nproc = 1 if TIME_CONFIGS[name] is None else 2
            times[name].append(_launch(args, "time", nproc, name)[name]["step_time_median"])
    base = statistics.median(times["1 process"])
    print(f"\n| run (global batch {args.batch}) | median step s | x 1 process | rounds |")
    print("|---|---:|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.2f} | "
              f"{', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
