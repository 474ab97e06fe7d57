"""Tests for lit_cf.data.corruptions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lit_cf.data.corruptions import (
    CORRUPTIONS,
    SEVERITY_PARAMS,
    CorruptedDataset,
    corrupt,
    sample_seed,
)

NAMES = sorted(CORRUPTIONS)
RANDOM = ["gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "elastic"]
REQUIRED = {
    "gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "defocus_blur", "motion_blur",
    "contrast", "brightness", "pixelate", "jpeg", "elastic",
}  # fmt: skip


def smooth_images(b: int, c: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1]: bilinearly upsampled 8x8 noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, 8, 8, generator=g)
    return F.interpolate(low, size=(h, w or h), mode="bilinear", align_corners=False).clamp(0, 1)


def test_registry_and_tables() -> None:
    assert REQUIRED <= set(CORRUPTIONS)
    assert set(SEVERITY_PARAMS) == set(CORRUPTIONS)
    assert all(len(v) == 5 for v in SEVERITY_PARAMS.values())


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", NAMES)
def test_shape_range_and_severity_order(name: str, channels: int, size: int) -> None:
    x = smooth_images(4, channels, size)
    diffs = []
    for severity in (1, 5):
        y = corrupt(x, name, severity, seed=[1, 2, 3, 4])
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)
        diffs.append((y - x).abs().mean().item())
    assert diffs[1] > diffs[0], f"{name}: severity 5 ({diffs[1]:.4f}) <= severity 1 ({diffs[0]:.4f})"


@pytest.mark.parametrize("name", NAMES)
def test_direct_call_dtype_and_odd_size(name: str) -> None:
    x = smooth_images(2, 3, 8, 12).double()
    y = CORRUPTIONS[name](x, 3, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float64
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_determinism(name: str) -> None:
    x = smooth_images(4, 3, 28)
    a = corrupt(x, name, 3, seed=7)
    assert torch.equal(a, corrupt(x, name, 3, seed=7))
    b = corrupt(x, name, 3, seed=8)
    if name in RANDOM:
        assert not torch.equal(a, b)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", RANDOM)
def test_single_generator_reproducible(name: str) -> None:
    x = smooth_images(3, 1, 28)
    a = CORRUPTIONS[name](x, 4, torch.Generator().manual_seed(5))
    b = CORRUPTIONS[name](x, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(name: str) -> None:
    x = smooth_images(4, 3, 32)
    seeds = [11, 12, 13, 14]
    batch = corrupt(x, name, 4, seed=seeds)
    for i in (0, 2):
        alone = corrupt(x[i : i + 1], name, 4, seed=[seeds[i]])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-6)
    # an int seed expands to sample_seed(seed, i)
    torch.testing.assert_close(
        corrupt(x, name, 4, seed=3)[1], corrupt(x[1], name, 4, seed=[sample_seed(3, 1)]), rtol=0, atol=1e-6
    )


def test_seed_tensor_and_length_mismatch() -> None:
    x = smooth_images(2, 1, 16)
    from_tensor = corrupt(x, "gaussian_noise", 2, seed=torch.tensor([4, 5]))
    assert torch.equal(from_tensor, corrupt(x, "gaussian_noise", 2, seed=[4, 5]))
    with pytest.raises(ValueError, match="seeds"):
        corrupt(x, "gaussian_noise", 2, seed=[1, 2, 3])


def test_specific_effects() -> None:
    x = smooth_images(2, 3, 32)
    y = corrupt(x, "contrast", 5)
    assert y.std() < x.std()
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    assert (corrupt(x, "brightness", 3) >= x - 1e-6).all()
    # blur keeps a constant image constant
    const = torch.full((1, 1, 16, 16), 0.3)
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "pixelate", "elastic"):
        torch.testing.assert_close(corrupt(const, name, 5), const)


class DictDataset(Dataset):
    def __init__(self, n: int = 6) -> None:
        self.images = smooth_images(n, 3, 16)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": torch.tensor(i % 2), "index": torch.tensor(i)}


def test_corrupted_dataset() -> None:
    base = DictDataset()
    ds = CorruptedDataset(base, "gaussian_noise", 3, seed=1)
    assert len(ds) == len(base) and ds.name == "gaussian_noise" and ds.severity == 3
    s = ds[2]
    assert set(s) == {"image", "label", "index"}
    assert torch.equal(s["label"], base[2]["label"]) and torch.equal(s["index"], base[2]["index"])
    assert s["image"].shape == base[2]["image"].shape and not torch.equal(s["image"], base[2]["image"])
    assert torch.equal(s["image"], ds[2]["image"])
    assert torch.equal(ds[-1]["image"], ds[len(ds) - 1]["image"])
    assert not torch.equal(s["image"], CorruptedDataset(base, "gaussian_noise", 3, seed=2)[2]["image"])
    # matches batch corruption with the same per-sample seeds, and collates
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))
    torch.testing.assert_close(batch["image"], corrupt(base.images, "gaussian_noise", 3, seed=1))
    assert torch.equal(batch["index"], torch.arange(len(ds)))


@pytest.mark.parametrize(
    "name,severity,match",
    [
        ("fog_of_war", 3, "gaussian_noise"),
        ("jpeg", 0, r"\[1, 2, 3, 4, 5\]"),
        ("jpeg", 6, r"\[1, 2, 3, 4, 5\]"),
        ("jpeg", 2.0, r"\[1, 2, 3, 4, 5\]"),
        ("jpeg", True, r"\[1, 2, 3, 4, 5\]"),
    ],
)
def test_check_rejects(name: str, severity: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CorruptedDataset.check(name, severity)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        CorruptedDataset(DictDataset(), name, severity)  # type: ignore[arg-type]


def test_check_accepts() -> None:
    for name in NAMES:
        for severity in range(1, 6):
            CorruptedDataset.check(name, severity)
