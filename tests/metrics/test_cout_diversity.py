import itertools
import math

import pytest
import torch
from torch import nn

from lit_cf.metrics import COUT, Diversity, insertion_curves, trapezoid_auc
from lit_cf.metrics.closeness import paired_perceptual_distance
from tests.metrics.helpers import check_merge


class PixelProbe(nn.Module):
    """p(class 1) = pixel (0, 1) of channel 0; p(class 0) = 1 - that."""

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, 0, 1]
        return torch.stack([1 - v, v], 1)


def test_trapezoid():
    assert trapezoid_auc(torch.tensor([[0.0, 0.5, 1.0]])).item() == pytest.approx(0.5)


def test_cout_ranking_hand_value():
    x = torch.zeros(1, 1, 2, 2)
    x_cf = torch.tensor([[0.9, 0.5], [0.0, 0.0]]).view(1, 1, 2, 2)
    metric = COUT(PixelProbe(), steps=4)
    metric.update(x, x_cf, torch.tensor([1]), torch.tensor([0]))
    # pixels inserted 0..4: (0,0) first (|.9|), then (0,1): p_t = [0, 0, .5, .5, .5]
    auc_t = (0 + 0 + 0.25 + 0.5 + 0.5) / 4
    assert metric.compute()["cout_mean"] == pytest.approx(auc_t - (1 - auc_t))


def test_cout_sharp_classifier_near_one():
    class Sharp(nn.Module):
        def forward(self, x):  # logits depend only on pixel (3, 7)
            v = x[:, 0, 3, 7]
            return torch.stack([20 * (0.5 - v), 20 * (v - 0.5)], 1)

    x = torch.zeros(2, 1, 10, 10)
    x_cf = x.clone()
    x_cf[:, 0, 3, 7] = 1.0
    metric = COUT(Sharp(), steps=50, step_chunk=7)
    metric.update(x, x_cf, torch.tensor([1, 1]), torch.tensor([0, 0]))
    lo, hi = 1 / (1 + math.exp(20)), 1 / (1 + math.exp(-20))
    auc_t = ((lo + hi) / 2 + 49 * hi) / 50  # the pixel is in from step 1 (2 pixels per step)
    expected = 2 * auc_t - 1
    out = metric.compute()
    assert out["cout_mean"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0.97


def test_cout_cf_equals_query_is_constant_difference():
    x = torch.rand(3, 1, 4, 4)
    metric = COUT(PixelProbe(), steps=5)
    metric.update(x, x.clone(), torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    v = x[:, 0, 0, 1]
    assert metric.compute()["cout_mean"] == pytest.approx(float((2 * v - 1).mean()), abs=1e-6)
    half = torch.full((2, 1, 4, 4), 0.5)
    indifferent = COUT(PixelProbe(), steps=5)
    indifferent.update(half, half.clone(), torch.tensor([1, 1]), torch.tensor([0, 0]))
    assert indifferent.compute()["cout_mean"] == pytest.approx(0.0, abs=1e-6)


def test_cout_chunks_mask_and_merge():
    torch.manual_seed(0)
    x, x_cf = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    target, source = torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 0, 1])
    curves = [insertion_curves(PixelProbe(), x, x_cf, target, source, steps=6, step_chunk=c) for c in (1, 4, 100)]
    for p_t, p_s in curves[1:]:
        assert torch.allclose(p_t, curves[0][0]) and torch.allclose(p_s, curves[0][1])
    p_t, _ = curves[0]
    assert torch.allclose(p_t[:, 0], x[range(4), 0, 0, 1].where(target == 1, 1 - x[:, 0, 0, 1]))
    masked = COUT(PixelProbe(), steps=6)
    masked.update(x, x_cf, target, source, mask=torch.tensor([True, False, True, False]))
    only = COUT(PixelProbe(), steps=6)
    only.update(x[[0, 2]], x_cf[[0, 2]], target[[0, 2]], source[[0, 2]])
    assert masked.compute()["cout_mean"] == pytest.approx(float(only.compute()["cout_mean"]))
    out = check_merge(lambda: COUT(PixelProbe(), steps=6), (x, x_cf, target, source), cut=3)
    assert -1 <= out["cout_mean"] <= 1


# 2 queries x 3 seeds of 1x1x2 images
CFS = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]], [[0.2, 0.2], [0.2, 0.2], [0.2, 0.6]]]).view(2, 3, 1, 1, 2)


def test_diversity_default_l1_hand_value():
    metric = Diversity()
    metric.update(CFS)
    out = metric.compute()
    # query 0: pairs (0,1) .5, (0,2) .25, (1,2) (1 + .5)/2 = .75 -> .5
    # query 1: pairs 0, .2, .2 -> .4/3
    q0, q1 = 0.5, 0.4 / 3
    assert set(out) == {"diversity_l1_mean", "diversity_l1_std"}
    assert out["diversity_l1_mean"] == pytest.approx((q0 + q1) / 2)
    assert out["diversity_l1_std"] == pytest.approx(abs(q0 - q1) / 2)
    check_merge(Diversity, (CFS,), cut=1)


def test_diversity_custom_distance_and_features():
    max_diff = lambda a, b: (a - b).abs().flatten(1).amax(1)  # noqa: E731
    metric = Diversity(distance=max_diff)
    metric.update(CFS)
    assert metric.compute()["diversity_mean"] == pytest.approx(((1 + 0.5 + 1) + (0 + 0.4 + 0.4)) / 6)
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([-0.3, 0.7]))
    perceptual = Diversity(feature_extractor=conv)
    perceptual.update(CFS)
    expected = []
    for q in range(2):
        with torch.no_grad():
            d = [
                float(paired_perceptual_distance(conv, CFS[q, i : i + 1], CFS[q, j : j + 1]))
                for i, j in itertools.combinations(range(3), 2)
            ]
        expected.append(sum(d) / 3)
    assert perceptual.compute()["diversity_perceptual_domain_mean"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        Diversity().update(CFS[:, :1])
