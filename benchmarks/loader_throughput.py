"""Is the Fashion-MNIST loader a bottleneck at large batch? Loader time vs training-step time.

Measured side by side in one run (interleaved epochs), on whatever threads torch uses here:
  * our tensor loader (uint8 tensor in memory, one fancy-index + normalisation per batch);
  * torchvision's FashionMNIST with ToTensor + Normalize (per-sample PIL), for scale;
  * one SGD training step of the reference SmallCNN at the same batch.
Prints samples/s and the loader's share of a training step. Usage:
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/loader_throughput.py --batch-size 4096
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lightning_lbo.data import FILES, MEAN, STD, TensorImageDataset, load_split, locate_fashion_mnist, tensor_loader
from lightning_lbo.models import SmallCNN


def time_epoch(loader, max_batches: int) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for i, (x, _) in enumerate(loader):
        n += x.shape[0]
        if i + 1 == max_batches:
            break
    return time.perf_counter() - start, n


def torchvision_loader(directory: Path, batch_size: int):
    from torchvision import datasets, transforms

    root = Path(tempfile.mkdtemp()) / "FashionMNIST" / "raw"
    root.mkdir(parents=True)
    for stem in (s for pair in FILES.values() for s in pair):  # torchvision reads the unzipped idx files
        src = directory / (stem + ".gz") if (directory / (stem + ".gz")).exists() else directory / stem
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(root / stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    ds = datasets.FashionMNIST(str(root.parent.parent), train=True, transform=tf, download=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=8, help="batches timed per loader per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = locate_fashion_mnist()
    images, labels = load_split(files, "train")
    ours = tensor_loader(TensorImageDataset(images, labels), args.batch_size, shuffle=True)
    try:
        theirs = torchvision_loader(files.directory, args.batch_size)
    except Exception as err:  # torchvision layout unavailable: report ours only
        print(f"torchvision loader unavailable: {err}")
        theirs = None
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = next(iter(ours))

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    train_step()
    totals = {"ours": [0.0, 0], "torchvision": [0.0, 0], "step": [0.0, 0]}
    for _ in range(args.rounds):  # interleaved, so machine noise hits all three alike
        t, n = time_epoch(ours, args.batches)
        totals["ours"][0] += t
        totals["ours"][1] += n
        if theirs is not None:
            t, n = time_epoch(theirs, max(1, args.batches // 4))
            totals["torchvision"][0] += t
            totals["torchvision"][1] += n
        start = time.perf_counter()
        for _ in range(2):
            train_step()
        totals["step"][0] += time.perf_counter() - start
        totals["step"][1] += 2 * args.batch_size
    print(f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}")
    print(f"{'':28s}{'samples/s':>12s}{'ms/batch':>10s}")
    for name, (seconds, n) in totals.items():
        if n:
            label = {"step": "SmallCNN train step", "ours": "tensor loader (ours)",
                     "torchvision": "torchvision PIL loader"}[name]
            print(f"{label:28s}{n / seconds:12.0f}{1000 * seconds / n * args.batch_size:10.1f}")
    ours_rate = totals["ours"][1] / totals["ours"][0]
    step_rate = totals["step"][1] / totals["step"][0]
    print(f"loader time / train-step time (ours): {step_rate / ours_rate:.3f}")


if __name__ == "__main__":
    main()
