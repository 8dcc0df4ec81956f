"""Fashion-MNIST loading: idx parsing, search order, slicing batches, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from lightning_lbo import data as lbo_data
from lightning_lbo.data import (
    DATA_RANGE,
    DataNotFoundError,
    FashionMNISTDataModule,
    TensorImageDataset,
    load_split,
    locate_fashion_mnist,
    tensor_loader,
)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _fake_dataset(directory, n_train=40, n_test=12, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=(n,))
        img_stem, lbl_stem = lbo_data.FILES[split]
        _write_idx(directory / img_stem, images, compress)
        _write_idx(directory / lbl_stem, labels, compress)
        arrays[split] = (images, labels)
    return arrays


def test_load_split_parses_idx_gz_and_plain(tmp_path):
    """Both .gz and uncompressed idx files give the bytes that were written."""
    for compress in (True, False):
        d = tmp_path / f"c{compress}"
        arrays = _fake_dataset(d, compress=compress)
        files = locate_fashion_mnist(d)
        images, labels = load_split(files, "train")
        assert images.shape == (40, 1, 28, 28) and images.dtype == torch.uint8
        np.testing.assert_array_equal(images[:, 0].numpy(), arrays["train"][0])
        np.testing.assert_array_equal(labels.numpy(), arrays["train"][1])


def test_locate_prefers_user_dir_then_torchvision_layout(tmp_path, monkeypatch):
    """A user directory wins over $LBO_DATA_DIR; torchvision's FashionMNIST/raw layout is found too."""
    user, env = tmp_path / "user", tmp_path / "env"
    _fake_dataset(user)
    _fake_dataset(env / "FashionMNIST" / "raw")
    monkeypatch.setenv("LBO_DATA_DIR", str(env))
    assert locate_fashion_mnist(user).directory == user
    assert locate_fashion_mnist(None).directory == env / "FashionMNIST" / "raw"


def test_locate_missing_data_names_every_fix(tmp_path, monkeypatch):
    """With no copy anywhere the error lists apt, data_dir and download."""
    monkeypatch.setattr(lbo_data, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.delenv("LBO_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        locate_fashion_mnist(tmp_path / "empty")
    assert "data_dir" in str(err.value) and "download=True" in str(err.value)


def test_truncated_idx_is_rejected(tmp_path):
    """A file shorter than its header says fails with the file named."""
    _fake_dataset(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_split(locate_fashion_mnist(tmp_path), "train")


def test_tensor_loader_batches_by_slicing_and_normalises():
    """A batch equals the normalised slice of the indices the sampler drew; every sample once per epoch."""
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50)
    ds = TensorImageDataset(images, labels)
    batches = list(tensor_loader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(50))
    x, y = batches[0]
    expected = (images[y].float() / 255 - lbo_data.MEAN) / lbo_data.STD
    torch.testing.assert_close(x, expected)
    lo, hi = DATA_RANGE
    assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6


def test_datamodule_real_fashion_mnist_sizes():
    """The real data set (Debian package, installed by `make test`) has 60k/10k images in 10 classes."""
    dm = FashionMNISTDataModule(batch_size=4096)
    dm.setup("fit")
    assert len(dm.train_set) == 60000 and len(dm.test_set) == 10000
    assert dm.train_set.labels.bincount().tolist() == [6000] * 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4096, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Normalised with the training set's statistics: mean ~0, std ~1 over a large batch.
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_datamodule_validation_split_and_bad_input(tmp_path):
    """val_size carves a disjoint validation set; bad sizes fail with the argument named."""
    _fake_dataset(tmp_path, n_train=40)
    dm = FashionMNISTDataModule(batch_size=8, data_dir=str(tmp_path), val_size=10)
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="exceeds"):
        FashionMNISTDataModule(batch_size=64, data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="leaves no training data"):
        FashionMNISTDataModule(batch_size=8, data_dir=str(tmp_path), val_size=40).setup("fit")


def test_datamodule_of_the_other_package_says_which_class_to_use(pl_package, tmp_path):
    """A data module built on one Lightning package, given to the other's Trainer: an error naming the factory."""
    from lightning_lbo.classifier import classifier_module_class
    from lightning_lbo.data import fashion_mnist_datamodule_class
    from tests.conftest import make_trainer

    name = pl_package.__name__
    other = "lightning.pytorch" if name == "pytorch_lightning" else "pytorch_lightning"
    module = classifier_module_class(name)("mlp", model_kwargs={"hidden": (8,)})
    trainer = make_trainer(pl_package, tmp_path, fast_dev_run=1)
    with pytest.raises(TypeError, match=rf"is a {other} LightningDataModule, but the Trainer is {name}'s: .*"
                                        rf"fashion_mnist_datamodule_class\('{name}'\)"):
        trainer.fit(module, datamodule=fashion_mnist_datamodule_class(other)(batch_size=32, train_subset=64))
    dm = fashion_mnist_datamodule_class(name)(batch_size=32, train_subset=64)  # the named class trains
    make_trainer(pl_package, tmp_path, fast_dev_run=1).fit(module, datamodule=dm)
    assert dm.trainer is not None
