"""Images already in memory (or saved as ``.safetensors``): :class:`TensorDataModule`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_cf.data.base import ImageDataModule
from lit_cf.errors import UserError


def check_images(images: Tensor, what: str = "images") -> Tensor:
    """A float batch ``[N, C, H, W]`` with finite pixels in ``[0, 1]`` (a single ``[C, H, W]`` is batched)."""
    if not isinstance(images, Tensor):
        raise UserError(f"{what} must be a tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[0] == 0:
        raise UserError(f"{what} must be a non-empty batch [N, C, H, W]; got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise UserError(
            f"{what} must hold finite pixels in [0, 1] (lit-cf models normalise inside); "
            f"got [{images.min():.3g}, {images.max():.3g}]"
        )
    return images


class _TensorDataset(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i, dtype=torch.long)}


class TensorDataModule(ImageDataModule):
    """A batch of images ``[N, C, H, W]`` in ``[0, 1]`` with optional labels; one split, ``all``.

    From Python: ``TensorDataModule.from_tensor(images, labels)``; from the command line: a
    ``.safetensors`` file with the tensor ``image`` (and optionally ``label``).

    Args:
        path: ``.safetensors`` file holding ``image`` ``[N, C, H, W]`` (and ``label`` ``[N]``).
        num_classes: Classes of the labels (0: unlabelled).
        batch_size: Samples per batch.
    """

    def __init__(self, path: str | None = None, num_classes: int = 0, batch_size: int = 64) -> None:
        super().__init__(batch_size=batch_size, predict_split="all")
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self.path = path
        if path is not None:
            from safetensors.torch import load_file

            if not Path(path).is_file():
                raise UserError(f"image tensor file not found: {path}")
            data = load_file(path)
            if "image" not in data:
                raise UserError(f"{path} holds no tensor named 'image'")
            self._set(data["image"], data.get("label"), num_classes)

    @classmethod
    def from_tensor(cls, images: Tensor, labels: Tensor | None = None, num_classes: int = 0) -> TensorDataModule:
        dm = cls(num_classes=num_classes)
        dm._set(images, labels, num_classes)
        return dm

    def _set(self, images: Tensor, labels: Tensor | None, num_classes: int) -> None:
        images = check_images(images)
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        labels = torch.as_tensor(labels).long().flatten()
        if len(labels) != len(images):
            raise UserError(f"{len(labels)} labels for {len(images)} images")
        self._images, self._labels = images, labels
        self.num_classes = num_classes
        c, h, w = images.shape[1:]  # check_images made it [N, C, H, W]
        self.image_shape = (c, h, w)

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("all",)

    def build_split(self, split: str) -> Dataset:
        if self._images is None or self._labels is None:
            raise UserError("TensorDataModule has no images: give path (a .safetensors file) or use from_tensor")
        return _TensorDataset(self._images, self._labels)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self._images is not None:
            info["num_images"] = len(self._images)
            info["images_sha256"] = hashlib.sha256(self._images.contiguous().numpy().tobytes()).hexdigest()
        return info


__all__ = ["TensorDataModule", "check_images"]
