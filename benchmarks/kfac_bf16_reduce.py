"""Effect of the bf16 factor reduction (``reduce_dtype=torch.bfloat16``) on K-FAC's preconditioned step.

Two gloo ranks each take half of a Fashion-MNIST batch through the reference SmallCNN; two K-FAC
preconditioners on identical copies of the model reduce their factors with the fp32 all-reduce and
with the bf16 all-gather + fp32 sum. Printed per layer: relative difference of the factors and of the
preconditioned gradient (Cholesky inverses, damping 1e-3, as KFAC's defaults), and the factor bytes.

    python benchmarks/kfac_bf16_reduce.py [--batch 512] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_lbo.data import load_split, locate_fashion_mnist
from lightning_lbo.models import SmallCNN
from lightning_lbo.optim.kfac import KFACPreconditioner
from lightning_lbo.optim.kfac.distributed import TorchDistributedCommunicator
from tests.helpers.ddp import spawn_gloo


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def worker(rank: int, world_size: int, batch: int, steps: int) -> None:
    x_all, y_all = load_split(locate_fashion_mnist(), "train")
    torch.manual_seed(0)
    model = SmallCNN()
    models = {"fp32": model, "bf16": copy.deepcopy(model)}
    pres = {name: KFACPreconditioner(m, factor_update_interval=1, inverse_update_interval=1, kl_clip=None,
                                     comm=TorchDistributedCommunicator(reduce_dtype=None if name == "fp32"
                                                                       else torch.bfloat16))
            for name, m in models.items()}
    rows = {}
    for step in range(steps):
        start = step * batch + rank * batch // world_size
        x = x_all[start:start + batch // world_size].float().div(255)
        y = y_all[start:start + batch // world_size]
        grads = {}
        for name, m in models.items():
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            for p in m.parameters():  # DDP's gradient average
                dist.all_reduce(p.grad)
                p.grad /= world_size
            pres[name].step()
            grads[name] = {b.name: b.grad_matrix().clone() for b in pres[name].blocks}
        for b32, b16 in zip(pres["fp32"].blocks, pres["bf16"].blocks, strict=True):
            rows[b32.name] = {"factor_rel_diff": max(_rel(b16.factors[s], b32.factors[s]) for s in b32.factors),
                              "step_rel_diff": _rel(grads["bf16"][b32.name], grads["fp32"][b32.name])}
        for m in models.values():  # keep both copies identical: the difference is one step's, not accumulated
            m.load_state_dict(models["fp32"].state_dict())
    if rank == 0:
        stats = {name: pre.comm.stats.factor_bytes / steps for name, pre in pres.items()}
        print("RESULT " + json.dumps({"layers": rows, "factor_bytes_per_step": stats}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spawn_gloo(worker, world_size=2, args=(args.batch, args.steps))


if __name__ == "__main__":
    main()
