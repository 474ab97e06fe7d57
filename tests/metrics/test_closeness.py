import math

import pytest
import torch
from torch import nn

from lit_cf.metrics import LpDistance, PerceptualDistance, lp_distance
from lit_cf.metrics.features import FeatureMaps
from tests.metrics.helpers import check_merge, pop_std

# two 1x2x2 images; differences [1, -2, 0, .5] and [.5, .5, .5, .5]
X = torch.zeros(2, 1, 2, 2)
X_CF = torch.tensor([[1.0, -2.0, 0.0, 0.5], [0.5, 0.5, 0.5, 0.5]]).view(2, 1, 2, 2)
D = [[1.0, -2.0, 0.0, 0.5], [0.5, 0.5, 0.5, 0.5]]


def norm(d, p):
    return sum(abs(v) ** p for v in d) ** (1 / p)


@pytest.mark.parametrize("p", [1, 1.5, 2])
def test_lp_hand_values(p):
    metric = LpDistance(p)
    metric.update(X, X_CF)
    out = metric.compute()
    name = {1: "l1", 1.5: "l1.5", 2: "l2"}[p]
    values = [norm(d, p) for d in D]
    assert set(out) == {f"{name}_mean", f"{name}_std"}
    assert out[f"{name}_mean"] == pytest.approx(sum(values) / 2, rel=1e-6)
    assert out[f"{name}_std"] == pytest.approx(pop_std(values), rel=1e-5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_lp_explicit_formulas_and_mean_reduction():
    assert lp_distance(X, X_CF, 1).tolist() == pytest.approx([3.5, 2.0])
    assert lp_distance(X, X_CF, 2).tolist() == pytest.approx([math.sqrt(5.25), 1.0])
    l15 = (1 + 2**1.5 + 0.5**1.5) ** (2 / 3)
    assert lp_distance(X, X_CF, 1.5).tolist() == pytest.approx([l15, (4 * 0.5**1.5) ** (2 / 3)])
    # power mean: norm / D^(1/p), D = 4
    assert lp_distance(X, X_CF, 2, reduction="mean").tolist() == pytest.approx([math.sqrt(5.25 / 4), 0.5])
    assert "l2_pixel_mean" in LpDistance(2, reduction="mean").compute()


def test_lp_merge():
    check_merge(lambda: LpDistance(1.5), (X, X_CF), cut=1)


def tiny_net() -> nn.Sequential:
    """1x1 conv: channel 0 = v - .5, channel 1 = 1; then an in-place ReLU."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([-0.5, 1.0]))
    return nn.Sequential(conv, nn.ReLU(inplace=True))


def unit(a, b):
    n = math.sqrt(a * a + b * b)
    return a / n, b / n


def pixel_term(v, u, relu):
    f = (lambda t: max(t - 0.5, 0.0)) if relu else (lambda t: t - 0.5)
    a, b = unit(f(v), 1.0), unit(f(u), 1.0)
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2


QUERY = torch.tensor([[0.0, 0.2, 0.9, 1.0], [0.5, 0.5, 0.5, 0.5]]).view(2, 1, 2, 2)
CF = torch.tensor([[1.0, 0.2, 0.1, 0.7], [0.5, 0.6, 0.0, 0.5]]).view(2, 1, 2, 2)


def expected_perceptual(layer_reduction="mean"):
    out = []
    for q, c in zip(QUERY.view(2, 4).tolist(), CF.view(2, 4).tolist()):
        layers = [sum(pixel_term(v, u, relu) for v, u in zip(q, c)) / 4 for relu in (False, True)]
        out.append(sum(layers) / (2 if layer_reduction == "mean" else 1))
    return out


def test_perceptual_hooks_hand_values():
    metric = PerceptualDistance(tiny_net(), layers=["0", "1"])
    metric.update(QUERY, CF)
    out = metric.compute()
    expected = expected_perceptual()
    assert set(out) == {"perceptual_domain_mean", "perceptual_domain_std"}
    assert out["perceptual_domain_mean"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert out["perceptual_domain_std"] == pytest.approx(pop_std(expected), rel=1e-4)
    summed = PerceptualDistance(tiny_net(), layers=["0", "1"], layer_reduction="sum")
    summed.update(QUERY, CF)
    assert summed.compute()["perceptual_domain_mean"] == pytest.approx(sum(expected_perceptual("sum")) / 2, rel=1e-5)


def test_perceptual_callable_and_vector_features():
    net = tiny_net()
    maps = FeatureMaps(net, ["0", "1"])
    metric = PerceptualDistance(lambda x: maps(x))
    metric.update(QUERY, CF)
    assert metric.compute()["perceptual_domain_mean"] == pytest.approx(sum(expected_perceptual()) / 2, rel=1e-5)
    # [B, C] features count as one position: two 2-d vectors at 90 degrees -> |e1 - e2|^2 = 2
    linear = lambda x: torch.stack([x.flatten(1)[:, 0], 1 - x.flatten(1)[:, 0]], 1)  # noqa: E731
    vec = PerceptualDistance(linear, name="p")
    vec.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert vec.compute()["p_mean"] == pytest.approx(2.0)


def test_perceptual_zero_for_identical_and_merge():
    metric = PerceptualDistance(tiny_net(), layers=["1"])
    metric.update(QUERY, QUERY)
    assert metric.compute()["perceptual_domain_mean"] == pytest.approx(0.0, abs=1e-7)
    check_merge(lambda: PerceptualDistance(tiny_net(), layers=["0", "1"]), (QUERY, CF), cut=1)


def test_feature_maps_unknown_layer():
    with pytest.raises(ValueError):
        FeatureMaps(tiny_net(), ["nope"])
