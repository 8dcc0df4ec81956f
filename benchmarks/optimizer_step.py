"""Optimizer step time of LARS / LAMB / RMSpropWarmup relative to torch SGD (foreach) on ResNet-50's parameters.

Each optimizer gets its own copy of torchvision's ResNet-50 parameter set (25.6M values in 161 tensors)
with fixed random gradients; the steps are interleaved (SGD, LARS, ..., SGD, LARS, ...) in one process so
machine noise hits all of them alike, and the median step time of each is divided by SGD's. LAMB is
also divided by torch's AdamW (foreach, the issue's yardstick; and fused, the kernel LAMB's default path
uses). ``lamb`` is LAMB's default (fused kernel on CPU/CUDA), ``lamb_foreach`` its ``fused=False`` path.

Usage::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/optimizer_step.py --repeats 30

The glibc settings keep freed temporaries in the heap instead of returning them to the OS on every step
(the same setting speeds up CPU training); the script prints which allocator setting it ran with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from lightning_lbo.optim.lamb import LAMB
from lightning_lbo.optim.lars import LARS
from lightning_lbo.optim.rmsprop_warmup import RMSpropWarmup


def resnet50_parameter_set(device: torch.device) -> list[torch.nn.Parameter]:
    """ResNet-50's parameters (random init) with random gradients attached."""
    import torchvision

    torch.manual_seed(0)
    params = [p.detach().to(device).requires_grad_() for p in torchvision.models.resnet50(weights=None).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def candidates() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    return {
        "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-5, foreach=True),
        "lars_foreach": lambda ps: LARS(ps, lr=0.1, momentum=0.9, weight_decay=5e-5, foreach=True),
        "lars_loop": lambda ps: LARS(ps, lr=0.1, momentum=0.9, weight_decay=5e-5, foreach=False),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
        "lamb": lambda ps: LAMB(ps, lr=1e-3, weight_decay=1e-2),
        "lamb_foreach": lambda ps: LAMB(ps, lr=1e-3, weight_decay=1e-2, foreach=True, fused=False),
        "rmsprop_warmup_foreach": lambda ps: RMSpropWarmup(ps, lr=0.1, steps_per_epoch=100, weight_decay=5e-5,
                                                           foreach=True),
        "rmsprop_warmup_sgd_phase": _after_transition,
    }


def _after_transition(ps: list[torch.nn.Parameter]) -> RMSpropWarmup:
    """RMSpropWarmup past epoch beta_center + beta_period / 2: pure momentum SGD."""
    opt = RMSpropWarmup(ps, lr=0.1, steps_per_epoch=1, weight_decay=5e-5, foreach=True)
    opt.steps_taken = 13
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    opts = {name: make(resnet50_parameter_set(device)) for name, make in candidates().items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for rep in range(args.warmup + args.repeats):
        for name, opt in opts.items():
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)

    malloc = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "PYTORCH_CUDA_ALLOC"))}
    print(f"torch {torch.__version__}, device {device}, threads {args.threads}, repeats {args.repeats}, "
          f"allocator env {malloc or 'default'}")
    base = statistics.median(times["sgd_foreach"])
    print(f"{'optimizer':<24}{'median ms':>10}{'ratio vs sgd_foreach':>22}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{1e3 * med:>10.2f}{med / base:>22.3f}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for lamb in ("lamb", "lamb_foreach"):
        for adamw in ("adamw_foreach", "adamw_fused"):
            print(f"{lamb} / {adamw}: {med[lamb] / med[adamw]:.3f}")


if __name__ == "__main__":
    main()
