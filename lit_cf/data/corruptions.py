"""Test-time image corruptions in the spirit of ImageNet-C (Hendrycks & Dietterich, 2019).

Every corruption is a pure-torch function ``fn(x, severity, generator) -> Tensor`` on a batch
``x: [B, C, H, W]`` of floats in ``[0, 1]`` (``C`` is 1 or 3, ``H, W >= 8``). The output has the
shape and dtype of ``x`` and is clamped to ``[0, 1]``. Work is batched (``conv2d`` kernels,
``grid_sample``, ``F.interpolate``); only JPEG loops over images (one codec call each).

Severity tables (level 1 .. 5). ImageNet-C values were chosen for 224 px images; spatial ones
below are rescaled so that they stay visible but recognisable at 28 px and 64 px:

=================  ====================================  ================================
corruption         parameter                             severity 1 .. 5
=================  ====================================  ================================
gaussian_noise     noise std                             0.08, 0.12, 0.18, 0.26, 0.38
shot_noise         Poisson photons per unit intensity    60, 25, 12, 5, 3
impulse_noise      fraction of salt-and-pepper values    0.03, 0.06, 0.09, 0.17, 0.27
gaussian_blur      Gaussian sigma (px)                   0.5, 0.75, 1.0, 1.5, 2.0
defocus_blur       disk radius (px, anti-aliased edge)   1.0, 1.5, 2.0, 2.5, 3.0
motion_blur        streak length (px), angle ~U(-45,45)  3, 4, 5, 7, 9
contrast           factor around the per-image mean     0.4, 0.3, 0.2, 0.1, 0.05
brightness         added to HSV value (V)                0.1, 0.2, 0.3, 0.4, 0.5
pixelate           downscale factor (area, then nearest) 0.6, 0.5, 0.4, 0.3, 0.25
jpeg               JPEG quality                          25, 18, 15, 10, 7
elastic            displacement std (fraction of side)   0.015, 0.025, 0.035, 0.05, 0.07
=================  ====================================  ================================

``elastic`` smooths white noise with a Gaussian of sigma ``0.1 * min(H, W)`` and rescales each
sample's field to the tabled standard deviation before warping with ``grid_sample``.

Randomness and determinism: the random corruptions (the three noises, ``motion_blur``'s angle
and ``elastic``'s displacement field) accept either one ``torch.Generator`` (draws for the whole
batch at once), a sequence of ``B`` generators (one per sample: sample ``i`` draws only from
``generator[i]``), or ``None`` (global RNG). :func:`corrupt` builds one CPU generator per sample
from per-sample integer seeds, so a sample corrupted inside a batch equals the same sample
corrupted alone with the same seed, on any device. An ``int`` seed ``s`` for a batch expands to
``sample_seed(s, i)`` for sample ``i`` -- the same seeds :class:`CorruptedDataset` uses.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

Generators = torch.Generator | Sequence[torch.Generator] | None
Corruption = Callable[[Tensor, int, Generators], Tensor]

SEVERITIES = (1, 2, 3, 4, 5)

#: Per-severity parameters (index ``severity - 1``); see the module docstring for units.
SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),
    "defocus_blur": (1.0, 1.5, 2.0, 2.5, 3.0),
    "motion_blur": (3, 4, 5, 7, 9),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg": (25, 18, 15, 10, 7),
    "elastic": (0.015, 0.025, 0.035, 0.05, 0.07),
}
ELASTIC_SMOOTHING = 0.1  # Gaussian sigma of the displacement field, as a fraction of min(H, W)
MOTION_MAX_ANGLE = 45.0  # degrees; streak angle drawn uniformly from [-45, 45]

CORRUPTIONS: dict[str, Corruption] = {}


# --------------------------------------------------------------------------- validation
def check_corruption(name: str, severity: int) -> None:
    """Validate a corruption name and severity.

    Args:
        name: Key of :data:`CORRUPTIONS`.
        severity: Integer in ``1..5``.

    Raises:
        ValueError: If ``name`` is unknown or ``severity`` is not an int in ``1..5``.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}")
    if not isinstance(severity, numbers.Integral) or isinstance(severity, bool) or int(severity) not in SEVERITIES:
        raise ValueError(f"corruption severity must be an int in {list(SEVERITIES)}, got {severity!r}")


def _register(fn: Callable[[Tensor, float, Generators], Tensor]) -> Corruption:
    """Register ``fn(x, param, generator)`` as a corruption taking a severity instead.

    The wrapper validates inputs, looks the parameter up in :data:`SEVERITY_PARAMS`, computes
    in float32 and returns the input dtype, clamped to ``[0, 1]``.
    """
    name = fn.__name__.lstrip("_")

    def corruption(x: Tensor, severity: int, generator: Generators = None) -> Tensor:
        check_corruption(name, severity)
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{name} expects a float batch [B, C, H, W], got {tuple(x.shape)} {x.dtype}")
        if isinstance(generator, Sequence) and len(generator) != x.shape[0]:
            raise ValueError(f"{name}: got {len(generator)} generators for a batch of {x.shape[0]}")
        param = SEVERITY_PARAMS[name][int(severity) - 1]
        out = fn(x.float().clamp(0, 1), param, generator)
        return out.clamp(0, 1).to(x.dtype)

    corruption.__name__ = corruption.__qualname__ = name
    corruption.__doc__ = fn.__doc__
    CORRUPTIONS[name] = corruption
    return corruption


