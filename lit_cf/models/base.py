"""What every lit-cf classifier shares: input normalisation, metrics and checks against the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ImageClassifier(L.LightningModule):
    """Base class for the classifiers lit-cf trains and explains.

    Inputs are images with pixels in ``[0, 1]`` (the lit-cf data contract); the model owns its
    normalisation, so explainers optimise plain pixels and clamp them to ``[0, 1]``.
    ``forward`` returns logits; :meth:`probabilities` returns class probabilities.

    Args:
        num_classes: Number of classes; checked against the datamodule at setup.
        input_mean: Per-channel mean subtracted inside the model (``None``: no shift).
        input_std: Per-channel std divided inside the model (``None``: no scaling).
        optimizer: Optimizer factory called with the parameters.
        scheduler: Optional learning-rate scheduler factory called with the optimizer.
    """

    input_mean: torch.Tensor  # buffers, registered in __init__
    input_std: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        mean = torch.tensor(list(input_mean) if input_mean is not None else [0.0]).view(1, -1, 1, 1)
        std = torch.tensor(list(input_std) if input_std is not None else [1.0]).view(1, -1, 1, 1)
        if (std <= 0).any():
            raise ValueError("input_std must be positive")
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "ece": MulticlassCalibrationError(num_classes, n_bins=15),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # ----------------------------------------------------------------- model API
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalised inputs (subclasses implement)."""
        raise NotImplementedError(f"{type(self).__name__} must implement logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.normalize(x))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).softmax(dim=-1)

    # ----------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes and data_classes != self.num_classes:
            raise ValueError(
                f"{type(self).__name__} has num_classes={self.num_classes} but "
                f"{type(datamodule).__name__} has {data_classes} classes; set model.init_args.num_classes "
                f"to {data_classes} (or use the data's matching model config)."
            )

    # ----------------------------------------------------------------- loops
    def _eval_step(self, batch: dict[str, Any], metrics: MetricCollection, prefix: str) -> torch.Tensor:
        probs = self.probabilities(batch["image"])
        metrics.update(probs, batch["label"])
        loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), batch["label"])
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", batch_size=len(probs), sync_dist=True)
        return probs

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.probabilities(batch["image"])
        out = {"probs": probs, "pred": probs.argmax(-1)}
        for key in ("label", "index"):
            if key in batch:
                out[key] = batch[key]
        return out

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


def freeze(module: ModuleT) -> ModuleT:
    """Put ``module`` in eval mode with gradients off for all its parameters (explain time)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
