"""The rendered digits are pinned: the same seed gives the same images, labels and factors.

The digests were computed on the code before the rendered data was split into
``rendered_factors``, ``rendered_glyphs`` and ``rendered`` (December 2026). Labels and factors
are hashed exactly (integer hashing and float64 arithmetic); the images are hashed after
rounding to 1/4096, so that a CPU that contracts or vectorises float32 arithmetic differently
cannot flip the digest, while any change of a glyph, factor or ink rule still does.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lit_cf.data import RenderedDigitsDataModule
from lit_cf.data.rendered import RenderedDigits, render_digits, sample_factors


def digest(images: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update((images.double() * 4096).round().to(torch.int64).contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    h.update((factors.double() * 4096).round().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def train_seed3() -> tuple[torch.Tensor, ...]:
    ds = RenderedDigits(64, "train", seed=3)
    return ds.images, ds.labels, ds.factors


def mark_shortcut_test() -> tuple[torch.Tensor, ...]:
    dm = RenderedDigitsDataModule(train_size=40, val_size=20, test_size=30, shortcut_class=2, shortcut_strength=0.8, seed=1)
    ds = dm.dataset("test_shortcut")
    return ds.images, ds.labels, ds.factors


def intensity_shortcut_val() -> tuple[torch.Tensor, ...]:
    dm = RenderedDigitsDataModule(
        train_size=40, val_size=20, test_size=30, shortcut_class=5, shortcut_strength=1.0, shortcut_factor="intensity", seed=7
    )
    ds = dm.dataset("val_shortcut")
    return ds.images, ds.labels, ds.factors


def extra_split() -> tuple[torch.Tensor, ...]:
    labels, factors = sample_factors(torch.arange(10, 50), split="extra", seed=11)
    return render_digits(labels, factors), labels, factors


GOLDEN = {
    train_seed3: "ed7081c04fab4aa4b5600c6fbc1e00feaeaa3b629030d25b28d0a6d099f1997c",
    mark_shortcut_test: "578fcc9a9fc63aca67fd32037658cd742dc5163bdb5e1180c5ae3b920b8425a6",
    intensity_shortcut_val: "6670329c174185c848bb5870ef8b3cb2f8bc37aeac30b14544ffbe7894b06c7e",
    extra_split: "45fdea6f5e003a9856f184263f2383d8be56afda2474368b7fcfbd3a03ac8dc2",
}


@pytest.mark.parametrize("make", list(GOLDEN), ids=lambda f: f.__name__)
def test_rendered_data_matches_the_pinned_digest(make):
    assert digest(*make()) == GOLDEN[make]
