"""Procedurally rendered digits with known generative factors (lit-cf's default data).

Every image is drawn from a handful of numbers, so the ground truth of what changes an image
is known exactly. The family spans three modules:

* :mod:`lit_cf.data.rendered_factors`: the seven factors (``thickness``, ``slant``,
  ``scale``, ``shift_x``, ``shift_y``, ``intensity``, ``mark``), their counter-based sampling
  (any sample can be drawn on its own) and the planted shortcut rule;
* :mod:`lit_cf.data.rendered_glyphs`: the digit skeletons and the rasteriser
  (:func:`render_digits`);
* this module: the cached dataset :class:`RenderedDigits` and the datamodule
  :class:`RenderedDigitsDataModule`. Every public name of the other two is importable from
  here as well (``from lit_cf.data.rendered import FACTOR_NAMES, render_digits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_cf.data.base import ImageDataModule
from lit_cf.data.rendered_factors import (
    FACTOR_NAMES,
    FACTOR_RANGES,
    INTENSITY_HIGH,
    SHORTCUT_FACTORS,
    check_shortcut,
    factor_column,
    normalize_factors,
    sample_factors,
)
from lit_cf.data.rendered_glyphs import CANVAS, MARK_SIZE, digit_skeletons, render_digits

__all__ = [
    "CANVAS",
    "CLASS_NAMES",
    "FACTOR_NAMES",
    "FACTOR_RANGES",
    "INTENSITY_HIGH",
    "MARK_SIZE",
    "SHORTCUT_FACTORS",
    "RenderedDigits",
    "RenderedDigitsDataModule",
    "digit_skeletons",
    "normalize_factors",
    "render_digits",
    "sample_factors",
]

CLASS_NAMES = tuple(str(i) for i in range(10))


class RenderedDigits(Dataset):
    """A split of rendered digits, generated in batches and cached in memory.

    Args:
        size: Number of samples.
        split: Name of the random stream (``train``, ``val``, ``test`` or any other string);
            clean and shortcut versions of one split share it.
        seed: Data seed.
        shortcut_class: Class correlated with the shortcut factor, or ``None`` for clean data.
        shortcut_strength: ``s`` in ``[0, 1]`` of the shortcut rule (:mod:`lit_cf.data.rendered_factors`).
        shortcut_factor: ``"mark"`` or ``"intensity"``.
        mark_rate: Base rate of the mark.
        chunk_size: Samples rendered at once.
    """

    factor_names = FACTOR_NAMES
    class_names = CLASS_NAMES

    def __init__(
        self,
        size: int,
        split: str = "train",
        seed: int = 0,
        shortcut_class: int | None = None,
        shortcut_strength: float = 0.0,
        shortcut_factor: str = "mark",
        mark_rate: float = 0.1,
        chunk_size: int = 2048,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        check_shortcut(shortcut_class, shortcut_strength, shortcut_factor)
        self.size = int(size)
        self.split = split
        self.seed = seed
        self.shortcut_class = shortcut_class
        self.shortcut_strength = float(shortcut_strength)
        self.shortcut_factor = shortcut_factor
        self.mark_rate = float(mark_rate)
        self.labels, self.factors = self._factors(torch.arange(self.size))
        self.images = render_digits(self.labels, self.factors, chunk_size=chunk_size)
        self._index = torch.arange(self.size, dtype=torch.long)

    def _factors(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return sample_factors(
            indices,
            split=self.split,
            seed=self.seed,
            shortcut_class=self.shortcut_class,
            shortcut_strength=self.shortcut_strength,
            shortcut_factor=self.shortcut_factor,
            mark_rate=self.mark_rate,
        )

    def generate(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Regenerate samples from scratch (no cache): ``(images, labels, factors)``."""
        labels, factors = self._factors(torch.as_tensor(indices, dtype=torch.long))
        return render_digits(labels, factors), labels, factors

    @property
    def shortcut_state(self) -> Tensor:
        """``[N]`` bool: whether the shortcut factor is in its "on" state for each sample."""
        if self.shortcut_factor == "intensity":
            return self.factors[:, factor_column("intensity")] >= INTENSITY_HIGH
        return self.factors[:, factor_column("mark")] > 0.5

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        i = i % self.size if self.size else i
        return {
            "image": self.images[i],
            "label": self.labels[i],
            "index": self._index[i],
            "factors": self.factors[i],
        }


