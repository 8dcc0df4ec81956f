"""Step time of K-FAC relative to momentum SGD, measured side by side (interleaved) in one run.

Cases (from issue 7):

* ``a``: the reference SmallCNN on 28x28 images, batch 1024, KFAC with its defaults;
* ``b``: torchvision resnet18 (standard stem) on 32x32 images, batch 128, factors every 10 steps and
  inverses every 100.

Each round runs ``block`` steps of SGD, then ``block`` steps of each K-FAC implementation, on fixed
random data (forward + backward + step); the ratio is the total K-FAC time over the total SGD time,
so K-FAC's refresh and inverse steps are averaged over whole periods (``rounds * block`` must cover
the inverse period). ASDL's K-FAC (``asdfghjkl``, the ``bench`` extra) joins when importable.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/kfac_overhead.py --case a
    python benchmarks/kfac_overhead.py --case b --rounds 10 --block 10 --profile
    python benchmarks/kfac_overhead.py --case a --split 3   # per-phase and per-op split, 3 periods
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lbo.models import SmallCNN
from lightning_lbo.optim.kfac import KFAC

CASES = {
    "a": dict(model="smallcnn", image=28, channels=1, batch=1024, kfac={}, period=10),
    "b": dict(model="resnet18", image=32, channels=3, batch=128,
              kfac=dict(factor_update_interval=10, inverse_update_interval=100), period=100),
}


def build_model(name: str) -> nn.Module:
    if name == "smallcnn":
        return SmallCNN()
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def asdl_step_fn(model: nn.Module, x, y, lr: float, kfac_kwargs: dict) -> Callable[[], None] | None:
    """One step of ASDL's K-FAC (``asdfghjkl`` 0.1a5, imported as ``asdl``) with the same intervals, or None.

    ASDL computes the curvature inside its own ``forward_and_backward`` on curvature-update steps and
    refreshes inverses every ``preconditioner_upd_interval`` steps; empirical Fisher as in our default.
    """
    try:
        from asdl import KfacGradientMaker, PreconditioningConfig  # type: ignore
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        print("asdl: asdfghjkl not installed (pip install asdfghjkl==0.1a5, the `bench` extra)")
        return None
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = PreconditioningConfig(data_size=x.shape[0], damping=1e-3,
                                   curvature_upd_interval=kfac_kwargs.get("factor_update_interval", 10),
                                   preconditioner_upd_interval=kfac_kwargs.get("inverse_update_interval", 10))
    maker = KfacGradientMaker(model, config, fisher_type="fisher_emp")

    def step() -> None:
        opt.zero_grad()
        dummy_logits = maker.setup_model_call(model, x)
        maker.setup_loss_call(F.cross_entropy, dummy_logits, y)
        maker.forward_and_backward()
        opt.step()

    return step


def make_steps(case: dict, impls: list[str]) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(case["batch"], case["channels"], case["image"], case["image"])
    y = torch.randint(0, 10, (case["batch"],))
    steps = {}
    for name in impls:
        torch.manual_seed(0)
        model = build_model(case["model"])
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        elif name == "kfac":
            opt = KFAC(model, lr=0.01, momentum=0.9, **case["kfac"])
        elif name == "asdl":
            fn = asdl_step_fn(model, x, y, 0.01, case["kfac"])
            if fn is None:
                continue
            steps[name] = fn
            continue

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    return steps


def _op_times(fn: Callable[[], None]) -> dict[str, float]:
    """Self CPU time (ms) of each aten op (and each ``record_function`` label) in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}


