"""Oracle agreement: independently trained classifiers judge the counterfactuals."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_cf.metrics._utils import as_labels, class_probabilities, safe_ratio


class OracleAgreement(Metric):
    """Agreement of one oracle ``k`` with the explained classifier on counterfactuals.

    * ``os``: share of counterfactuals where the oracle's prediction equals the explained
      classifier's prediction (OS_k);
    * ``ota``: share where the oracle predicts the target class (OTA_k).

    Hold one instance per oracle (outputs are per oracle; a
    :class:`~torchmetrics.MetricCollection` keyed by oracle name prefixes duplicate keys with
    the name). An oracle that *is* the explained classifier must be left out by the caller
    (see :func:`oracle_predictions`).

    ``update(oracle_preds [B] | [B, C], explained_preds [B] | [B, C], target [B])``: predictions
    are class indices or scores (argmax is taken); ``compute() -> {"os", "ota"}``.
    """

    n: Tensor  # metric states, added in __init__
    agree: Tensor
    hit: Tensor

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("agree", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hit", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, oracle_preds: Tensor, explained_preds: Tensor, target: Tensor) -> None:
        oracle, explained = as_labels(oracle_preds.detach()), as_labels(explained_preds.detach())
        if not (oracle.shape == explained.shape == target.shape):
            raise ValueError("oracle_preds, explained_preds and target must describe the same [B] samples")
        self.n += len(oracle)
        self.agree += (oracle == explained).sum()
        self.hit += (oracle == target.long()).sum()

    def compute(self) -> dict[str, Tensor]:
        return {"os": safe_ratio(self.agree, self.n), "ota": safe_ratio(self.hit, self.n)}


@torch.no_grad()
def oracle_predictions(
    oracles: Mapping[str, nn.Module],
    images: Tensor,
    exclude: str | Collection[str] | None = None,
    explained: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Class predictions ``[B]`` of every oracle on ``images`` (e.g. a batch of counterfactuals).

    Oracles named in ``exclude`` (the explained classifier's own name in the oracle suite) and
    any oracle that is the very object ``explained`` are skipped: a classifier is no oracle for
    its own counterfactuals. Predictions are the argmax of ``oracle.probabilities(x)`` when the
    oracle has that method (lit-cf classifiers), else of ``oracle(x)``; oracles are called as
    they are (put them in eval mode first, e.g. with :func:`lit_cf.models.freeze`).

    Returns:
        ``{name: predictions [B]}`` in the order of ``oracles``, without the skipped ones.
    """
    if isinstance(exclude, str):
        exclude = {exclude}
    skip = set(exclude or ())
    out: dict[str, Tensor] = {}
    for name, oracle in oracles.items():
        if name in skip or (explained is not None and oracle is explained):
            continue
        out[name] = class_probabilities(oracle, images).argmax(-1)
    return out
