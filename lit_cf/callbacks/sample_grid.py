"""Log a grid of training samples when fitting starts (W&B image, PNG in the run folder)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid, save_image


class SampleGridLogger(Callback):
    """Save the first ``num_samples`` training images as ``samples.png`` and log them to W&B.

    Args:
        num_samples: Images in the grid (0 disables the callback).
        nrow: Images per grid row.
    """

    def __init__(self, num_samples: int = 64, nrow: int = 8) -> None:
        self.num_samples = num_samples
        self.nrow = nrow

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # set by lightning at fit time, not declared on Trainer
        if self.num_samples <= 0 or datamodule is None or not hasattr(datamodule, "dataset"):
            return
        dataset = datamodule.dataset("train")
        n = min(self.num_samples, len(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(n)])
        grid = make_grid(images, nrow=self.nrow, padding=2, pad_value=0.5)
        if trainer.is_global_zero and trainer.log_dir is not None:
            out = Path(trainer.log_dir) / "samples.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples/train", images=[grid], step=0)
