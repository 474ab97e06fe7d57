"""MNIST and Fashion-MNIST datamodules (torchvision's IDX files, loaded offline-first).

Layout on disk is torchvision's: ``<root>/MNIST/raw/`` (or ``<root>/FashionMNIST/raw/``) holds
the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each either unpacked or as ``.gz``.

How the files are made ready (:meth:`TorchvisionIDXDataModule.prepare_data`, also run lazily
before the first split is built):

1. all four unpacked files present: nothing to do, nothing is written and the network is never
   touched;
2. otherwise, if every missing file has its ``.gz`` next to it: the ``.gz`` files are unpacked
   in place (plain gzip, no md5 check and no network; each file is written to a temporary name
   and renamed, so an interrupted unpack never looks complete). This needs a writable ``raw``
   folder: a read-only one (no write permission bits, or not writable for this user, e.g. a
   read-only mount) raises :class:`PermissionError` telling you to copy the dataset folder into
   a writable data root (or to unpack the files there yourself);
3. otherwise the files are missing: with ``download=False`` a :class:`FileNotFoundError` names
   the folder and the expected files; with ``download=True`` torchvision's downloader is tried,
   and if it fails (no network) the same :class:`FileNotFoundError` is raised, chained to the
   download error.

Loading goes through ``torchvision.datasets.MNIST``/``FashionMNIST`` (``download=False``); the
whole ``uint8`` tensor of a split is converted to float once, so ``__getitem__`` is a tensor
slice (no PIL). The official train split is divided into ``train`` and ``val``: ``val_size``
images are held out by a seeded permutation (:func:`lit_cf.data.base.split_indices`), so the
split depends on ``seed`` only. ``test`` is the official test split (10,000 images).
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets

from lit_cf.data.base import ImageDataModule, IndexedSubset, split_indices
from lit_cf.errors import UserError
from lit_cf.runs.atomic import atomic_write

__all__ = [
    "FASHION_MNIST_CLASS_NAMES",
    "IDX_FILES",
    "MNIST_CLASS_NAMES",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "TensorImageDataset",
    "TorchvisionIDXDataModule",
]

#: The four IDX files of MNIST-style datasets (unpacked names; ``.gz`` versions also accepted).
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST_CLASS_NAMES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class TensorImageDataset(Dataset):
    """Samples ``{"image", "label", "index"}`` served from in-memory tensors.

    Args:
        images: Float tensor ``[N, C, H, W]`` with pixels in ``[0, 1]``.
        labels: Integer tensor ``[N]`` of class indices.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.images[i],
            "label": self.labels[i],
            "index": torch.tensor(i, dtype=torch.long),
        }


