"""A tiny stand-in denoiser and classifier for fast, model-free tests of the diffusion methods."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_cf.models import Classifier, ConvNet
from lit_cf.models.base import freeze

SIZE = 12


class TinyDenoiser(nn.Module):
    """``eps(x_t, t)``: two random convolutions of ``x_t`` and the timestep; linear-beta schedule."""

    def __init__(self, channels: int = 1, size: int = SIZE, num_train_timesteps: int = 1000, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels + 1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        betas = torch.linspace(1e-4, 0.02, num_train_timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))
        self.image_shape = (channels, size, size)
        self.num_train_timesteps = num_train_timesteps
        self.calls = 0

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += len(x_t)
        tt = (t.to(x_t.dtype) / self.num_train_timesteps).view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
        return self.conv2(torch.tanh(self.conv1(torch.cat([x_t, tt], 1))))

    def to_model(self, x01: Tensor) -> Tensor:
        return x01 * 2 - 1

    def to_image(self, xm: Tensor) -> Tensor:
        return (xm + 1) / 2


def tiny_classifier(size: int = SIZE, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(ConvNet(1, (4, 8), 16, image_size=size), num_classes=10)
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # confident, input-sensitive outputs without training
    return freeze(model.eval())


def wire(method: Any, denoiser: TinyDenoiser, classifier: nn.Module) -> Any:
    """Attach models to a diffusion method without checkpoint files (what ``attach`` does)."""
    method.classifier = classifier
    method.diffusion = denoiser  # what attach() loads from the checkpoint
    if getattr(method, "perceptual_weight", 0):
        from lit_cf.explainers.fastdime import PerceptualTerm

        method.perceptual = PerceptualTerm(classifier)
    return method


def batch(images: Tensor, targets: list[int], seeds: list[int]) -> dict[str, Tensor]:
    return {"image": images, "target": torch.tensor(targets), "seed": torch.tensor(seeds)}


class PaddingDenoiser(TinyDenoiser):
    """Works on images padded by ``pad`` black pixels per side, like a 28 -> 32 px DDPM."""

    def __init__(self, pad: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        self.pad = pad

    def to_model(self, x01: Tensor) -> Tensor:
        return torch.nn.functional.pad(x01 * 2 - 1, (self.pad,) * 4, value=-1.0)

    def to_image(self, xm: Tensor) -> Tensor:
        p = self.pad
        return (xm[..., p:-p, p:-p] + 1) / 2