class RenderedDigitsDataModule(ImageDataModule):
    """Digits rendered from known factors, optionally with a planted shortcut.

    Splits: ``train``, ``val`` and ``test`` (clean: the shortcut factor is independent of the
    class) plus ``val_shortcut`` and ``test_shortcut`` (the same digits with the training
    correlation). The shortcut is planted in ``train`` only. Samples carry ``factors`` in the
    order ``thickness, slant, scale, shift_x, shift_y, intensity, mark`` (raw values).

    Shortcut rule: the shortcut factor's binary state (mark present, or intensity >= 0.9) is on
    with probability ``s * [label == shortcut_class] + (1 - s) * base_rate``, where ``s`` is
    ``shortcut_strength`` and ``base_rate`` is ``mark_rate`` for the mark and 0.2 for intensity.

    Args:
        train_size: Number of training samples.
        val_size: Number of validation samples (clean and shortcut versions alike).
        test_size: Number of test samples (clean and shortcut versions alike).
        shortcut_class: Class that the shortcut factor is correlated with (0-9), or None for
            no shortcut.
        shortcut_strength: Strength s in [0, 1] of the correlation: 1 puts the shortcut on
            exactly the images of ``shortcut_class``, 0 makes it independent of the class.
        shortcut_factor: Factor carrying the shortcut: ``mark`` (a bright 3x3 square in the
            top-left corner) or ``intensity`` (bright strokes).
        mark_rate: Probability of the mark in clean data (the base rate of the rule).
        **kwargs: Loading options of :class:`~lit_cf.data.base.ImageDataModule`: ``batch_size``,
            ``num_workers``, ``seed``, ``predict_split``, ``test_corruption``,
            ``corruption_severity`` and ``limit``.
    """

    num_classes = 10
    image_shape = (1, CANVAS, CANVAS)
    class_names = CLASS_NAMES
    factor_names = FACTOR_NAMES

    def __init__(
        self,
        train_size: int = 20000,
        val_size: int = 2000,
        test_size: int = 2000,
        shortcut_class: int | None = None,
        shortcut_strength: float = 0.0,
        shortcut_factor: str = "mark",
        mark_rate: float = 0.1,
        **kwargs: Any,
    ) -> None:
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_shortcut(shortcut_class, shortcut_strength, shortcut_factor)
        if not 0.0 <= mark_rate <= 1.0:
            raise ValueError(f"mark_rate must be in [0, 1], got {mark_rate}")
        super().__init__(**kwargs)
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.shortcut_class = shortcut_class
        self.shortcut_strength = float(shortcut_strength)
        self.shortcut_factor = shortcut_factor
        self.mark_rate = float(mark_rate)

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "val", "test", "val_shortcut", "test_shortcut")

    def build_split(self, split: str) -> RenderedDigits:
        stream = split.removesuffix("_shortcut")
        size = {"train": self.train_size, "val": self.val_size, "test": self.test_size}[stream]
        shortcut = split == "train" or split.endswith("_shortcut")
        return RenderedDigits(
            size=size,
            split=stream,
            seed=self.seed,
            shortcut_class=self.shortcut_class if shortcut else None,
            shortcut_strength=self.shortcut_strength if shortcut else 0.0,
            shortcut_factor=self.shortcut_factor,
            mark_rate=self.mark_rate,
        )

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            {
                "factor_names": list(self.factor_names),
                "shortcut_class": self.shortcut_class,
                "shortcut_strength": self.shortcut_strength,
                "shortcut_factor": self.shortcut_factor,
                "mark_rate": self.mark_rate,
                "seed": self.seed,
            }
        )
        return info
