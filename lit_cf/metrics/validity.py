"""Validity and confidence of counterfactuals under the explained classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_cf.metrics._utils import DEFAULT_STD_CORRECTION, mean_std_dict, safe_ratio


class Validity(Metric):
    """Flip rate (target accuracy), original accuracy and target/source confidence.

    For counterfactuals with class probabilities ``p`` under the explained classifier:

    * ``flip_rate`` (TA): share with ``argmax p == target``;
    * ``oa``: share with ``argmax p == source`` (still the query's class);
    * ``tconf_mean`` / ``tconf_std``: mean / std over counterfactuals of ``p[target]``;
    * ``oconf_mean`` / ``oconf_std``: the same for ``p[source]``.

    ``source`` is normally the classifier's prediction on the query (the class being
    explained away). Stds use ``std_correction`` (default 0: population std).

    ``update(probs_cf [B, C], target [B], source [B])``; ``compute() -> dict[str, Tensor]``.
    """

    n: Tensor  # metric states, added in __init__
    flipped: Tensor
    original: Tensor
    tconf: list[Tensor]
    oconf: list[Tensor]

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, std_correction: int = DEFAULT_STD_CORRECTION, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.std_correction = std_correction
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("flipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("original", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("tconf", [], dist_reduce_fx="cat")
        self.add_state("oconf", [], dist_reduce_fx="cat")

    def update(self, probs_cf: Tensor, target: Tensor, source: Tensor) -> None:
        if probs_cf.dim() != 2:
            raise ValueError(f"probs_cf must be [B, C] probabilities, got shape {tuple(probs_cf.shape)}")
        if target.shape != probs_cf.shape[:1] or source.shape != probs_cf.shape[:1]:
            raise ValueError("target and source must be [B] class indices matching probs_cf")
        probs_cf = probs_cf.detach()
        target, source = target.long(), source.long()
        pred = probs_cf.argmax(-1)
        self.n += len(pred)
        self.flipped += (pred == target).sum()
        self.original += (pred == source).sum()
        self.tconf.append(probs_cf.gather(1, target[:, None]).squeeze(1).float())
        self.oconf.append(probs_cf.gather(1, source[:, None]).squeeze(1).float())

    def compute(self) -> dict[str, Tensor]:
        return {
            "flip_rate": safe_ratio(self.flipped, self.n),
            "oa": safe_ratio(self.original, self.n),
            **mean_std_dict("tconf", self.tconf, self.std_correction),
            **mean_std_dict("oconf", self.oconf, self.std_correction),
        }