# --------------------------------------------------------------------------- randomness
def _draw(sampler: Callable[..., Tensor], shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """Draw ``sampler((B, *shape))``; per-sample from a generator list, else in one go."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return sampler(tuple(shape), generator=generator, device=dev).to(device)
    draws = [sampler(tuple(shape[1:]), generator=g, device=g.device).to(device) for g in generator]
    return torch.stack(draws)


def _poisson(rate: Tensor, generator: Generators) -> Tensor:
    """Poisson samples of ``rate`` (per-sample generators draw sample by sample)."""
    if generator is None:
        return torch.poisson(rate)
    if isinstance(generator, torch.Generator):
        return torch.poisson(rate.to(generator.device), generator=generator).to(rate.device)
    draws = [torch.poisson(r.to(g.device), generator=g).to(rate.device) for r, g in zip(rate, generator)]
    return torch.stack(draws)


# --------------------------------------------------------------------------- kernels
def _depthwise(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every channel of ``x [B, C, H, W]`` with a 2-D ``kernel``.

    ``kernel`` is ``[kh, kw]`` (shared) or ``[B, kh, kw]`` (one per sample); odd sizes,
    replicate padding so that the output keeps ``H, W``.
    """
    b, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    if kernel.dim() == 2:
        weight = kernel.expand(c, 1, kh, kw)
        return F.conv2d(padded, weight.to(x), groups=c)
    weight = kernel[:, None].expand(b, c, kh, kw).reshape(b * c, 1, kh, kw)
    out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight.to(x), groups=b * c)
    return out.reshape(b, c, h, w)


def _gaussian_kernel(sigma: float, device: torch.device) -> Tensor:
    """Normalised 2-D Gaussian kernel of radius ``ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def _gaussian_smooth(x: Tensor, sigma: float) -> Tensor:
    return _depthwise(x, _gaussian_kernel(sigma, x.device))


# --------------------------------------------------------------------------- corruptions
@_register
def _gaussian_noise(x: Tensor, std: float, generator: Generators) -> Tensor:
    """Additive white Gaussian noise."""
    return x + std * _draw(torch.randn, x.shape, generator, x.device)


@_register
def _shot_noise(x: Tensor, photons: float, generator: Generators) -> Tensor:
    """Poisson (photon) noise: ``Poisson(x * photons) / photons``."""
    return _poisson(x * photons, generator) / photons


@_register
def _impulse_noise(x: Tensor, amount: float, generator: Generators) -> Tensor:
    """Salt-and-pepper noise on a fraction ``amount`` of values (channels independently)."""
    u = _draw(torch.rand, x.shape, generator, x.device)
    out = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where(u > 1 - amount / 2, torch.ones_like(x), out)


@_register
def _gaussian_blur(x: Tensor, sigma: float, generator: Generators) -> Tensor:
    """Gaussian blur of standard deviation ``sigma`` pixels (deterministic)."""
    return _gaussian_smooth(x, sigma)


@_register
def _defocus_blur(x: Tensor, radius: float, generator: Generators) -> Tensor:
    """Defocus blur: convolution with an anti-aliased disk of ``radius`` pixels (deterministic)."""
    r = math.ceil(radius)
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    dist = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    disk = (radius + 0.5 - dist).clamp(0, 1)  # linear coverage ramp over the edge pixel
    return _depthwise(x, disk / disk.sum())


@_register
def _motion_blur(x: Tensor, length: float, generator: Generators) -> Tensor:
    """Linear motion blur: a centred streak of ``length`` px at a random angle per sample."""
    b = x.shape[0]
    angle = (2 * _draw(torch.rand, (b,), generator, x.device) - 1) * math.radians(MOTION_MAX_ANGLE)
    r = math.ceil((length - 1) / 2)
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    py, px = t[:, None], t[None, :]  # kernel pixel centres
    dx, dy = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    half = (length - 1) / 2
    along = (px * dx + py * dy).clamp(-half, half)  # projection onto the streak, clipped to it
    dist = torch.sqrt((px - along * dx) ** 2 + (py - along * dy) ** 2)  # distance to the segment
    kernel = (1 - dist).clamp(min=0)
    return _depthwise(x, kernel / kernel.sum(dim=(-2, -1), keepdim=True))


@_register
def _contrast(x: Tensor, factor: float, generator: Generators) -> Tensor:
    """Contrast reduction: scale deviations from the per-image mean by ``factor``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


