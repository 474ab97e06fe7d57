"""Closeness of counterfactuals to their queries: per-image L_p norms and a perceptual distance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_cf.metrics._utils import DEFAULT_STD_CORRECTION, EvalOnly, check_images, mean_std_dict
from lit_cf.metrics.features import FeatureMaps, as_feature_list

FeatureFn = Callable[[Tensor], "Tensor | Sequence[Tensor]"]


def lp_distance(x: Tensor, x_cf: Tensor, p: float = 2.0, reduction: str = "norm") -> Tensor:
    """Per-image ``||x_cf - x||_p`` over all pixels and channels, ``[B]``.

    ``reduction="norm"`` is the plain norm; ``"mean"`` divides it by ``D ** (1 / p)`` (``D``
    pixels times channels), i.e. the power mean ``(mean |d|^p)^(1/p)``, which does not grow with
    the image size.
    """
    check_images(x, x_cf)
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    diff = (x_cf - x).flatten(1).to(torch.promote_types(x.dtype, torch.float32))
    norm = torch.linalg.vector_norm(diff, ord=p, dim=1)
    if reduction == "norm":
        return norm
    if reduction == "mean":
        return norm / diff.shape[1] ** (1.0 / p)
    raise ValueError(f"reduction must be 'norm' or 'mean', got {reduction!r}")


class LpDistance(Metric):
    """Per-image L_p distance between queries and counterfactuals; mean and std over images.

    Each image contributes ``||x_cf - x||_p`` over all its pixels and channels (the study this
    follows computed one norm over a whole batch tensor; lit-cf reports per-image means and
    stds instead). ``p`` is typically 1, 1.5 or 2.

    Outputs ``{f"{name}_mean", f"{name}_std"}`` with ``name`` default ``f"l{p:g}"`` (``l1``,
    ``l1.5``, ``l2``) for ``reduction="norm"`` and ``f"l{p:g}_pixel"`` for ``"mean"`` (see
    :func:`lp_distance`).

    ``update(x [B, C, H, W], x_cf [B, C, H, W])``.
    """

    values: list[Tensor]  # metric state, added in __init__

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        p: float = 2.0,
        reduction: str = "norm",
        name: str | None = None,
        std_correction: int = DEFAULT_STD_CORRECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        if reduction not in ("norm", "mean"):
            raise ValueError(f"reduction must be 'norm' or 'mean', got {reduction!r}")
        self.p, self.reduction, self.std_correction = float(p), reduction, std_correction
        self.name = name or (f"l{p:g}" if reduction == "norm" else f"l{p:g}_pixel")
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, x: Tensor, x_cf: Tensor) -> None:
        self.values.append(lp_distance(x.detach(), x_cf.detach(), self.p, self.reduction).float())

    def compute(self) -> dict[str, Tensor]:
        return mean_std_dict(self.name, self.values, self.std_correction)


def perceptual_distance(
    features_x: Sequence[Tensor],
    features_y: Sequence[Tensor],
    layer_reduction: str = "mean",
    eps: float = 1e-10,
) -> Tensor:
    """LPIPS-style distance ``[B]`` between two lists of feature maps (no learned weights).

    Per layer: unit-normalise each spatial position's feature vector over channels
    (``f / (||f||_2 + eps)``), square the difference, sum over channels, average over spatial
    positions (``[B, C]`` features count as one position). Layers are then averaged
    (``layer_reduction="mean"``, the lit-cf default) or summed (``"sum"``, as LPIPS does). Each
    layer's term lies in ``[0, 4]``.
    """
    if len(features_x) != len(features_y) or not features_x:
        raise ValueError("need the same non-empty number of feature maps for both image sets")
    terms = []
    for fx, fy in zip(features_x, features_y):
        if fx.shape != fy.shape or fx.dim() < 2:
            raise ValueError(f"feature maps must be [B, C, ...] of equal shape, got {fx.shape} and {fy.shape}")
        fx = fx.float() / (fx.float().norm(dim=1, keepdim=True) + eps)
        fy = fy.float() / (fy.float().norm(dim=1, keepdim=True) + eps)
        terms.append((fx - fy).square().sum(1).reshape(len(fx), -1).mean(1))
    stacked = torch.stack(terms, 0)
    if layer_reduction == "mean":
        return stacked.mean(0)
    if layer_reduction == "sum":
        return stacked.sum(0)
    raise ValueError(f"layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")


def build_feature_fn(feature_extractor: nn.Module | FeatureFn, layers: Sequence[str] | None) -> nn.Module | FeatureFn:
    """The callable giving feature maps: hooks on ``layers`` of a module, or the extractor itself."""
    if layers is not None:
        if not isinstance(feature_extractor, nn.Module):
            raise TypeError("layers need feature_extractor to be an nn.Module")
        return EvalOnly(FeatureMaps(feature_extractor, layers))
    if isinstance(feature_extractor, nn.Module):
        return EvalOnly(feature_extractor)
    if not callable(feature_extractor):
        raise TypeError("feature_extractor must be an nn.Module or a callable")
    return feature_extractor


def paired_perceptual_distance(
    feature_fn: nn.Module | FeatureFn,
    x: Tensor,
    y: Tensor,
    layer_reduction: str = "mean",
    eps: float = 1e-10,
) -> Tensor:
    """:func:`perceptual_distance` of images ``x`` and ``y`` (one forward pass on both)."""
    check_images(x, y)
    feats = as_feature_list(feature_fn(torch.cat([x, y], 0)))
    n = len(x)
    return perceptual_distance([f[:n] for f in feats], [f[n:] for f in feats], layer_reduction, eps)


class PerceptualDistance(Metric):
    """LPIPS-style perceptual distance on an in-project network (``perceptual_domain``).

    Not LPIPS: no pretrained VGG/AlexNet exists here and there are no learned per-channel
    weights. The feature network is one lit-cf trained on the same data (e.g. a classifier's
    backbone); the distance is :func:`perceptual_distance` (unit-normalise each layer's
    features over channels, squared difference summed over channels, spatial mean, mean over
    layers). Queries and counterfactuals go through the network in one batch, in eval mode.

    Args:
        feature_extractor: An ``nn.Module`` or callable mapping images ``[B, C, H, W]`` (as the
            metric receives them, normally ``[0, 1]``) to one feature tensor or a list of them.
        layers: Optional names of submodules of ``feature_extractor`` whose outputs are the
            feature maps (forward hooks); ``None``: use the extractor's own output(s).
        layer_reduction: ``"mean"`` (default) or ``"sum"`` over layers.
        eps: Added to the channel norm before normalising.
        name: Output prefix; outputs are ``f"{name}_mean"`` and ``f"{name}_std"``.
        std_correction: Degrees-of-freedom correction of the std (0: population std).

    ``update(x, x_cf)``; ``compute() -> {"perceptual_domain_mean", "perceptual_domain_std"}``.
    """

    values: list[Tensor]  # metric state, added in __init__

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        feature_extractor: nn.Module | FeatureFn,
        layers: Sequence[str] | None = None,
        layer_reduction: str = "mean",
        eps: float = 1e-10,
        name: str = "perceptual_domain",
        std_correction: int = DEFAULT_STD_CORRECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if layer_reduction not in ("mean", "sum"):
            raise ValueError(f"layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")
        self.feature_fn = build_feature_fn(feature_extractor, layers)
        self.layer_reduction, self.eps, self.name = layer_reduction, eps, name
        self.std_correction = std_correction
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, x: Tensor, x_cf: Tensor) -> None:
        with torch.no_grad():
            d = paired_perceptual_distance(self.feature_fn, x, x_cf, self.layer_reduction, self.eps)
        self.values.append(d.float())

    def compute(self) -> dict[str, Tensor]:
        return mean_std_dict(self.name, self.values, self.std_correction)
