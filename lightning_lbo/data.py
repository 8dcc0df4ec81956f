"""Fashion-MNIST, offline, held as tensors and batched by slicing.

Large-batch training on a CPU starves on per-sample PIL transforms: at batch 4096 a torchvision
``FashionMNIST`` loader spends longer collating than a small CNN spends training. Here the whole
split is one ``uint8`` tensor; a batch is one fancy-index plus one normalisation
(:class:`TensorImageDataset` implements ``__getitems__``, which ``DataLoader`` calls with the whole
list of indices of a batch). Samplers, ``DistributedSampler`` injection by Lightning and
``drop_last`` work as with any map-style dataset.

Where the files are looked for, in order:

1. ``data_dir`` given by the user: the four idx files (``.gz`` or not) directly in it, or in
   torchvision's layout ``data_dir/FashionMNIST/raw``;
2. ``$LBO_DATA_DIR`` with the same two layouts;
3. Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
4. torchvision's download, only with ``download=True``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from lightning_lbo.compat import (
    default_class_attribute,
    lightning_package,
    package_of,
    per_package,
    publish_per_package,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-pixel statistics of the 60k training images (scaled to [0, 1]).
MEAN, STD = 0.2860, 0.3530
DATA_RANGE = ((0.0 - MEAN) / STD, (1.0 - MEAN) / STD)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
HOW_TO_GET = (
    "Fashion-MNIST was not found. Any one of these fixes it:\n"
    "  * Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` (files in {debian});\n"
    "  * put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz in a directory and pass it as data_dir (or set LBO_DATA_DIR);\n"
    "  * allow a download through torchvision: download=True (`lbo data --download`).\n"
    "Looked in: {looked}"
)


class DataNotFoundError(FileNotFoundError):
    """Raised when no copy of the data set can be found or downloaded."""


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST format: big-endian header of dims, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values.")
    return array.reshape(shape)


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for the idx files, in order (see the module docstring)."""
    roots = [Path(p) for p in (data_dir, os.environ.get("LBO_DATA_DIR")) if p]
    dirs: list[Path] = []
    for root in roots:
        dirs += [root, root / "FashionMNIST" / "raw"]
    return dirs + [DEBIAN_DIR]


@dataclass(frozen=True)
class FashionMNISTFiles:
    """Where the data was found, and how."""

    directory: Path
    source: str


def locate_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = False) -> FashionMNISTFiles:
    """Find the four idx files; download them through torchvision only if ``download``."""
    dirs = candidate_dirs(data_dir)
    for directory in dirs:
        if all(_idx_path(directory, stem) for pair in FILES.values() for stem in pair):
            source = "debian package dataset-fashion-mnist" if directory == DEBIAN_DIR else "local files"
            return FashionMNISTFiles(directory, source)
    if download:
        from torchvision.datasets import FashionMNIST

        root = Path(data_dir or os.environ.get("LBO_DATA_DIR") or "data")
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
        return FashionMNISTFiles(root / "FashionMNIST" / "raw", "torchvision download")
    raise DataNotFoundError(HOW_TO_GET.format(debian=DEBIAN_DIR, looked=", ".join(map(str, dirs))))


