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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="a")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 3 periods of K-FAC)")
    parser.add_argument("--block", type=int, default=10, help="steps per implementation per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print where K-FAC's extra time goes")
    parser.add_argument("--impls", nargs="+", default=["sgd", "kfac", "asdl"], choices=["sgd", "kfac", "asdl"],
                        help="implementations to interleave (sgd is always included: ratios are to it)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                        help="override K-FAC arguments, e.g. --set factor_update_interval=20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = dict(CASES[args.case])
    case["kfac"] = {**case["kfac"], **{k: int(v) for k, v in (item.split("=") for item in args.set)}}
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
