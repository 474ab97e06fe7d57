"""lit_cf.metrics.model_scores: accuracy, reconstruction error and corrupted accuracy of toy models."""

from __future__ import annotations

import pytest
import torch

from lit_cf.data.corruptions import corrupt
from lit_cf.metrics.model_scores import accuracy, corruption_accuracy, predict, reconstruction_mse


def brightness_model(x: torch.Tensor) -> torch.Tensor:
    """Class 1 when the mean pixel exceeds 0.5, else class 0 (two logits)."""
    m = x.flatten(1).mean(1)
    return torch.stack([0.5 - m, m - 0.5], 1)


def test_predict_and_accuracy():
    x = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.9, 0.7, 0.2, 0.6)])
    assert predict(brightness_model, x, batch_size=2).tolist() == [0, 1, 1, 0, 1]
    assert predict(brightness_model, x[:0]).shape == (0,)
    batches = [{"image": x[:3], "label": torch.tensor([0, 1, 0])}, {"image": x[3:], "label": torch.tensor([0, 0])}]
    assert accuracy(brightness_model, batches) == pytest.approx(3 / 5)
    assert accuracy(brightness_model, []) == 0


class HalfAE:
    """decode(encode(x)) = x / 2: the squared error per pixel is x**2 / 4."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def test_reconstruction_mse_per_pixel_and_batch_limit():
    batches = [{"image": torch.full((2, 1, 2, 2), 1.0)}, {"image": torch.full((1, 1, 2, 2), 0.0)}]
    assert reconstruction_mse(HalfAE(), batches) == pytest.approx(8 * 0.25 / 12)
    assert reconstruction_mse(HalfAE(), batches, max_batches=1) == pytest.approx(0.25)


def test_corruption_accuracy_averages_severities_then_corruptions():
    x = torch.stack([torch.full((1, 8, 8), v) for v in (0.05, 0.95, 0.3, 0.7)])
    y = torch.tensor([0, 1, 0, 1])
    res = corruption_accuracy(brightness_model, x, y, severities=[1, 5], corruptions=["brightness", "contrast"])
    assert set(res["per_corruption"]) == {"brightness", "contrast"}
    for name in ("brightness", "contrast"):
        expected = [float((predict(brightness_model, corrupt(x, name, s, seed=0)) == y).float().mean()) for s in (1, 5)]
        assert res["per_corruption"][name] == pytest.approx(sum(expected) / 2)
    assert res["corrupted_acc"] == pytest.approx(sum(res["per_corruption"].values()) / 2)
    # brightness +0.5 at severity 5 pushes the dark 0.3 image over 0.5: one mistake of four there
    assert res["per_corruption"]["brightness"] < 1.0
    with pytest.raises(ValueError, match="at least one"):
        corruption_accuracy(brightness_model, x, y, severities=[])
