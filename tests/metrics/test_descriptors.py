import math

import pytest
import torch

from lit_cf.metrics import MNAC, CorrelationDifference, attribute_correlation
from tests.metrics.helpers import check_merge


def test_mnac_counts():
    q = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.2, 0.2]])
    cf = torch.tensor([[0.1, 0.1, 0.7], [0.8, 0.9, 0.4]])
    metric = MNAC()
    metric.update(q, cf)
    out = metric.compute()  # changes: row 0 -> 1 (attr 0), row 1 -> 2 (attrs 0, 1)
    assert out["mnac_mean"] == pytest.approx(1.5)
    assert out["mnac_std"] == pytest.approx(0.5)
    excl = MNAC(target_attribute=0, include_target=False)
    excl.update(q, cf)
    assert excl.compute()["mnac_mean"] == pytest.approx(0.5)
    binary = MNAC()
    binary.update((q > 0.5).float(), (cf > 0.5).long())
    assert binary.compute()["mnac_mean"] == pytest.approx(1.5)
    check_merge(MNAC, (q, cf), cut=1)


# binarised deltas per instance (attributes 0 = target, 1, 2, 3 never changes):
#   [1, 1, 0, 0], [1, 0, 1, 0], [-1, 0, 0, 0], [-1, -1, 0, 0]
Q = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.float) * 0.8 + 0.1
CFS = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float) * 0.8 + 0.1
DATA = [1.0, 0.5, -0.2, 0.3]


def expected_cd(include_target=False):
    # Δt = [1, 1, -1, -1]: mean 0, var 1
    # Δ1 = [1, 0, 0, -1]: mean 0, var 1/2, cov 1/2 -> corr 1/sqrt(1/2)
    corr1 = 0.5 / math.sqrt(0.5)
    # Δ2 = [0, 1, 0, 0]: mean 1/4, var 1/4 - 1/16, cov 1/4 - 0 -> corr
    corr2 = 0.25 / math.sqrt(0.25 - 1 / 16)
    # Δ3 = 0: zero variance -> corr 0
    return abs(corr1 - 0.5) + abs(corr2 + 0.2) + abs(0 - 0.3) + (abs(1 - 1) if include_target else 0)


def test_cd_hand_value():
    metric = CorrelationDifference(0, DATA)
    metric.update(Q, CFS)
    out = metric.compute()
    assert set(out) == {"cd"}
    assert float(out["cd"]) == pytest.approx(expected_cd(), rel=1e-6)
    terms = metric.per_attribute()
    assert float(terms[3]) == pytest.approx(0.3)
    incl = CorrelationDifference(0, DATA, include_target=True)
    incl.update(Q, CFS)
    assert float(incl.compute()["cd"]) == pytest.approx(expected_cd(True), rel=1e-6)
    check_merge(lambda: CorrelationDifference(0, DATA), (Q, CFS), cut=2)


def test_cd_raw_probabilities():
    metric = CorrelationDifference(0, DATA, binarize=False)
    metric.update(Q, CFS)  # raw deltas are .8 x the binary ones: correlations unchanged
    assert float(metric.compute()["cd"]) == pytest.approx(expected_cd(), rel=1e-5)


def test_attribute_correlation_hand_value():
    labels = torch.tensor([[1, 1, 1, 1], [1, -1, -1, 1], [-1, -1, 1, 1], [-1, -1, -1, 1]])
    corr = attribute_correlation(labels, 0)
    # a1 = [1, -1, -1, -1]: mean -1/2, var 3/4, cov(a1, t) = E[a1 t] = 1/2
    assert corr.tolist() == pytest.approx([1.0, 0.5 / math.sqrt(0.75), 0.0, 0.0])
    metric = CorrelationDifference.from_labels(labels, 0)
    assert torch.allclose(metric.data_correlation, corr)
