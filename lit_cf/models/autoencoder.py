"""Convolutional autoencoders with ``encode``/``decode``: generators for latent counterfactuals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn


def _conv_stack(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_prev = in_channels
    for c in channels:
        layers += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        c_prev = c
    return nn.Sequential(*layers)


def _deconv_stack(channels: Sequence[int], out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    rev = list(channels)[::-1]
    for c_in, c_out in zip(rev, rev[1:]):
        layers += [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.ConvTranspose2d(rev[-1], out_channels, 3, stride=2, padding=1, output_padding=1))
    return nn.Sequential(*layers)


OUTPUT_ACTIVATIONS = ("sigmoid", "identity")


class AutoEncoder(L.LightningModule):
    """Deterministic conv autoencoder (stride-2 convs, a linear bottleneck, MSE loss).

    Defaults follow the Counterfactual Attacks MNIST code: channels 16/32/64, 64-d latent.
    Images are in ``[0, 1]``.

    The output activation is a switch, because it decides what a gradient attack on the code
    can reach. ``sigmoid`` (default) keeps ``decode`` in ``[0, 1]``, but saturates: a pixel the
    decoder draws black (e.g. an empty corner) sits at a sigmoid output near 0, where its
    derivative is near 0 too, so a latent attack cannot switch on a feature drawn on empty
    background until a long step has left the saturated region (the ground-truth study, ``docs/results/ground_truth.md``
    measures this as the "mark path"). ``identity`` returns the last layer's output as is: the
    reconstruction loss keeps it close to ``[0, 1]`` and its gradient never vanishes; the
    counterfactual methods clamp decoded images to ``[0, 1]``
    (:meth:`lit_cf.explainers.latent.LatentMethod.decode`), callers that need valid images
    should do the same.

    Args:
        in_channels: Image channels.
        image_size: Input height/width; must be divisible by ``2 ** len(channels)`` after
            padding to the next multiple (28 is padded to 32 internally).
        channels: Channels of each stride-2 conv block.
        latent_dim: Size of the latent code.
        optimizer: Optimizer factory.
        output_activation: ``"sigmoid"`` or ``"identity"`` (see above).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (16, 32, 64),
        latent_dim: int = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {list(OUTPUT_ACTIVATIONS)}, got {output_activation!r}")
        self.output_activation = output_activation
        self.save_hyperparameters()
        factor = 2 ** len(channels)
        self.padded = -(-image_size // factor) * factor
        self.pad = self.padded - image_size
        self.image_size, self.in_channels, self.latent_dim = image_size, in_channels, latent_dim
        self.grid = self.padded // factor
        flat = channels[-1] * self.grid**2
        self.encoder = nn.Sequential(_conv_stack(in_channels, channels), nn.Flatten())
        self.to_latent = nn.Linear(flat, self.latent_out_dim(latent_dim))
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, flat), nn.ReLU(inplace=True))
        self.decoder = _deconv_stack(channels, in_channels)
        self._channels_last = channels[-1]
        self.optimizer_factory = optimizer

    def latent_out_dim(self, latent_dim: int) -> int:
        return latent_dim

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        lo = self.pad // 2
        return self.encoder(F.pad(x, (lo, self.pad - lo, lo, self.pad - lo)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent codes ``[B, latent_dim]`` of images ``[B, C, H, W]``."""
        return self.to_latent(self._features(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` from latent codes: in ``[0, 1]`` with the sigmoid output,
        close to it (not clamped) with the identity output."""
        h = self.from_latent(z).view(-1, self._channels_last, self.grid, self.grid)
        out = self.decoder(h)
        lo = self.pad // 2
        out = out[..., lo : lo + self.image_size, lo : lo + self.image_size]
        return torch.sigmoid(out) if self.output_activation == "sigmoid" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self(x)
        mse = F.mse_loss(recon, x)
        return {"loss": mse, "mse": mse}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.loss(batch["image"])
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return terms["loss"]

    def _eval(self, batch: dict[str, Any], prefix: str) -> None:
        terms = self.loss(batch["image"])
        self.log_dict(
            {f"{prefix}/{k}": v for k, v in terms.items()},
            prog_bar=prefix == "val",
            batch_size=len(batch["image"]),
            sync_dist=True,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        z = self.encode(batch["image"])
        out = {"latent": z, "reconstruction": self.decode(z)}
        if "index" in batch:
            out["index"] = batch["index"]
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class VAE(AutoEncoder):
    """Variational autoencoder (Gaussian posterior, standard normal prior, Bernoulli-like BCE).

    ``encode`` returns the posterior mean (deterministic, what latent counterfactuals start
    from); training samples with the reparameterisation trick.

    Args:
        in_channels: Image channels.
        image_size: Input height/width.
        channels: Channels of each stride-2 conv block.
        latent_dim: Size of the latent code.
        beta: Weight of the KL term.
        optimizer: Optimizer factory.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (16, 32, 64),
        latent_dim: int = 16,
        beta: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        super().__init__(in_channels, image_size, channels, latent_dim, optimizer)
        self.beta = beta

    def latent_out_dim(self, latent_dim: int) -> int:
        return 2 * latent_dim

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_latent(self._features(x)).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = self.decode(z)
        with torch.autocast(device_type=recon.device.type, enabled=False):  # BCE is not autocast-safe
            rec = F.binary_cross_entropy(recon.float(), x.float(), reduction="sum") / len(x)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / len(x)
        return {"loss": rec + self.beta * kl, "recon": rec, "kl": kl, "mse": F.mse_loss(recon, x)}
