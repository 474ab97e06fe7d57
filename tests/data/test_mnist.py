"""MNIST / Fashion-MNIST datamodules on tiny IDX fixtures (offline)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import torchvision

from lit_cf.data.mnist import (
    FASHION_MNIST_CLASS_NAMES,
    IDX_FILES,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from tests.fixtures import idx_fixture_arrays, write_idx_dataset


@pytest.fixture
def no_download(monkeypatch):
    """Make torchvision's downloader fail like an offline machine (and record calls)."""
    calls = []

    def fail(self):
        calls.append(type(self).__name__)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error no network>")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail)
    return calls


@pytest.mark.parametrize("gz", [True, False])
def test_loads_fixture_offline_with_defaults(tmp_path, gz, no_download):
    root = write_idx_dataset(tmp_path, n_train=64, n_test=32, gz=gz)
    dm = MNISTDataModule(root=str(root), val_size=10)  # download=True by default
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [54, 10, 32]
    assert no_download == []  # the network was never tried
    raw = tmp_path / "MNIST" / "raw"
    assert all((raw / name).is_file() for name in IDX_FILES)  # .gz files were unpacked

    sample = dm.dataset("train")[3]
    assert set(sample) == {"image", "label", "index"}
    assert sample["image"].shape == (1, 28, 28) and sample["image"].dtype == torch.float32
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0
    assert sample["index"].dtype == torch.int64 and sample["index"].item() == 3


def test_test_split_matches_written_pixels(tmp_path):
    root = write_idx_dataset(tmp_path, n_train=40, n_test=20, seed=3)
    dm = MNISTDataModule(root=str(root), val_size=5)
    images, labels = idx_fixture_arrays(20, seed=3, offset=1)
    test = dm.dataset("test")
    for i in (0, 7, 19):
        s = test[i]
        assert s["index"].item() == i
        assert s["label"].item() == int(labels[i])
        assert torch.equal((s["image"][0] * 255).round().to(torch.uint8), torch.from_numpy(images[i]))
    all_images = torch.stack([test[i]["image"] for i in range(len(test))])
    assert all_images.min() >= 0.0 and all_images.max() <= 1.0
    assert all_images.max() > 0.9  # bars are bright: pixels are scaled by 1/255, not normalised


def test_train_val_split_is_disjoint_and_deterministic(tmp_path):
    root = write_idx_dataset(tmp_path, n_train=64, n_test=16)
    train_images, train_labels = idx_fixture_arrays(64, seed=0, offset=0)

    def split(seed):
        dm = MNISTDataModule(root=str(root), val_size=12, seed=seed)
        return dm, dm.train_val_indices()

    dm, (train_idx, val_idx) = split(0)
    assert len(val_idx) == 12 and len(train_idx) == 52
    assert sorted(train_idx + val_idx) == list(range(64))
    assert split(0)[1] == (train_idx, val_idx)
    assert split(1)[1][1] != val_idx

    val = dm.dataset("val")
    for pos in (0, 11):
        s = val[pos]
        src = val_idx[pos]
        assert s["index"].item() == pos  # index is the position within the split
        assert s["label"].item() == int(train_labels[src])
        assert torch.equal((s["image"][0] * 255).round().to(torch.uint8), torch.from_numpy(train_images[src]))


def test_loader_batches_and_limit(tmp_path):
    root = write_idx_dataset(tmp_path, n_train=64, n_test=32)
    dm = MNISTDataModule(root=str(root), val_size=8, batch_size=16, limit=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 28, 28)
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.int64
    assert len(dm.dataset("test")) == 20
    assert set(torch.cat([b["label"] for b in dm.test_dataloader()]).tolist()) <= set(range(10))


def test_fashion_mnist_uses_its_folder_and_names(tmp_path):
    write_idx_dataset(tmp_path, name="FashionMNIST", n_train=30, n_test=10, gz=False)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5)
    assert dm.class_names == FASHION_MNIST_CLASS_NAMES and dm.num_classes == 10
    assert len(dm.dataset("test")) == 10
    assert dm.describe()["dataset"] == "FashionMNIST"
    # the MNIST folder is absent, so MNIST reports it
    with pytest.raises(FileNotFoundError, match="MNIST"):
        MNISTDataModule(root=str(tmp_path), download=False).dataset("test")


def test_missing_files_without_download(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.dataset("train")
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    for name in IDX_FILES:
        assert name in msg
    assert "download=True" in msg and "copy" in msg


def test_missing_files_download_fails_offline(tmp_path, no_download):
    dm = MNISTDataModule(root=str(tmp_path))
    expected = r"t10k-labels-idx1-ubyte.*Downloading it with torchvision failed.*no network"
    with pytest.raises(FileNotFoundError, match=expected) as info:
        dm.prepare_data()
    assert no_download == ["MNIST"]
    assert isinstance(info.value.__cause__, RuntimeError)


def test_partially_missing_file_is_named(tmp_path):
    write_idx_dataset(tmp_path, gz=False)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte \("):
        MNISTDataModule(root=str(tmp_path), download=False).dataset("test")


def test_read_only_raw_folder_with_gz_only(tmp_path):
    write_idx_dataset(tmp_path, gz=True)
    raw = tmp_path / "MNIST" / "raw"
    os.chmod(raw, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        with pytest.raises(PermissionError, match=r"read-only.*[Cc]opy the dataset folder"):
            MNISTDataModule(root=str(tmp_path)).dataset("train")
        assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in IDX_FILES)  # nothing written
    finally:
        os.chmod(raw, stat.S_IRWXU)


def test_read_only_raw_folder_with_unpacked_files_loads(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=10, gz=False)
    raw = tmp_path / "MNIST" / "raw"
    os.chmod(raw, stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert len(MNISTDataModule(root=str(tmp_path), val_size=5).dataset("test")) == 10
    finally:
        os.chmod(raw, stat.S_IRWXU)


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(root=str(tmp_path), val_size=0)
    with pytest.raises(ValueError, match="predict_split"):
        MNISTDataModule(root=str(tmp_path), predict_split="nope")
    write_idx_dataset(tmp_path, n_train=20, n_test=5, gz=False)
    with pytest.raises(ValueError, match="val_size=20"):
        MNISTDataModule(root=str(tmp_path), val_size=20).dataset("val")
