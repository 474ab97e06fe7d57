"""COUT: counterfactual transition of the classifier along a pixel-insertion path."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_cf.metrics._utils import DEFAULT_STD_CORRECTION, EvalOnly, check_images, class_probabilities, mean_std_dict


def insertion_ranks(x: Tensor, x_cf: Tensor) -> Tensor:
    """Rank ``[B, H*W]`` of every pixel by ``|x_cf - x|`` summed over channels (0 = largest).

    Ties keep raster order (stable sort), so the path is deterministic.
    """
    importance = (x_cf - x).abs().sum(1).flatten(1)
    order = importance.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def insertion_curves(
    classifier: Any, x: Tensor, x_cf: Tensor, target: Tensor, source: Tensor, steps: int = 50, step_chunk: int = 8
) -> tuple[Tensor, Tensor]:
    """``p_target`` and ``p_source`` ``[B, steps + 1]`` along the insertion path.

    Step ``k`` (``0..steps``) inserts the ``round(k / steps * H * W)`` highest-ranked pixels
    (all channels) of ``x_cf`` into ``x``: step 0 is ``x``, step ``steps`` is ``x_cf``. The
    classifier sees ``step_chunk`` steps of the whole batch per forward pass.
    """
    check_images(x, x_cf)
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    ranks = insertion_ranks(x, x_cf).view(b, 1, h, w)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) / steps * (h * w)).long().tolist()
    p_t, p_s = [], []
    for start in range(0, steps + 1, step_chunk):
        chunk = counts[start : start + step_chunk]
        n = torch.tensor(chunk, device=x.device).view(-1, 1, 1, 1, 1)  # [k, 1, 1, 1, 1]
        mask = ranks.unsqueeze(0) < n  # [k, B, 1, H, W]
        images = torch.where(mask, x_cf.unsqueeze(0), x.unsqueeze(0)).reshape(-1, c, h, w)
        probs = class_probabilities(classifier, images).view(len(chunk), b, -1)
        p_t.append(probs.gather(2, target.view(1, b, 1).expand(len(chunk), b, 1)).squeeze(2).T)
        p_s.append(probs.gather(2, source.view(1, b, 1).expand(len(chunk), b, 1)).squeeze(2).T)
    return torch.cat(p_t, 1), torch.cat(p_s, 1)


def trapezoid_auc(curve: Tensor) -> Tensor:
    """Area under ``curve [B, K+1]`` sampled at ``0, 1/K, ..., 1`` (trapezoid rule), ``[B]``."""
    k = curve.shape[1] - 1
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * k)


class COUT(Metric):
    """COUT (counterfactual transition): ``AUC(p_target) - AUC(p_source)`` along insertion.

    Pixels of each query are ranked by ``|x_cf - x|`` summed over channels; the counterfactual's
    pixels are inserted into the query in ``steps`` equal increments of the fraction of pixels
    (see :func:`insertion_curves`). The areas under the classifier's target and source
    probability curves over the fraction inserted (``[0, 1]``, trapezoid rule) are subtracted;
    per-query values lie in ``[-1, 1]``. Higher means the changes the counterfactual ranks
    first move the classifier towards the target quickly.

    Note: when ``x_cf == x`` the curves are constant and COUT is ``p_target(x) - p_source(x)``
    (about ``-1`` for a confidently classified query, 0 only where the classifier is indifferent).

    The spec evaluates COUT on correctly classified queries: pass ``mask`` (e.g.
    ``classifier(x).argmax(-1) == label``) to keep only those; ``source`` is normally that
    prediction.

    Args:
        classifier: The explained classifier (``probabilities(x)`` or logits); kept in eval
            mode and called without gradients.
        steps: Number of insertion increments (``steps + 1`` classifier evaluations).
        step_chunk: Steps evaluated per forward pass (memory: ``step_chunk * B`` images).
        std_correction: Degrees-of-freedom correction of the std (0: population std).

    ``update(x, x_cf, target [B], source [B], mask [B] | None = None)``;
    ``compute() -> {"cout_mean", "cout_std"}``.
    """

    values: list[Tensor]  # metric state, added in __init__

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        classifier: nn.Module,
        steps: int = 50,
        step_chunk: int = 8,
        std_correction: int = DEFAULT_STD_CORRECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if steps < 1 or step_chunk < 1:
            raise ValueError("steps and step_chunk must be >= 1")
        self.classifier = EvalOnly(classifier)
        self.steps, self.step_chunk, self.std_correction = steps, step_chunk, std_correction
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, x: Tensor, x_cf: Tensor, target: Tensor, source: Tensor, mask: Tensor | None = None) -> None:
        if mask is not None:
            mask = mask.bool()
            x, x_cf, target, source = x[mask], x_cf[mask], target[mask], source[mask]
        if len(x) == 0:
            return
        with torch.no_grad():
            p_t, p_s = insertion_curves(
                self.classifier.module, x, x_cf, target.long(), source.long(), self.steps, self.step_chunk
            )
        self.values.append((trapezoid_auc(p_t.double()) - trapezoid_auc(p_s.double())).float())

    def compute(self) -> dict[str, Tensor]:
        return mean_std_dict("cout", self.values, self.std_correction)
