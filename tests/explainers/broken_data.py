"""Datamodules with deliberately bad images, for explain's input checks."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lit_cf.data.rendered import RenderedDigitsDataModule


class _Broken(Dataset):
    def __init__(self, base: Dataset, mode: str) -> None:
        self.base, self.mode = base, mode

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        if self.mode == "rgb":
            sample["image"] = sample["image"].expand(3, -1, -1).clone()
        elif self.mode == "big":
            sample["image"] = torch.nn.functional.pad(sample["image"], (2, 2, 2, 2))
        elif self.mode == "nan" and i == 3:
            sample["image"] = sample["image"].clone()
            sample["image"][0, 0, 0] = float("nan")
        return sample


class BrokenDigits(RenderedDigitsDataModule):
    """Rendered digits turned RGB (``rgb``), padded to 32 px (``big``) or with a NaN in image 3 (``nan``)."""

    def __init__(self, mode: str = "rgb", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def build_split(self, split: str) -> Dataset:
        return _Broken(super().build_split(split), self.mode)


class TrainSplitForbidden(RenderedDigitsDataModule):
    """Rendered digits whose training split raises on any use: data-free methods must never read it."""

    def build_split(self, split: str) -> Dataset:
        if split == "train":
            raise AssertionError("the training split was read")
        return super().build_split(split)

    def train_dataloader(self):
        raise AssertionError("the training dataloader was requested")
