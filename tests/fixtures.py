"""Tiny on-disk datasets for tests (plain functions, import them from any test).

* :func:`write_idx_dataset` writes a small MNIST-style dataset (the four IDX files) that
  :class:`lit_cf.data.mnist.MNISTDataModule` / ``FashionMNISTDataModule`` load offline with
  their defaults; :func:`idx_fixture_arrays` returns the exact pixels and labels written.
* :func:`write_celeba_fixture` writes a small CelebA folder (JPEGs, a 40-attribute table with
  CRLF endings including rows of absent images, a partition file) that
  :class:`lit_cf.data.celeba.CelebADataModule` loads; :func:`celeba_fixture_spec` returns the
  tables written.

Everything is deterministic in ``seed``. The images are class dependent, so a tiny model can
learn something from them.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CELEBA_ATTRIBUTE_NAMES",
    "celeba_fixture_color",
    "celeba_fixture_spec",
    "idx_fixture_arrays",
    "write_celeba_fixture",
    "write_idx_dataset",
]

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


# --------------------------------------------------------------------------- IDX (MNIST)
def idx_fixture_arrays(n: int, seed: int = 0, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [n, 28, 28]`` and labels ``uint8 [n]`` of an IDX fixture split.

    Labels cycle over all ten classes in a seeded order. Class ``k`` draws a bright horizontal
    bar on rows ``2k+2 .. 2k+4`` (columns 4..23) and a dimmer vertical bar whose column depends
    on ``k`` too, over uniform background noise in ``[0, 60]``; bar pixels also get noise.
    ``offset`` decorrelates splits (train uses 0, test 1).
    """
    rng = np.random.default_rng([seed, offset])
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 61, size=(n, 28, 28)).astype(np.int16)
    for i, k in enumerate(labels.tolist()):
        images[i, 2 * k + 2 : 2 * k + 5, 4:24] += 170
        col = 3 + 2 * k
        images[i, 4:24, col : col + 2] += 110
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_dataset(
    root: str | os.PathLike[str],
    name: str = "MNIST",
    n_train: int = 64,
    n_test: int = 32,
    gz: bool = True,
    seed: int = 0,
) -> Path:
    """Write the four IDX files of a tiny MNIST-style dataset into ``root/name/raw/``.

    With ``gz=True`` only the gzipped files (``*-ubyte.gz``) are written, like a staged copy of
    the official release; the datamodule unpacks them on first use (offline, no md5 check). With
    ``gz=False`` the unpacked files are written and are loaded as they are. Either way
    ``MNISTDataModule(root=root)`` (``name="MNIST"``) or ``FashionMNISTDataModule(root=root)``
    (``name="FashionMNIST"``) loads them without network access, even with ``download=True``.

    Note: torchvision's own ``download=True`` path would md5-check ``.gz`` files against the
    official sums and then try the network; the datamodule never asks it to while all four
    files are present in either form.

    Returns:
        ``root`` as a :class:`~pathlib.Path` (what to pass as the datamodule's ``root``).
    """
    root = Path(root)
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = idx_fixture_arrays(n, seed=seed, offset=offset)
        for kind, array, idx in (("images", images, 3), ("labels", labels, 1)):
            filename = f"{prefix}-{kind}-idx{idx}-ubyte"
            data = _idx_bytes(array)
            if gz:
                # mtime=0: byte-identical files for identical arguments
                (raw / f"{filename}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (raw / filename).write_bytes(data)
    return root


# --------------------------------------------------------------------------- CelebA
CELEBA_ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


def celeba_fixture_spec(n: int = 24, seed: int = 0) -> dict[str, Any]:
    """The tables :func:`write_celeba_fixture` writes for ``n`` present images.

    Returns a dict with:

    * ``names``: all image names in the tables (``000001.jpg`` ...), ``n`` present plus
      ``max(2, n // 4)`` absent ones spread between them (every 5th id while they last);
    * ``present``: the names written as JPEGs;
    * ``attributes``: ``int8 [len(names), 40]`` in ``{-1, 1}`` (row order of ``names``);
    * ``partition``: ``int [len(names)]`` in ``{0, 1, 2}``, contiguous in id like the official
      file; about 60/20/20 % of the present images (train at least 1, val and test at least 1
      when ``n >= 3``);
    * ``attribute_names``: :data:`CELEBA_ATTRIBUTE_NAMES`.

    ``Smiling`` alternates over the present images (so every split of >= 2 images holds both
    values); the other attributes are random.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n_absent = max(2, n // 4)
    total = n + n_absent
    absent: set[int] = set()
    for i in range(total):  # every 5th id is absent while absentees are left, then the last ones
        if (i + 1) % 5 == 0 and len(absent) < n_absent:
            absent.add(i)
    for i in range(total - 1, -1, -1):
        if len(absent) >= n_absent:
            break
        absent.add(i)
    names = [f"{i + 1:06d}.jpg" for i in range(total)]
    rng = np.random.default_rng(seed)
    attributes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(total, len(CELEBA_ATTRIBUTE_NAMES)))
    smiling = CELEBA_ATTRIBUTE_NAMES.index("Smiling")
    n_val = max(1, round(0.2 * n)) if n >= 3 else 0
    n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    partition = np.zeros(total, dtype=np.int64)
    present: list[str] = []
    count = 0  # present images seen so far; absent ids take the split of the next present one
    for i in range(total):
        partition[i] = 0 if count < n_train else 1 if count < n_train + n_val else 2
        if i not in absent:
            attributes[i, smiling] = 1 if count % 2 == 0 else -1
            present.append(names[i])
            count += 1
    return {
        "names": names,
        "present": present,
        "attributes": attributes,
        "partition": partition,
        "attribute_names": CELEBA_ATTRIBUTE_NAMES,
    }


def celeba_fixture_color(name: str, seed: int = 0) -> tuple[int, int, int]:
    """Background RGB color of a fixture image (flat, so JPEG keeps it within a few levels)."""
    rng = np.random.default_rng([seed, int(name.split(".")[0])])
    return tuple(int(v) for v in rng.integers(30, 226, size=3))


def write_celeba_fixture(
    root: str | os.PathLike[str],
    n: int = 24,
    size: tuple[int, int] = (178, 218),
    seed: int = 0,
) -> Path:
    """Write a tiny CelebA folder under ``root/celeba`` (the layout of the official release).

    * ``img_align_celeba/``: ``n`` JPEGs of ``size`` (width, height): a flat background
      (:func:`celeba_fixture_color`) with a white "mouth" band in the lower middle on
      ``Smiling`` images and a dark one otherwise;
    * ``list_attr_celeba.txt``: count line, the 40 names, one row per image (present and
      absent ones) in the official format (``000001.jpg -1  1 ...``), CRLF line endings;
    * ``list_eval_partition.txt``: ``000001.jpg 0`` rows for every image, CRLF endings.

    See :func:`celeba_fixture_spec` for the tables. Returns ``root`` as a
    :class:`~pathlib.Path` (what to pass as the datamodule's ``root``).
    """
    from PIL import Image

    spec = celeba_fixture_spec(n, seed)
    root = Path(root)
    folder = root / "celeba"
    image_dir = folder / "img_align_celeba"
    image_dir.mkdir(parents=True, exist_ok=True)
    width, height = size
    smiling = CELEBA_ATTRIBUTE_NAMES.index("Smiling")
    row_of = {name: i for i, name in enumerate(spec["names"])}
    for name in spec["present"]:
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[...] = celeba_fixture_color(name, seed)
        band = 255 if spec["attributes"][row_of[name], smiling] == 1 else 0
        pixels[int(height * 0.68) : int(height * 0.76), int(width * 0.3) : int(width * 0.7)] = band
        Image.fromarray(pixels).save(image_dir / name, quality=95)

    lines = [str(len(spec["names"])), " ".join(CELEBA_ATTRIBUTE_NAMES) + " "]
    for name, row in zip(spec["names"], spec["attributes"]):
        lines.append(name + " " + " ".join(f"{int(v):2d}" for v in row))
    (folder / "list_attr_celeba.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))
    rows = [f"{name} {int(p)}" for name, p in zip(spec["names"], spec["partition"])]
    (folder / "list_eval_partition.txt").write_bytes(("\r\n".join(rows) + "\r\n").encode("ascii"))
    return root
