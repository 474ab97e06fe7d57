"""Descriptor predictors on images: the built-in data's factors or CelebA's attributes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn


class DescriptorPredictor(L.LightningModule):
    """Backbone + linear head predicting one value per descriptor of an image.

    Two kinds, chosen by ``key``:

    * ``factors`` (built-in rendered digits): regresses the known generative factors, each
      mapped to ``[0, 1]`` with :func:`lit_cf.data.rendered.normalize_factors`; MSE loss.
    * ``attributes`` (CelebA): the 40 binary attributes; BCE loss, sigmoid outputs.

    :meth:`predict_descriptors` returns ``[B, A]`` values in ``[0, 1]`` for images in
    ``[0, 1]``; metrics (MNAC, CD, ground-truth factor scores) and attributions use it on
    queries and counterfactuals alike. Held-out quality is logged per descriptor as
    ``val/r2_<name>`` (factors) or ``val/acc_<name>`` (attributes).

    Args:
        backbone: Feature extractor exposing ``out_features``.
        key: ``factors`` or ``attributes``: the sample key holding the targets.
        names: Descriptor names, in target order.
        input_mean: Per-channel normalisation mean applied inside the model.
        input_std: Per-channel normalisation std applied inside the model.
        optimizer: Optimizer factory.
    """

    input_mean: torch.Tensor  # buffers, registered in __init__
    input_std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        key: str = "factors",
        names: Sequence[str] = ("thickness", "slant", "scale", "shift_x", "shift_y", "intensity", "mark"),
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if key not in ("factors", "attributes"):
            raise ValueError(f"key must be 'factors' or 'attributes', got {key!r}")
        self.key, self.names = key, list(names)
        self.backbone = backbone
        self.head = nn.Linear(cast(int, backbone.out_features), len(self.names))
        mean = torch.tensor(list(input_mean) if input_mean else [0.0]).view(1, -1, 1, 1)
        std = torch.tensor(list(input_std) if input_std else [1.0]).view(1, -1, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        self.optimizer_factory = optimizer
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (logits for attributes, values for factors)."""
        return self.head(self.backbone(self.normalize(x)))

    def predict_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptor values ``[B, A]`` in ``[0, 1]``."""
        out = self(x)
        return out.sigmoid() if self.key == "attributes" else out.clamp(0, 1)

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.key not in batch:
            raise ValueError(f"the data has no {self.key!r} in its samples: use data that provides them")
        y = batch[self.key].float()
        if self.key == "factors":
            from lit_cf.data.rendered import normalize_factors

            y = normalize_factors(y)
        if y.shape[1] != len(self.names):
            raise ValueError(f"{len(self.names)} descriptor names for {y.shape[1]} targets")
        return y

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.key == "attributes":
            return F.binary_cross_entropy_with_logits(out, y)
        return F.mse_loss(out, y)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), self.targets(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, y = self(batch["image"]), self.targets(batch)
        self.log("val/loss", self.loss(out, y), prog_bar=True, batch_size=len(y), sync_dist=True)
        self._val.append((self.predict_descriptors(batch["image"]).detach().cpu(), y.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        pred = torch.cat([p for p, _ in self._val])
        y = torch.cat([t for _, t in self._val])
        self._val = []
        for scores in self.quality(pred, y).items():
            self.log(f"val/{scores[0]}", scores[1])

    def quality(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Held-out R^2 per factor, or accuracy per attribute."""
        out = {}
        for j, name in enumerate(self.names):
            if self.key == "attributes":
                out[f"acc_{name}"] = float(((pred[:, j] > 0.5) == (y[:, j] > 0.5)).float().mean())
            else:
                var = y[:, j].var(unbiased=False)
                mse = ((pred[:, j] - y[:, j]) ** 2).mean()
                out[f"r2_{name}"] = float(1 - mse / var) if var > 0 else float("nan")
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