def split_profile(case: dict, periods: int) -> None:
    """Where K-FAC's extra time goes: per phase (forward, backward, optimizer step) and per op, for SGD and
    for K-FAC's refresh steps (statistics captured, factors committed, inverses updated) and plain steps.

    Phase times are wall clock without the profiler (medians over the steps); op times are self CPU
    time under ``torch.profiler`` (one step at a time), per step, K-FAC minus SGD.
    """
    torch.manual_seed(0)
    x = torch.randn(case["batch"], case["channels"], case["image"], case["image"])
    y = torch.randint(0, 10, (case["batch"],))
    models, opts = {}, {}
    for name in ("sgd", "kfac"):
        torch.manual_seed(0)
        models[name] = build_model(case["model"])
        opts[name] = (torch.optim.SGD(models[name].parameters(), lr=0.01, momentum=0.9) if name == "sgd"
                      else KFAC(models[name], lr=0.01, momentum=0.9, **case["kfac"]))
    pre = opts["kfac"].preconditioner
    print("K-FAC blocks (factor/inverse intervals, inverse method, factor dtype):",
          f"factor_update_interval={pre.factor_update_interval} inverse_update_interval={pre.inverse_update_interval}"
          f" inverse_method={pre.inverse_method.value} kl_clip={pre.kl_clip} low_rank_inverse={pre.low_rank_inverse}")

    def phases(name: str) -> tuple[str, list[float]]:
        model, opt = models[name], opts[name]
        kind = name if name == "sgd" else ("kfac-refresh" if pre.capture.armed else "kfac-plain")
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return kind, [t1 - t0, t2 - t1, t3 - t2]

    for name in ("sgd", "kfac"):  # warm-up, first inverses
        phases(name)
    for block in pre.blocks:
        method = block.inverse.__class__.__name__ if block.inverse is not None else "-"
        print(f"  {block.name:14s} {type(block).__name__:14s} factors "
              f"{ {s: tuple(t.shape) for s, t in block.factors.items()} } {block.factor_dtype} inverse {method}")
    period = case["period"]
    timings: dict[str, list[list[float]]] = {}
    ops: dict[str, list[dict[str, float]]] = {}
    for _ in range(periods):
        for _ in range(period):
            for name in ("sgd", "kfac"):
                kind, t = phases(name)
                timings.setdefault(kind, []).append(t)
    for _ in range(periods):
        for _ in range(period):
            for name in ("sgd", "kfac"):
                kind = name if name == "sgd" else ("kfac-refresh" if pre.capture.armed else "kfac-plain")
                ops.setdefault(kind, []).append(_op_times(lambda name=name: phases(name)))
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\nphases, ms (median over steps; {periods} periods of {period} steps):")
    print(f"{'step':14s} {'n':>4s} {'forward':>9s} {'backward':>9s} {'opt.step':>9s} {'total':>9s}")
    for kind, rows in timings.items():
        cols = [1000 * median([r[i] for r in rows]) for i in range(3)]
        print(f"{kind:14s} {len(rows):4d} " + " ".join(f"{c:9.1f}" for c in cols) + f" {sum(cols):9.1f}")
    mean_ops = {kind: {k: sum(d.get(k, 0.0) for d in runs) / len(runs) for k in set().union(*runs)}
                for kind, runs in ops.items()}
    base = mean_ops["sgd"]
    for kind in ("kfac-plain", "kfac-refresh"):
        diff = {k: v - base.get(k, 0.0) for k, v in mean_ops[kind].items()}
        total = sum(mean_ops[kind].values()) - sum(base.values())
        print(f"\n{kind}: self CPU ms per step over SGD ({total:+.1f} in all; profiler on), largest:")
        for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:18]:
            print(f"  {k:40s} {v:+8.2f}   (sgd {base.get(k, 0.0):7.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="a")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 3 periods of K-FAC)")
    parser.add_argument("--block", type=int, default=10, help="steps per implementation per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print where K-FAC's extra time goes")
    parser.add_argument("--impls", nargs="+", default=["sgd", "kfac", "asdl"], choices=["sgd", "kfac", "asdl"],
                        help="implementations to interleave (sgd is always included: ratios are to it)")
    parser.add_argument("--split", type=int, default=0, metavar="PERIODS",
                        help="instead of the ratio: per-phase and per-op split over PERIODS K-FAC periods")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                        help="override K-FAC arguments, e.g. --set factor_update_interval=20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = dict(CASES[args.case])
    case["kfac"] = {**case["kfac"], **{k: int(v) for k, v in (item.split("=") for item in args.set)}}
    if args.split:
        split_profile(case, args.split)
        return
    rounds = args.rounds or max(1, 3 * case["period"] // args.block)
    steps = make_steps(case, ["sgd"] + [name for name in args.impls if name != "sgd"])
    for fn in steps.values():  # warm-up: one full step each (allocations, first inverses)
        fn()
    totals = {k: 0.0 for k in steps}
    cpu = {k: 0.0 for k in steps}  # process CPU time (all threads): less sensitive to other jobs on the machine
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(rounds):
        for name, fn in steps.items():
            if profiler is not None and name == "kfac":
                profiler.enable()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.block):
                fn()
            totals[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            if profiler is not None and name == "kfac":
                profiler.disable()
    n = rounds * args.block
    malloc = os.environ.get("MALLOC_MMAP_MAX_", "default")
    print(f"case {args.case}: {case['model']} {case['image']}x{case['image']} batch {case['batch']}, "
          f"K-FAC {case['kfac'] or 'defaults'}; {n} steps each, interleaved in blocks of {args.block}; "
          f"threads {args.threads}; MALLOC_MMAP_MAX_={malloc}")
    print(f"{'impl':8s} {'ms/step':>10s} {'ratio':>8s} {'cpu ms/step':>12s} {'cpu ratio':>10s}")
    for name, total in totals.items():
        print(f"{name:8s} {1000 * total / n:10.1f} {total / totals['sgd']:8.2f} {1000 * cpu[name] / n:12.1f} "
              f"{cpu[name] / cpu['sgd']:10.2f}")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())


if __name__ == "__main__":
    main()
