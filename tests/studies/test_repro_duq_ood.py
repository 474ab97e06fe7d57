"""lit_cf.metrics.ood: DUQ certainties over batches and the OOD AUROC, on hand-checkable cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_cf.metrics.ood import duq_certainties, ood_auroc


def test_ood_auroc_counts_pairs_where_ood_is_less_certain():
    # OOD positive, score -certainty: pairs (ood, in) with ood less certain: 0.1<0.9, 0.1<0.8, 0.85<0.9; not 0.85<0.8
    assert ood_auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.85])) == pytest.approx(0.75)
    assert ood_auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == pytest.approx(1.0)
    assert ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.8])) == pytest.approx(0.0)
    assert ood_auroc(torch.tensor([0.5]), torch.tensor([0.5])) == pytest.approx(0.5)  # a tie counts one half
    with pytest.raises(ValueError, match="at least one"):
        ood_auroc(torch.tensor([]), torch.tensor([0.5]))


class Kernel(nn.Module):
    """K_c(x) = the mean of the image times (c + 1) / 10: certainty and argmax known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_training: list[bool] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return x.flatten(1).mean(1, keepdim=True) * torch.arange(1, 4) / 10


def test_duq_certainties_over_batches_in_eval_mode():
    model = Kernel().train()
    batches = [
        {"image": torch.full((2, 1, 2, 2), 1.0), "label": torch.tensor([2, 0])},
        {"image": torch.full((1, 1, 2, 2), 0.5), "label": torch.tensor([2])},
    ]
    cert, pred, label = duq_certainties(model, batches)
    assert cert.tolist() == pytest.approx([0.3, 0.3, 0.15])
    assert pred.tolist() == [2, 2, 2] and label.tolist() == [2, 0, 2]
    assert model.seen_training == [False, False] and model.training  # eval inside, restored after
    with pytest.raises(ValueError, match="no batches"):
        duq_certainties(model, [])