@_register
def _brightness(x: Tensor, delta: float, generator: Generators) -> Tensor:
    """Brightness: add ``delta`` to the HSV value ``V = max_c x`` keeping hue and saturation.

    Scaling RGB by ``V' / V`` changes V only; black pixels (``V = 0``) become grey ``V'``.
    For one channel this is ``x + delta``.
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + delta).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp(min=1e-12)), v_new.expand_as(x))


@_register
def _pixelate(x: Tensor, factor: float, generator: Generators) -> Tensor:
    """Pixelation: area-downsample by ``factor``, then nearest-upsample back."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


@_register
def _jpeg(x: Tensor, quality: float, generator: Generators) -> Tensor:
    """JPEG compression at ``quality`` (Pillow's libjpeg codec on uint8 images)."""
    images = (x * 255).round().to(device="cpu", dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    # The codec works image by image, so this loops over the batch; fine for test-time data.
    # Pillow rather than torchvision.io keeps this module free of the slow torchvision import.
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buffer).convert("L" if image.shape[-1] == 1 else "RGB"))
        out.append(torch.from_numpy(decoded.copy()).reshape(image.shape))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.device, torch.float32) / 255


@_register
def _elastic(x: Tensor, std: float, generator: Generators) -> Tensor:
    """Elastic warp: smoothed random displacement field of std ``std * min(H, W)`` px."""
    b, _, h, w = x.shape
    side = min(h, w)
    field = _gaussian_smooth(_draw(torch.randn, (b, 2, h, w), generator, x.device), ELASTIC_SMOOTHING * side)
    field = field - field.mean(dim=(1, 2, 3), keepdim=True)
    field = field / field.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12) * (std * side)  # pixels
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)  # pixel centres, align_corners=False
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((gx + field[:, 0] * 2 / w, gy + field[:, 1] * 2 / h), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --------------------------------------------------------------------------- public API
def sample_seed(seed: int, index: int) -> int:
    """Deterministic per-sample seed ``(seed * 1_000_003 + index) mod 2**63``."""
    return (int(seed) * 1_000_003 + int(index)) % (1 << 63)


def corrupt(x: Tensor, name: str, severity: int, seed: int | Sequence[int] | Tensor | None = 0) -> Tensor:
    """Apply corruption ``name`` at ``severity`` with per-sample deterministic randomness.

    Args:
        x: Float images in ``[0, 1]``, ``[B, C, H, W]`` (or one image ``[C, H, W]``).
        name: Key of :data:`CORRUPTIONS`.
        severity: Integer in ``1..5``.
        seed: Per-sample seeds (sequence or 1-D tensor of length ``B``), or an ``int`` ``s``
            expanded to ``sample_seed(s, i)`` for sample ``i``, or ``None`` for the global RNG.
            Sample ``i`` draws from its own CPU generator seeded with its seed, so its result
            does not depend on the rest of the batch.

    Returns:
        The corrupted images, same shape and dtype as ``x``, in ``[0, 1]``.
    """
    check_corruption(name, severity)
    single = x.dim() == 3
    batch = x[None] if single else x
    b = batch.shape[0]
    generators: list[torch.Generator] | None = None
    if seed is not None:
        if isinstance(seed, Tensor):
            seeds = [int(s) for s in seed.reshape(-1).tolist()]
        elif isinstance(seed, (int, numbers.Integral)):
            seeds = [sample_seed(int(seed), i) for i in range(b)]
        else:
            seeds = [int(s) for s in seed]
        if len(seeds) != b:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {b}")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = CORRUPTIONS[name](batch, severity, generators)
    return out[0] if single else out


class CorruptedDataset(Dataset):
    """Wrap a dataset of sample dicts, corrupting ``sample["image"]`` deterministically.

    Sample ``i`` is corrupted with seed ``sample_seed(seed, i)``, so every epoch, worker and
    batch composition sees the same corrupted image. All other keys pass through unchanged;
    the corruption name and severity are attributes (samples stay tensor-only for collation).

    Args:
        dataset: Map-style dataset whose items are dicts with a float ``image [C, H, W]``.
        name: Key of :data:`CORRUPTIONS`.
        severity: Integer in ``1..5``.
        seed: Base seed of the per-sample seeds.
    """

    def __init__(self, dataset: Dataset, name: str, severity: int, seed: int = 0) -> None:
        self.check(name, severity)
        self.dataset = dataset
        self.name = name
        self.severity = int(severity)
        self.seed = int(seed)

    @staticmethod
    def check(name: str, severity: int) -> None:
        """Raise ``ValueError`` naming the valid choices if ``name``/``severity`` are invalid."""
        check_corruption(name, severity)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        sample = dict(self.dataset[i])
        sample["image"] = corrupt(sample["image"], self.name, self.severity, seed=[sample_seed(self.seed, i)])
        return sample

    def __repr__(self) -> str:
        cls = type(self).__name__
        return f"{cls}({self.name!r}, severity={self.severity}, seed={self.seed}, n={len(self)})"
