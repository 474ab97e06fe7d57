"""CelebA (aligned & cropped faces) from a folder that may hold only a subset of the images.

Expected layout, as in the official release (and torchvision's ``base_folder``)::

    <root>/celeba/img_align_celeba/000001.jpg ...   # any subset of the 202,599 images
    <root>/celeba/list_attr_celeba.txt              # count line, 40 names, "000001.jpg -1  1 ..."
    <root>/celeba/list_eval_partition.txt           # "000001.jpg 0" (0 train, 1 val, 2 test)

``torchvision.datasets.CelebA`` cannot read such a folder (it wants the bbox and landmark files
and every image), hence this loader. Only the images present on disk are used: the image folder
is listed once and only the annotation rows of those images are parsed (the other rows of the
26 MB attribute table are skipped after reading their first field). Images without an
attribute or partition row are skipped with a warning. Both text files may use LF or CRLF line
endings; fields are separated by one or more spaces. The attribute table may omit the count
line.

Samples: ``image`` float ``[3, image_size, image_size]`` in ``[0, 1]``; ``label`` the binary
``target_attribute`` (1 when the attribute is present); ``attributes`` float ``[40]`` in
``{0, 1}`` (all attributes in the file's order, :attr:`CelebADataModule.attribute_names`);
``index`` the position in the split. Within a split, images are ordered by file name.

Image transform: the JPEG is decoded lazily in ``__getitem__`` (RGB, with Pillow),
center-cropped to a square of side ``min(H, W)`` (178x178 for the official 178x218 images,
i.e. the full width, dropping 20 rows at the top and bottom) and resized to ``image_size`` x
``image_size`` with bilinear interpolation and antialiasing. No normalisation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lit_cf.data.base import ImageDataModule

__all__ = [
    "ATTR_FILE",
    "CELEBA_FOLDER",
    "IMAGE_FOLDER",
    "PARTITION_FILE",
    "PARTITIONS",
    "CelebAAnnotations",
    "CelebADataModule",
    "CelebADataset",
    "load_celeba_annotations",
    "load_celeba_image",
    "read_attribute_names",
]

CELEBA_FOLDER = "celeba"
IMAGE_FOLDER = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
#: Split name -> value in ``list_eval_partition.txt``.
PARTITIONS = {"train": 0, "val": 1, "test": 2}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _layout_message(folder: Path) -> str:
    return (
        f"expected {folder}/ holding {IMAGE_FOLDER}/*.jpg (any subset of the aligned images), "
        f"{ATTR_FILE} and {PARTITION_FILE}, laid out as in the official CelebA release"
    )


def _check_layout(root: str | os.PathLike[str]) -> Path:
    """Return ``<root>/celeba`` after checking that the folder and its three entries exist."""
    folder = Path(root) / CELEBA_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"CelebA folder not found: {_layout_message(folder)}")
    missing = [name for name in (IMAGE_FOLDER,) if not (folder / name).is_dir()]
    missing += [name for name in (ATTR_FILE, PARTITION_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CelebA files missing: {', '.join(missing)} not found; {_layout_message(folder)}")
    return folder


def _lines(path: Path) -> Generator[str, None, None]:
    # universal newlines: CRLF and LF files read alike
    with open(path, encoding="utf-8", newline=None) as f:
        yield from f


def _parse_header(lines: Iterator[str], path: Path) -> tuple[str, ...]:
    """Consume the optional count line and the attribute-name line; return the names."""
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1 and fields[0].isdigit():  # the image count line
            continue
        if fields[0].lower().endswith(_IMAGE_SUFFIXES):
            break  # a data row: the names line is missing
        return tuple(fields)
    raise ValueError(f"{path}: no attribute-name line found (expected a count line, then the attribute names)")


def read_attribute_names(root: str | os.PathLike[str]) -> tuple[str, ...]:
    """Attribute names from the header of ``<root>/celeba/list_attr_celeba.txt``."""
    path = _check_layout(root) / ATTR_FILE
    lines = _lines(path)
    try:
        return _parse_header(lines, path)
    finally:
        lines.close()


@dataclass(frozen=True)
class CelebAAnnotations:
    """The annotations of the images present on disk, per split (names sorted).

    Attributes:
        folder: The ``<root>/celeba`` folder.
        attribute_names: Attribute names in file order.
        files: Split -> image file names.
        attributes: Split -> float tensor ``[N, len(attribute_names)]`` in ``{0, 1}``.
    """

    folder: Path
    attribute_names: tuple[str, ...]
    files: dict[str, list[str]]
    attributes: dict[str, Tensor]

    @property
    def image_folder(self) -> Path:
        return self.folder / IMAGE_FOLDER


def load_celeba_annotations(root: str | os.PathLike[str]) -> CelebAAnnotations:
    """List the images in ``<root>/celeba/img_align_celeba`` and read their annotation rows."""
    folder = _check_layout(root)
    image_dir = folder / IMAGE_FOLDER
    with os.scandir(image_dir) as entries:
        present = {e.name for e in entries if e.name.lower().endswith(_IMAGE_SUFFIXES)}
    if not present:
        raise FileNotFoundError(f"no images (*.jpg) in {image_dir}; {_layout_message(folder)}")

    attr_path = folder / ATTR_FILE
    lines = _lines(attr_path)
    names = _parse_header(lines, attr_path)
    n_attr = len(names)
    rows: dict[str, list[float]] = {}
    for line in lines:
        head = line.split(maxsplit=1)
        if not head or head[0] not in present:
            continue
        values = head[1].split() if len(head) > 1 else []
        if len(values) != n_attr:
            raise ValueError(f"{attr_path}: row of {head[0]} has {len(values)} values, expected {n_attr}")
        try:
            rows[head[0]] = [_attribute_value(v) for v in values]
        except ValueError:
            raise ValueError(f"{attr_path}: row of {head[0]} has values other than -1/0/1: {values}") from None

    part_path = folder / PARTITION_FILE
    partition: dict[str, int] = {}
    valid = set(PARTITIONS.values())
    for line in _lines(part_path):
        fields = line.split()
        if len(fields) < 2 or fields[0] not in present:
            continue
        try:
            value = int(fields[1])
        except ValueError:
            value = -1
        if value not in valid:
            raise ValueError(f"{part_path}: partition of {fields[0]} is {fields[1]!r}, expected 0, 1 or 2")
        partition[fields[0]] = value

    unlabelled = sorted(n for n in present if n not in rows or n not in partition)
    if unlabelled:
        warnings.warn(
            f"{len(unlabelled)} of {len(present)} images in {image_dir} have no row in {ATTR_FILE} or "
            f"{PARTITION_FILE} and are skipped (e.g. {', '.join(unlabelled[:3])})",
            stacklevel=2,
        )
    files: dict[str, list[str]] = {}
    attributes: dict[str, Tensor] = {}
    for split, value in PARTITIONS.items():
        split_files = sorted(n for n in rows if partition.get(n) == value)
        files[split] = split_files
        attributes[split] = torch.tensor([rows[n] for n in split_files], dtype=torch.float32).reshape(-1, n_attr)
    return CelebAAnnotations(folder=folder, attribute_names=names, files=files, attributes=attributes)


def _attribute_value(token: str) -> float:
    value = int(token)
    if value not in (-1, 0, 1):
        raise ValueError(token)
    return 1.0 if value == 1 else 0.0


def _check_attribute(target_attribute: str, names: Sequence[str]) -> int:
    if target_attribute not in names:
        raise ValueError(f"unknown CelebA attribute {target_attribute!r}; choose one of {list(names)}")
    return list(names).index(target_attribute)


def load_celeba_image(path: str | os.PathLike[str], image_size: int) -> Tensor:
    """Decode an image file to float ``[3, image_size, image_size]`` in ``[0, 1]``.

    Center crop to a ``min(H, W)`` square, then bilinear resize with antialiasing (Pillow's
    resampling filters scale their support when downsampling). Pillow decodes: torchvision's
    ``torchvision.io`` image decoders are deprecated since 0.29.
    """
    with Image.open(path) as raw:
        img = raw.convert("RGB")
    w, h = img.size
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != image_size:
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.array(img, dtype=np.uint8)  # [H, W, 3], a fresh writable copy
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)


class CelebADataset(Dataset):
    """One official split of the CelebA images present on disk.

    Args:
        root: Data root holding the ``celeba`` folder (see the module docstring).
        split: ``train``, ``val`` or ``test`` (official partition 0, 1, 2).
        target_attribute: Attribute used as the binary ``label``.
        image_size: Side of the square output images.
        annotations: Pre-loaded annotations of ``root`` (shared between splits); loaded from
            ``root`` when None.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "data",
        split: str = "train",
        target_attribute: str = "Smiling",
        image_size: int = 64,
        annotations: CelebAAnnotations | None = None,
    ) -> None:
        if split not in PARTITIONS:
            raise ValueError(f"unknown CelebA split {split!r}; choose one of {list(PARTITIONS)}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if annotations is None:
            names = read_attribute_names(root)  # fails fast, before the full table is read
            _check_attribute(target_attribute, names)
            annotations = load_celeba_annotations(root)
        self.target_index = _check_attribute(target_attribute, annotations.attribute_names)
        self.split = split
        self.target_attribute = target_attribute
        self.image_size = image_size
        self.attribute_names = annotations.attribute_names
        self.image_folder = annotations.image_folder
        self.files = annotations.files[split]
        if not self.files:
            raise FileNotFoundError(
                f"no CelebA images of split {split!r} (partition {PARTITIONS[split]} in {PARTITION_FILE}) "
                f"are present in {self.image_folder}; the folder holds images of "
                f"{[s for s, f in annotations.files.items() if f] or 'no split'}"
            )
        self.attributes = annotations.attributes[split]
        self.labels = self.attributes[:, self.target_index].long()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": load_celeba_image(self.image_folder / self.files[i], self.image_size),
            "label": self.labels[i],
            "index": torch.tensor(i, dtype=torch.long),
            "attributes": self.attributes[i],
        }