def load_split(files: FashionMNISTFiles, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` uint8 and labels ``[N]`` int64 of ``split`` ("train" or "test")."""
    if split not in FILES:
        raise ValueError(f"Invalid split: {split!r}. Supported: {tuple(FILES)}.")
    image_stem, label_stem = FILES[split]
    images = _read_idx(_idx_path(files.directory, image_stem))
    labels = _read_idx(_idx_path(files.directory, label_stem))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class TensorImageDataset(Dataset):
    """uint8 images held in memory; indexing with a list of indices returns a whole normalised batch.

    Args:
        images: ``[N, C, H, W]`` uint8.
        labels: ``[N]`` int64.
        mean, std: normalisation applied after scaling to ``[0, 1]``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float = MEAN, std: float = STD) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length.")
        self.images, self.labels = images, labels
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._transform(self.images[idx]), self.labels[idx]

    @property
    def data_range(self) -> tuple[float, float]:
        """The interval normalised pixels lie in (what adversarial examples are clamped to)."""
        return (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std


def collate_batch(batch: Any) -> Any:
    """Identity collate: ``__getitems__`` already returns a stacked batch.

    A single sample list (from ``__getitem__``, e.g. a sampler that yields one index) falls back to
    stacking.
    """
    if isinstance(batch, tuple):
        return batch
    return torch.utils.data.default_collate(batch)


def tensor_loader(dataset: TensorImageDataset, batch_size: int, shuffle: bool, drop_last: bool = False,
                  generator: torch.Generator | None = None) -> DataLoader:
    """A ``DataLoader`` that fetches whole batches by slicing (no workers needed)."""
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=collate_batch, num_workers=0)


@per_package
def fashion_mnist_datamodule_class(package: str) -> type:
    """The ``FashionMNISTDataModule`` class built on ``package``'s Lightning base class (one class per package)."""
    pl = lightning_package(package)

    class FashionMNISTDataModule(pl.LightningDataModule):
        """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from local files.

        Validation and test both use the official 10k test split unless ``val_size`` carves a
        validation set out of the training images (then training uses the rest).

        Args:
            batch_size: per-device training batch size.
            data_dir: directory to look in first (see :mod:`lightning_lbo.data` for the search order).
            download: allow torchvision to download when no local copy exists.
            eval_batch_size: batch size of validation/test loaders (defaults to ``batch_size``).
            val_size: number of training images held out for validation (0: use the test split).
            train_subset: use only the first N training images (tests, quick demos).
            drop_last: drop the last incomplete training batch (keeps every step at the same batch).
            seed: seed of the shuffling and of the validation split.

        Example::

            dm = FashionMNISTDataModule(batch_size=4096)
            trainer.fit(model, datamodule=dm)
        """

        def __init__(self, batch_size: int = 128, data_dir: str | None = None, download: bool = False,
                     eval_batch_size: int | None = None, val_size: int = 0, train_subset: int | None = None,
                     drop_last: bool = False, seed: int = 0) -> None:
            super().__init__()
            for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"Invalid {name}: {value!r}; use a positive integer.")
            if val_size < 0 or (train_subset is not None and train_subset < 1):
                raise ValueError(f"Invalid val_size={val_size} / train_subset={train_subset}: use val_size >= 0 "
                                 "and train_subset >= 1 (or None).")
            self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
            self.data_dir, self.download = data_dir, download
            self.val_size, self.train_subset = val_size, train_subset
            self.drop_last, self.seed = drop_last, seed
            self.files: FashionMNISTFiles | None = None
            self.train_set = self.val_set = self.test_set = None

        num_classes = 10
        input_shape = (1, 28, 28)
        data_range = DATA_RANGE

        @property
        def trainer(self) -> Any:
            return self._trainer

        @trainer.setter
        def trainer(self, trainer: Any) -> None:
            # The other package's Trainer would fail later with Lightning's bare "Expected a parent".
            if trainer is not None and not isinstance(trainer, pl.Trainer):
                other = package_of(trainer)
                raise TypeError(f"This FashionMNISTDataModule is a {package} LightningDataModule, but the Trainer is "
                                f"{other}'s: build the data module for {other} with lightning_lbo.data."
                                f"fashion_mnist_datamodule_class({other!r})(...).")
            self._trainer = trainer

        def prepare_data(self) -> None:
            locate_fashion_mnist(self.data_dir, self.download)

        def setup(self, stage: str | None = None) -> None:
            if self.train_set is not None:
                return
            self.files = locate_fashion_mnist(self.data_dir, self.download)
            images, labels = load_split(self.files, "train")
            if self.train_subset is not None:
                images, labels = images[: self.train_subset], labels[: self.train_subset]
            if self.val_size:
                if self.val_size >= images.shape[0]:
                    raise ValueError(f"val_size={self.val_size} leaves no training data ({images.shape[0]} images).")
                perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
                val_idx, train_idx = perm[: self.val_size], perm[self.val_size:]
                self.val_set = TensorImageDataset(images[val_idx], labels[val_idx])
                images, labels = images[train_idx], labels[train_idx]
            self.train_set = TensorImageDataset(images, labels)
            test_images, test_labels = load_split(self.files, "test")
            self.test_set = TensorImageDataset(test_images, test_labels)
            if self.val_set is None:
                self.val_set = self.test_set
            if self.batch_size > len(self.train_set):
                raise ValueError(f"batch_size={self.batch_size} exceeds the {len(self.train_set)} training images; "
                                 "lower it or use more data.")

        def train_dataloader(self) -> DataLoader:
            generator = torch.Generator().manual_seed(self.seed)
            return tensor_loader(self.train_set, self.batch_size, shuffle=True, drop_last=self.drop_last,
                                 generator=generator)

        def val_dataloader(self) -> DataLoader:
            return tensor_loader(self.val_set, self.eval_batch_size, shuffle=False)

        def test_dataloader(self) -> DataLoader:
            return tensor_loader(self.test_set, self.eval_batch_size, shuffle=False)

    return publish_per_package(FashionMNISTDataModule, __name__, package)


# The pytorch_lightning class, built on first access: importing this module imports no Lightning package.
__getattr__ = default_class_attribute(__name__, "FashionMNISTDataModule", fashion_mnist_datamodule_class)
