"""Softmax classifier with an injected backbone, optionally adversarially trained."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_cf.models.adversarial import PGD
from lit_cf.models.base import ImageClassifier


class Classifier(ImageClassifier):
    """Backbone + linear head trained with cross-entropy.

    With ``adversary`` set (a :class:`~lit_cf.models.adversarial.PGD`), each training batch is
    replaced by its PGD adversarial examples (Madry et al.), which gives the robust
    classifiers the evaluation study compares with standard ones.

    Args:
        backbone: Feature extractor exposing ``out_features``.
        num_classes: Number of classes.
        input_mean: Per-channel normalisation mean applied inside the model.
        input_std: Per-channel normalisation std applied inside the model.
        optimizer: Optimizer factory.
        scheduler: Optional LR scheduler factory.
        adversary: PGD attack used for adversarial training (``None``: standard training).
        label_smoothing: Cross-entropy label smoothing.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        adversary: PGD | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes, input_mean, input_std, optimizer, scheduler)
        self.save_hyperparameters()
        if not hasattr(backbone, "out_features"):
            raise ValueError(f"backbone {type(backbone).__name__} must expose `out_features`")
        self.backbone = backbone
        self.head = nn.Linear(cast(int, backbone.out_features), num_classes)
        self.adversary = adversary
        self.label_smoothing = label_smoothing

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of normalised inputs."""
        return self.backbone(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        if self.adversary is not None:
            # attack the model in eval mode so BatchNorm statistics see only the training batch
            was_training = self.training
            self.eval()
            x = self.adversary(self, x, y)
            self.train(was_training)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/acc", acc, prog_bar=True, batch_size=len(y))
        return loss
