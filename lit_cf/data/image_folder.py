"""A folder of the user's own images: :class:`ImageFolderDataModule`.

Two layouts, told apart by the folder's content:

* **class subfolders** (as torchvision's ``ImageFolder``): ``root/<class>/<image>``; classes are
  the subfolder names in sorted order, labels their positions; images directly in ``root``
  are then ignored (with a warning). Subfolders holding no image are not classes.
* **flat**: images directly in ``root``, no labels (``label`` is ``-1``). The explain rules
  that need a label (``target: label``, ``select: correct|misclassified``, ``source_class``)
  say so; ``most_likely_other``, fixed targets and ``file`` work on the predictions.

Images are PNG, JPEG, BMP, WebP, GIF, TIFF or PPM/PGM (by suffix, case-insensitive), read with
Pillow, converted to ``channels`` (1: ``L``, 3: ``RGB``) per image, resized so the shorter
side is ``image_size`` (bilinear, antialiased) and centre-cropped to ``image_size`` squared:
``image`` is float ``[channels, image_size, image_size]`` in ``[0, 1]``, no normalisation
(models own it). Order is deterministic: sorted relative paths.

Splits: a seeded permutation of all images holds out ``test_fraction`` as ``test`` and
``val_fraction`` as ``val``; the rest is ``train``; ``all`` is every image in order (what
``lit-cf explain --split all`` reads). Each split keeps the folder order.

Every image is decoded once when the folder is first used (``check_images``), so a corrupt or
unreadable file fails with one error naming it before anything is written, or, with
``on_error: skip``, is left out with a warning naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from lit_cf.data.base import ImageDataModule, IndexedSubset
from lit_cf.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
ON_ERROR = ("raise", "skip")
FOLDER_SPLITS = ("train", "val", "test", "all")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files, labels (``-1`` when flat) and class names of ``root``, in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (give a folder of images, or of class subfolders of images)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [d for d in subdirs if any(_is_image(f) for f in d.rglob("*"))]
    top = sorted(p for p in root.iterdir() if _is_image(p))
    if classes:
        if top:
            warnings.warn(f"{root}: {len(top)} images beside the class subfolders are ignored (e.g. {top[0].name})", stacklevel=2)
        files, labels = [], []
        for k, d in enumerate(classes):
            found = sorted((f for f in d.rglob("*") if _is_image(f)), key=lambda p: p.relative_to(d).as_posix())
            files += found
            labels += [k] * len(found)
        return files, labels, [d.name for d in classes]
    if not top:
        raise UserError(
            f"no images in {root}: expected image files ({', '.join(IMAGE_SUFFIXES)}) directly in it or in class subfolders"
        )
    return top, [-1] * len(top), []


def load_image(path: str | Path, image_size: int, channels: int) -> Tensor:
    """One image as float ``[channels, image_size, image_size]`` in ``[0, 1]`` (resize + centre crop)."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
    im = TF.resize(im, image_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    im = TF.center_crop(im, [image_size, image_size])
    return TF.pil_to_tensor(im).float().div_(255.0)


class ImageFolderDataset(Dataset):
    """Images of a list of files with their labels; samples follow the lit-cf contract."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, channels: int) -> None:
        self.files, self.labels = list(files), list(labels)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        try:
            image = load_image(path, self.image_size, self.channels)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise UserError(f"cannot read image {path}: {err}") from err
        return {
            "image": image,
            "label": torch.tensor(self.labels[i], dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
        }


class ImageFolderDataModule(ImageDataModule):
    """The user's own images from a folder (class subfolders give labels; a flat folder has none).

    See :mod:`lit_cf.data.image_folder` for the layouts, the transform and the splits.

    Args:
        root: The image folder (or, with ``files``, only a name recorded for them).
        image_size: Side of the square images (shorter side resized to it, then centre crop).
        channels: 1 (grayscale) or 3 (RGB); every image is converted.
        val_fraction: Share of the images held out as ``val`` (seeded).
        test_fraction: Share of the images held out as ``test`` (seeded).
        files: Explicit image files instead of scanning ``root`` (no labels; kept in this order;
            ``root`` is then only recorded).
        on_error: ``raise`` (one error naming the corrupt or unreadable file) or ``skip`` it
            with a warning naming it.
        check_images: Decode every image once when the folder is first used (catches corrupt
            files before any output); off: a bad file fails when it is read.
        batch_size: Samples per batch.
        **kwargs: Loading options of :class:`~lit_cf.data.base.ImageDataModule`: ``num_workers``,
            ``seed`` (also of the split permutation), ``predict_split``, ``test_corruption``,
            ``corruption_severity`` and ``limit``.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        channels: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        files: list[str] | None = None,
        on_error: str = "raise",
        check_images: bool = True,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise UserError(f"image_size must be >= 1, got {image_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(
                f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got {val_fraction}, {test_fraction}"
            )
        if on_error not in ON_ERROR:
            raise UserError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
        self.root, self.image_size, self.channels_, self.on_error = root, image_size, channels, on_error
        self.val_fraction, self.test_fraction, self.check_images = val_fraction, test_fraction, check_images
        names: list[str]
        if files is not None:
            paths = [Path(f) for f in files]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise UserError(f"image files not found: {missing[:3]}")
            if not paths:
                raise UserError("the list of image files is empty")
            self.files, self.labels, names = paths, [-1] * len(paths), []
        elif root is None:
            raise UserError("ImageFolderDataModule needs root (a folder of images) or files (a list of image files)")
        else:
            self.files, self.labels, names = scan_folder(root)
        self.class_names = tuple(names)
        self.num_classes = len(names)  # 0: unlabelled (flat folder)
        self.image_shape = (channels, image_size, image_size)
        self._checked = False

    @property
    def split_names(self) -> tuple[str, ...]:
        return FOLDER_SPLITS

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def _check(self) -> None:
        """Decode every image once; raise on (or skip) the ones that cannot be read."""
        if self._checked or not self.check_images:
            return
        bad: list[tuple[Path, str]] = []
        for path in self.files:  # one decode per file, once: cheap next to any explanation
            try:
                with Image.open(path) as im:
                    im.load()
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
                bad.append((path, str(err).splitlines()[0] if str(err) else type(err).__name__))
        if bad and self.on_error == "raise":
            path, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"cannot read image {path}: {why}{more}; remove it or set on_error: skip")
        if bad:
            for path, why in bad:
                warnings.warn(f"skipping unreadable image {path}: {why}", stacklevel=2)
            keep = [i for i, p in enumerate(self.files) if p not in {b for b, _ in bad}]
            self.files = [self.files[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            if not self.files:
                raise UserError(f"no readable images in {self.root}")
        self._checked = True

    def split_positions(self, split: str) -> list[int]:
        """Positions (in folder order) of the images of ``split``."""
        self._check()
        n = len(self.files)
        if split == "all":
            return list(range(n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        k_test, k_val = int(round(n * self.test_fraction)), int(round(n * self.val_fraction))
        parts = {"test": perm[:k_test], "val": perm[k_test : k_test + k_val], "train": perm[k_test + k_val :]}
        return sorted(parts[split])

    def build_split(self, split: str) -> Dataset:
        self._check()
        full = ImageFolderDataset(self.files, self.labels, self.image_size, self.channels_)
        positions = self.split_positions(split)
        if not positions:
            raise UserError(
                f"split {split!r} of {self.root} is empty ({len(self.files)} images; val_fraction {self.val_fraction}, "
                f"test_fraction {self.test_fraction}): use split all or change the fractions"
            )
        return full if split == "all" else IndexedSubset(full, positions)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            root=str(Path(self.root).resolve()) if self.root else None,
            image_size=self.image_size,
            labelled=self.labelled,
            num_images=len(self.files),
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.seed,
        )
        return info


__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataModule", "ImageFolderDataset", "load_image", "scan_folder"]
