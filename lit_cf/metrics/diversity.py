"""Diversity (sigma_L): spread of the counterfactuals of one query over seeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_cf.metrics._utils import DEFAULT_STD_CORRECTION, mean_std_dict
from lit_cf.metrics.closeness import FeatureFn, build_feature_fn, paired_perceptual_distance

PairDistance = Callable[[Tensor, Tensor], Tensor]


def l1_per_pixel(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over all pixels and channels, ``[N]``."""
    return (a - b).abs().flatten(1).float().mean(1)


class Diversity(Metric):
    """sigma_L: mean pairwise distance between counterfactuals of the same query.

    For each query with ``S >= 2`` counterfactuals (e.g. different seeds), the mean of the
    distance over all ``S (S - 1) / 2`` unordered pairs; mean and std over queries. Higher
    means more diverse. The literature uses LPIPS (a pretrained network, unavailable here); the
    distance is chosen by the arguments, and the default output name says which one was used:

    * ``distance`` given: that callable ``(a [N, C, H, W], b [N, C, H, W]) -> [N]``; name
      ``diversity``;
    * else ``feature_extractor`` given: the LPIPS-style distance of
      :class:`~lit_cf.metrics.closeness.PerceptualDistance` on that in-project network (same
      ``layers`` / ``layer_reduction`` arguments); name ``diversity_perceptual_domain``;
    * else: :func:`l1_per_pixel`, the mean absolute pixel difference; name ``diversity_l1``.

    ``update(x_cfs [B, S, C, H, W])``; ``compute() -> {f"{name}_mean", f"{name}_std"}``.
    """

    values: list[Tensor]  # metric state, added in __init__

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        distance: PairDistance | None = None,
        feature_extractor: nn.Module | FeatureFn | None = None,
        layers: Sequence[str] | None = None,
        layer_reduction: str = "mean",
        name: str | None = None,
        std_correction: int = DEFAULT_STD_CORRECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if distance is not None and feature_extractor is not None:
            raise ValueError("pass either distance or feature_extractor, not both")
        if layer_reduction not in ("mean", "sum"):
            raise ValueError(f"layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")
        self.distance = distance
        self.feature_fn = build_feature_fn(feature_extractor, layers) if feature_extractor is not None else None
        self.layer_reduction = layer_reduction
        if name is None:
            if distance is not None:
                name = "diversity"
            elif self.feature_fn is not None:
                name = "diversity_perceptual_domain"
            else:
                name = "diversity_l1"
        self.name, self.std_correction = name, std_correction
        self.add_state("values", [], dist_reduce_fx="cat")

    def _pair_distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.distance is not None:
            return self.distance(a, b)
        if self.feature_fn is not None:
            return paired_perceptual_distance(self.feature_fn, a, b, self.layer_reduction)
        return l1_per_pixel(a, b)

    def update(self, x_cfs: Tensor) -> None:
        if x_cfs.dim() < 3 or x_cfs.shape[1] < 2:
            raise ValueError(f"expected [B, S, ...] counterfactuals with S >= 2, got shape {tuple(x_cfs.shape)}")
        b, s = x_cfs.shape[:2]
        i, j = torch.triu_indices(s, s, offset=1, device=x_cfs.device)
        pairs = len(i)
        a = x_cfs[:, i].reshape(b * pairs, *x_cfs.shape[2:])
        c = x_cfs[:, j].reshape(b * pairs, *x_cfs.shape[2:])
        with torch.no_grad():
            d = self._pair_distance(a.detach(), c.detach()).reshape(b, pairs)
        self.values.append(d.float().mean(1))

    def compute(self) -> dict[str, Tensor]:
        return mean_std_dict(self.name, self.values, self.std_correction)