def _is_writable_dir(path: Path) -> bool:
    """Whether files may be created in ``path``.

    A folder without any write permission bit counts as read-only even for root (who could
    write it anyway): staged data marked read-only must not be modified.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if not mode & 0o222:
        return False
    # access(2) also reports read-only mounts (EROFS)
    return os.access(path, os.W_OK | os.X_OK)


class TorchvisionIDXDataModule(ImageDataModule):
    """Shared base of the MNIST-style datamodules (grayscale 28x28, ten classes, IDX files).

    Subclasses set ``torchvision_cls`` (e.g. ``torchvision.datasets.MNIST``, whose class name
    is also the dataset folder under ``root``) and ``class_names``.

    Splits: ``train`` (official train split minus the held-out images), ``val`` (``val_size``
    images held out of the official train split by a permutation seeded with ``seed``) and
    ``test`` (official test split). Samples: ``image`` float ``[1, 28, 28]`` in ``[0, 1]``,
    ``label`` and ``index`` (position in the split).

    Args:
        root: Data root; the files are read from ``<root>/<MNIST|FashionMNIST>/raw/``.
        download: Whether torchvision may download missing files (only tried when neither the
            unpacked nor the ``.gz`` version of a file is present).
        val_size: Number of images held out of the official train split for ``val`` (>= 1).
        **kwargs: Loading options of :class:`~lit_cf.data.base.ImageDataModule`: ``batch_size``,
            ``num_workers``, ``seed``, ``predict_split``, ``test_corruption``,
            ``corruption_severity`` and ``limit``.
    """

    torchvision_cls: type[datasets.MNIST] = datasets.MNIST
    num_classes = 10
    image_shape = (1, 28, 28)
    class_names = MNIST_CLASS_NAMES

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        val_size: int = 5000,
        **kwargs: Any,
    ) -> None:
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        super().__init__(**kwargs)
        self.root = str(root)
        self.download = download
        self.val_size = val_size
        self._official: dict[bool, TensorImageDataset] = {}
        self._train_val: tuple[list[int], list[int]] | None = None

    # ----------------------------------------------------------------- files
    @property
    def dataset_name(self) -> str:
        """Folder name under ``root`` (torchvision's class name: ``MNIST``, ``FashionMNIST``)."""
        return self.torchvision_cls.__name__

    @property
    def raw_folder(self) -> Path:
        return Path(self.root) / self.dataset_name / "raw"

    def _missing_message(self, missing: list[str], reason: str = "") -> str:
        raw = self.raw_folder
        expected = ", ".join(f"{name}[.gz]" for name in IDX_FILES)
        fix = (
            f"To fix: copy a staged copy of the dataset folder to {Path(self.root) / self.dataset_name} "
            f"(e.g. `cp -r /path/to/staged/{self.dataset_name} {self.root}/ && "
            f"chmod -R u+w {Path(self.root) / self.dataset_name}`)"
        )
        fix += " or run with network access." if self.download else ", or pass download=True to download it."
        return (
            f"{self.dataset_name} data not found in {raw}/: missing {', '.join(missing)} "
            f"(expected the 4 IDX files {expected}, each unpacked or gzipped). {reason}{fix}"
        )

    def prepare_data(self) -> None:
        """Make the four unpacked IDX files available (unpack ``.gz`` or download; see module doc)."""
        raw = self.raw_folder
        missing = [name for name in IDX_FILES if not (raw / name).is_file()]
        if not missing:
            return
        packed = [name for name in missing if (raw / f"{name}.gz").is_file()]
        if len(packed) == len(missing):
            self._unpack(packed)
            return
        absent = [name for name in missing if name not in packed]
        if not self.download:
            raise FileNotFoundError(self._missing_message(absent))
        created = _missing_ancestors(raw)  # folders the download creates; removed if it fails
        try:
            # torchvision downloads (and md5-checks) the .gz files, then unpacks them
            self.torchvision_cls(self.root, train=True, download=True)
        except Exception as err:  # no network, read-only root, bad mirror, ...
            for folder in created:
                shutil.rmtree(folder, ignore_errors=True)
            reason = f"Downloading it with torchvision failed ({type(err).__name__}: {_one_line(err)}). "
            raise FileNotFoundError(self._missing_message(absent, reason)) from err
        still = [name for name in IDX_FILES if not (raw / name).is_file()]
        if still:
            raise FileNotFoundError(self._missing_message(still, "The download finished but did not produce them. "))

    def _unpack(self, names: list[str]) -> None:
        raw = self.raw_folder
        if not _is_writable_dir(raw):
            raise PermissionError(self._read_only_message(names))
        for name in names:
            source = raw / f"{name}.gz"

            def unpack(tmp: Path, source: Path = source) -> None:
                with open(tmp, "wb") as out, gzip.open(source, "rb") as packed:
                    shutil.copyfileobj(packed, out, length=1 << 20)

            try:
                atomic_write(raw / name, unpack)
            except (OSError, EOFError, zlib.error) as err:
                if isinstance(err, PermissionError) or getattr(err, "errno", None) == errno.EROFS:
                    raise PermissionError(self._read_only_message(names)) from err
                if getattr(err, "errno", None) == errno.ENOSPC:
                    raise
                raise UserError(
                    f"could not unpack {source}: {_one_line(err)}; the file is truncated or corrupt: "
                    "replace it with an intact copy"
                ) from err

    def _read_only_message(self, names: list[str]) -> str:
        raw = self.raw_folder
        return (
            f"{raw}/ holds {', '.join(f'{n}.gz' for n in names)} but not the unpacked files, and the folder "
            f"is read-only, so they cannot be unpacked there. Copy the dataset folder into a writable "
            f"data root and point root at it, e.g. `mkdir -p /tmp/data && cp -r "
            f"{Path(self.root) / self.dataset_name} /tmp/data/ && chmod -R u+w /tmp/data/{self.dataset_name}` "
            f"and root='/tmp/data' (cp keeps read-only modes, hence the chmod; a folder without write "
            f"permission bits is left alone even by root). Or unpack them yourself (`gunzip -k {raw}/*.gz`)."
        )

    # ----------------------------------------------------------------- splits
    def _official_split(self, train: bool) -> TensorImageDataset:
        """The official train (``train=True``) or test split as float tensors (cached)."""
        if train not in self._official:
            self.prepare_data()
            try:
                ds = self.torchvision_cls(self.root, train=train, download=False)
            except (AssertionError, ValueError, RuntimeError, EOFError) as err:
                # torchvision's IDX reader asserts on a bad magic number and fails on short files
                raise UserError(
                    f"cannot read the {self.dataset_name} {'train' if train else 'test'} files in {self.raw_folder}: "
                    f"they are damaged or not IDX files ({type(err).__name__}: {_one_line(err) or 'bad header'}); "
                    "replace them with intact copies"
                ) from err
            data, targets = ds.data, ds.targets
            if data.ndim != 3 or tuple(data.shape[1:]) != self.image_shape[1:] or len(data) != len(targets):
                raise ValueError(
                    f"unexpected {self.dataset_name} {'train' if train else 'test'} tensors in {self.raw_folder}: "
                    f"images {tuple(data.shape)}, labels {tuple(targets.shape)}"
                )
            images = data.unsqueeze(1).to(torch.float32).div_(255.0)
            self._official[train] = TensorImageDataset(images, targets.long())
        return self._official[train]

    def train_val_indices(self) -> tuple[list[int], list[int]]:
        """Indices into the official train split of ``train`` and ``val`` (sorted, disjoint)."""
        if self._train_val is None:
            n = len(self._official_split(True))
            if self.val_size >= n:
                raise ValueError(f"val_size={self.val_size} must be smaller than the official train split ({n} images)")
            rest, held = split_indices(n, self.val_size / n, self.seed)
            if len(held) != self.val_size:  # guards the fraction round trip
                raise RuntimeError(f"held out {len(held)} images instead of val_size={self.val_size}")
            self._train_val = (rest, held)
        return self._train_val

    def build_split(self, split: str) -> Dataset:
        if split == "test":
            return self._official_split(False)
        train_idx, val_idx = self.train_val_indices()
        return IndexedSubset(self._official_split(True), train_idx if split == "train" else val_idx)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(dataset=self.dataset_name, val_size=self.val_size, seed=self.seed)
        return info


class MNISTDataModule(TorchvisionIDXDataModule):
    """MNIST handwritten digits (classes ``"0"`` ... ``"9"``); see :class:`TorchvisionIDXDataModule`."""

    torchvision_cls = datasets.MNIST
    class_names = MNIST_CLASS_NAMES


class FashionMNISTDataModule(TorchvisionIDXDataModule):
    """Fashion-MNIST clothing images (ten classes, :data:`FASHION_MNIST_CLASS_NAMES`).

    See :class:`TorchvisionIDXDataModule`; files are read from ``<root>/FashionMNIST/raw/``.
    """

    torchvision_cls = datasets.FashionMNIST
    class_names = FASHION_MNIST_CLASS_NAMES


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _missing_ancestors(path: Path) -> list[Path]:
    """The outermost folder of ``path`` that does not exist yet (empty if all exist)."""
    top = None
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        top, probe = probe, probe.parent
    return [top] if top is not None else []
