import math

import pytest
import torch
from torch import nn

from lit_cf.metrics import OracleAgreement, Validity, oracle_predictions
from tests.metrics.helpers import check_merge

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
TARGET = torch.tensor([0, 1, 1, 1])
SOURCE = torch.tensor([1, 0, 2, 0])


def test_validity_hand_values():
    metric = Validity()
    metric.update(PROBS, TARGET, SOURCE)
    out = metric.compute()
    # argmax = [0, 1, 2, 0]: target hit on 0, 1; source kept on 2, 3
    assert out["flip_rate"] == pytest.approx(0.5)
    assert out["oa"] == pytest.approx(0.5)
    # tconf = [.7, .6, .3, .4], oconf = [.2, .1, .4, .5]; deviations +-.1, +-.2
    assert out["tconf_mean"] == pytest.approx(0.5)
    assert out["oconf_mean"] == pytest.approx(0.3)
    assert out["tconf_std"] == pytest.approx(math.sqrt(0.1 / 4), abs=1e-6)
    assert out["oconf_std"] == pytest.approx(math.sqrt(0.1 / 4), abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_validity_unbiased_std_and_empty():
    metric = Validity(std_correction=1)
    metric.update(PROBS, TARGET, SOURCE)
    assert metric.compute()["tconf_std"] == pytest.approx(math.sqrt(0.1 / 3), abs=1e-6)
    empty = Validity().compute()
    assert all(math.isnan(float(v)) for v in empty.values())


def test_validity_merge():
    out = check_merge(Validity, (PROBS, TARGET, SOURCE), cut=1)
    assert out["flip_rate"] == pytest.approx(0.5)


def test_oracle_agreement_hand_values():
    metric = OracleAgreement()
    oracle = torch.tensor([0, 1, 1, 2])
    explained = torch.tensor([0, 1, 2, 2])
    target = torch.tensor([1, 0, 1, 2])
    metric.update(oracle, explained, target)
    out = metric.compute()
    assert out["os"] == pytest.approx(0.75)
    assert out["ota"] == pytest.approx(0.5)
    # scores are reduced with argmax
    metric.reset()
    metric.update(torch.nn.functional.one_hot(oracle, 3).float(), explained, target)
    assert metric.compute()["os"] == pytest.approx(0.75)
    check_merge(OracleAgreement, (oracle, explained, target), cut=3)


class ConstantClassifier(nn.Module):
    def __init__(self, cls: int, num_classes: int = 3) -> None:
        super().__init__()
        self.cls, self.num_classes = cls, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), self.cls), self.num_classes).float()


def test_oracle_predictions_skips_self():
    explained = ConstantClassifier(0)
    oracles = {
        "a": ConstantClassifier(1),
        "b": ConstantClassifier(2),
        "self": explained,
        "named": ConstantClassifier(0),
    }
    x = torch.zeros(2, 1, 2, 2)
    preds = oracle_predictions(oracles, x, exclude="named", explained=explained)
    assert list(preds) == ["a", "b"]
    assert preds["a"].tolist() == [1, 1] and preds["b"].tolist() == [2, 2]
    assert list(oracle_predictions(oracles, x)) == ["a", "b", "self", "named"]