class CelebADataModule(ImageDataModule):
    """CelebA faces with a binary target attribute (default ``Smiling``), official partition.

    Splits ``train``, ``val``, ``test`` hold the present images of partitions 0, 1, 2. Samples
    carry ``attributes`` (all 40 attributes as ``{0, 1}``). See the module docstring for the
    layout and the transform (center crop to 178x178, antialiased resize to ``image_size``).
    The layout and the attribute name are checked on construction; the annotation rows are
    read once, when the first split is built.

    Args:
        root: Data root holding the ``celeba`` folder.
        target_attribute: Attribute used as the label; ``class_names`` are
            ``("not <attribute>", "<attribute>")``.
        image_size: Side of the square images (``image_shape`` is ``(3, image_size, image_size)``).
        **kwargs: Loading options of :class:`~lit_cf.data.base.ImageDataModule`: ``batch_size``,
            ``num_workers``, ``seed``, ``predict_split``, ``test_corruption``,
            ``corruption_severity`` and ``limit``.
    """

    num_classes = 2
    image_shape = (3, 64, 64)

    def __init__(
        self,
        root: str = "data",
        target_attribute: str = "Smiling",
        image_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        super().__init__(**kwargs)
        self.root = str(root)
        self.image_size = image_size
        self.attribute_names = read_attribute_names(self.root)
        _check_attribute(target_attribute, self.attribute_names)
        self.target_attribute = target_attribute
        self.class_names = (f"not {target_attribute}", target_attribute)
        self.image_shape = (3, image_size, image_size)
        self._annotations: CelebAAnnotations | None = None

    @property
    def annotations(self) -> CelebAAnnotations:
        """Annotations of the present images (read on first use)."""
        if self._annotations is None:
            self._annotations = load_celeba_annotations(self.root)
        return self._annotations

    def build_split(self, split: str) -> Dataset:
        return CelebADataset(self.root, split, self.target_attribute, self.image_size, annotations=self.annotations)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(dataset="CelebA", target_attribute=self.target_attribute, image_size=self.image_size)
        return info
