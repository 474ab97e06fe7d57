"""Out-of-distribution detection with a DUQ model: certainties over a data split and AUROC.

The DUQ paper scores OOD detection with the model's certainty ``max_c K_c(x)``: in-distribution
images should be certain, OOD images uncertain. AUROC takes the OOD images as the positive class
and ``-certainty`` as the score (1: every OOD image less certain than every in-distribution one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

__all__ = ["KernelModel", "duq_certainties", "ood_auroc"]


class KernelModel(Protocol):
    """Anything with DUQ's ``kernel(x) -> [B, C]`` on images in ``[0, 1]`` (e.g. ``DUQClassifier``)."""

    @property
    def training(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    def kernel(self, x: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> Any: ...


@torch.no_grad()
def duq_certainties(model: KernelModel, batches: Iterable[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(certainty max_c K_c, prediction argmax_c K_c, label)`` over ``batches`` of
    ``{"image", "label"}`` (e.g. ``datamodule.loader("test")``), in eval mode; the model's
    training flag is restored afterwards. The model normalises the images itself."""
    was_training = model.training
    model.train(False)
    cert, pred, label = [], [], []
    try:
        for batch in batches:
            k = model.kernel(batch["image"].to(model.device))
            cert.append(k.amax(-1).cpu())
            pred.append(k.argmax(-1).cpu())
            label.append(batch["label"].cpu())
    finally:
        model.train(was_training)
    if not cert:
        raise ValueError("duq_certainties: no batches")
    return torch.cat(cert), torch.cat(pred), torch.cat(label)


def ood_auroc(in_certainty: Tensor, ood_certainty: Tensor) -> float:
    """AUROC of telling OOD images (positive) from in-distribution ones by ``-certainty``.

    Ties count one half (the Mann-Whitney form of AUROC).
    """
    if not len(in_certainty) or not len(ood_certainty):
        raise ValueError("ood_auroc needs at least one in-distribution and one OOD certainty")
    scores = torch.cat([-in_certainty.float().flatten(), -ood_certainty.float().flatten()])
    labels = torch.cat([torch.zeros(in_certainty.numel()), torch.ones(ood_certainty.numel())]).long()
    return float(binary_auroc(scores, labels))
