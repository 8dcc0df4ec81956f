"""Stale statistics (SP-NGD): refreshes saved and accuracy reached, with and without the policy.

SmallCNN on a Fashion-MNIST subset, large batches, the same seeds and batches for every setting;
prints the number of statistic refreshes (A, G and unit-wise F of all layers) and the test accuracy.

Usage::

    python benchmarks/kfac_stale_statistics.py --steps 40 --batch 512
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lightning_lbo.data import TensorImageDataset, load_split, locate_fashion_mnist
from lightning_lbo.models import SmallCNN
from lightning_lbo.optim.kfac import KFAC, StaleStatistics


def run(train, test, steps: int, batch: int, **kfac) -> tuple[float, int]:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = KFAC(model, lr=0.1, momentum=0.9, **kfac)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = train[torch.randint(0, len(train), (batch,), generator=g).tolist()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = test
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    refreshes = sum(v for st in opt.preconditioner.blocks for v in st.refreshes.values())
    return acc, refreshes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = locate_fashion_mnist()
    X, Y = load_split(files, "train")
    Xt, Yt = load_split(files, "test")
    train = TensorImageDataset(X[:16384], Y[:16384])
    test = TensorImageDataset(Xt[:2000], Yt[:2000])[list(range(2000))]
    settings = {
        "every step": dict(factor_update_interval=1, inverse_update_interval=1),
        "stale (thr 0.1, x2, max 16)": dict(factor_update_interval=1, inverse_update_interval=1,
                                            stale_statistics=StaleStatistics(threshold=0.1, max_interval=16)),
        "stale (thr 0.3, x2, max 16)": dict(factor_update_interval=1, inverse_update_interval=1,
                                            stale_statistics=StaleStatistics(threshold=0.3, max_interval=16)),
        "fixed every 10": dict(factor_update_interval=10, inverse_update_interval=10),
    }
    print(f"SmallCNN, Fashion-MNIST 16k subset, batch {args.batch}, {args.steps} steps, KFAC lr 0.1")
    print(f"{'setting':30s} {'refreshes':>10s} {'test acc':>9s}")
    for name, kw in settings.items():
        acc, refreshes = run(train, test, args.steps, args.batch, **kw)
        print(f"{name:30s} {refreshes:10d} {acc:9.4f}", flush=True)


if __name__ == "__main__":
    main()
