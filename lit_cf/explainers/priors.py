"""Per-image image priors for data-free counterfactuals, batched over the images of a chunk.

A prior renders an image from per-image parameters. Every parameter tensor has the chunk size
as its leading dimension, so the explain engine's element-wise Adam optimises all images of a
chunk at once and image ``i``'s parameters never mix with image ``j``'s:

* :class:`PixelPrior` (ISO): the parameters are the pixels.
* :class:`DIPPrior`: a deep image prior (Ulyanov et al.), an untrained convolutional
  encoder-decoder with skip connections fed fixed noise. The B networks of a chunk run as one
  grouped convolution per layer (``groups=B``), so a chunk costs a few large kernels instead of
  B small ones.
* :class:`INRPrior`: an implicit neural representation, a coordinate MLP with Fourier features
  and ReLU (Tancik et al.) or sine activations (SIREN, Sitzmann et al.); the B MLPs run as
  batched matrix products (``torch.baddbmm``).

Random initialisation (weights, DIP noise) is drawn per record from the record's seed, so an
image's prior does not depend on its chunk-mates. The networks output through a sigmoid, so
rendered images lie in ``(0, 1)``; a network prior reproduces the query only approximately,
which is why :class:`~lit_cf.explainers.DISCCounterfactual` fits it first and records the
PSNR it reached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cf.explainers.base import seeded_uniform

PRIORS = ("pixels", "dip", "inr")
INR_ACTIVATIONS = ("relu", "sine")


def psnr(x: Tensor, ref: Tensor, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB of images in ``[0, 1]``, capped at ``max_db`` (identical images)."""
    mse = (x.float() - ref.float()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))).clamp(max=max_db)


class ImagePrior:
    """Interface: ``init(query, seeds) -> params`` and ``render(params) -> images in [0, 1]``."""

    name = "prior"
    needs_fit = True

    def init(self, query: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def render(self, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class PixelPrior(ImagePrior):
    """Pixels as parameters (image-space optimisation, ISO); starts exactly at the query."""

    name = "pixels"
    needs_fit = False

    def init(self, query: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        return {"x": query.detach().clone().float()}

    def render(self, params: dict[str, Tensor]) -> Tensor:
        return params["x"]


def _uniform_params(
    seeds: Tensor, shapes: dict[str, tuple[int, ...]], bounds: dict[str, float], device: torch.device
) -> dict[str, Tensor]:
    """Per-record ``U(-bound, bound)`` tensors of the given shapes from one seeded draw per record."""
    sizes = [math.prod(s) for s in shapes.values()]
    flat = seeded_uniform(seeds, (sum(sizes),), device) * 2 - 1  # [B, total] in [-1, 1)
    out, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        out[name] = flat[:, start : start + size].reshape(len(seeds), *shape) * bounds[name]
        start += size
    return out


CONV_IMPLS = ("grouped", "unfold")


def grouped_conv(x: Tensor, w: Tensor, b: Tensor, stride: int = 1, impl: str = "grouped") -> Tensor:
    """Per-image convolution: ``x [B, Cin, H, W]`` with weights ``w [B, Cout, Cin, k, k]``, bias ``[B, Cout]``.

    ``impl="grouped"``: one grouped convolution (``groups=B``) on every device. ``"unfold"``: an
    im2col product (``unfold`` and one ``baddbmm``), the earlier CPU path, kept for comparison:
    with torch 2.14 on 2 CPU cores the grouped convolution measured 1.7-3.2x faster (forward +
    backward, B = 1-128, 8-36 -> 32 channels at 14-28 px; ``scripts/bench_disc.py`` prints both).
    """
    n, cin, h, wd = x.shape
    cout, k = w.shape[1], w.shape[-1]
    if impl == "grouped":
        out = F.conv2d(
            x.reshape(1, n * cin, h, wd),
            w.reshape(n * cout, cin, k, k),
            b.reshape(n * cout),
            stride=stride,
            padding=k // 2,
            groups=n,
        )
        return out.view(n, cout, out.shape[-2], out.shape[-1])
    if impl != "unfold":
        raise ValueError(f"conv impl must be one of {list(CONV_IMPLS)}, got {impl!r}")
    cols = F.unfold(x, k, padding=k // 2, stride=stride)  # [B, Cin*k*k, L]
    out = torch.baddbmm(b.unsqueeze(2), w.reshape(n, cout, -1), cols)
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (wd + 2 * (k // 2) - k) // stride + 1
    return out.view(n, cout, ho, wo)


class DIPPrior(ImagePrior):
    """Deep image prior: a per-image conv encoder-decoder with skips, fed fixed per-image noise.

    Architecture (all 3x3 convolutions unless noted, instance normalisation and LeakyReLU 0.2
    after every hidden convolution, widths ``channels``)::

        noise [noise_channels, H, W] -> e0 (H) -> e1 (stride 2, H/2) -> e2 (stride 2, H/4)
        e2 -> upsample to H/2, concat skip1 = conv1x1(e1) -> d1
        d1 -> upsample to H,   concat skip0 = conv1x1(e0) -> d0 -> conv1x1 -> sigmoid

    The noise is ``U(-1, 1)`` scaled by ``noise_std`` (the predecessor of DISC used U(-1, 1)
    noise), drawn from the record's seed and kept fixed: only the weights are parameters.
    Weights start at PyTorch's default (Kaiming-uniform) bounds.

    Args:
        channels: Width of the hidden layers.
        noise_channels: Channels of the input noise.
        skip_channels: Channels of each skip connection.
        noise_std: Scale of the input noise.
        conv: ``grouped`` (one grouped convolution per layer) or ``unfold`` (im2col products, the
            earlier CPU path); the same networks, different kernels (see :func:`grouped_conv`).
    """

    name = "dip"

    def __init__(
        self, channels: int = 32, noise_channels: int = 8, skip_channels: int = 4, noise_std: float = 1.0, conv: str = "grouped"
    ) -> None:
        if conv not in CONV_IMPLS:
            raise ValueError(f"dip conv must be one of {list(CONV_IMPLS)}, got {conv!r}")
        self.c, self.cn, self.cs, self.noise_std, self.conv = channels, noise_channels, skip_channels, noise_std, conv

    def _shapes(self, out_channels: int) -> dict[str, tuple[int, ...]]:
        c, cn, cs = self.c, self.cn, self.cs
        layers = {
            "e0": (c, cn, 3),
            "e1": (c, c, 3),
            "e2": (c, c, 3),
            "s1": (cs, c, 1),
            "s0": (cs, c, 1),
            "d1": (c, c + cs, 3),
            "d0": (c, c + cs, 3),
            "out": (out_channels, c, 1),
        }
        shapes: dict[str, tuple[int, ...]] = {}
        for name, (cout, cin, k) in layers.items():
            shapes[f"{name}.w"] = (cout, cin, k, k)
            shapes[f"{name}.b"] = (cout,)
        return shapes

    def init(self, query: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        n, ch, h, w = query.shape
        shapes = self._shapes(ch)
        bounds = {}
        for name in shapes:
            fan_in = math.prod(shapes[name[:-2] + ".w"][1:])
            # nn.Conv2d's default init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weights and biases
            bounds[name] = 1.0 / math.sqrt(fan_in)
        params = _uniform_params(seeds, shapes, bounds, query.device)
        # the noise is a buffer-like entry: kept fixed by the caller (see DISCCounterfactual)
        noise_seeds = (seeds * 7919 + 17) % (2**62)
        params["noise"] = (seeded_uniform(noise_seeds, (self.cn, h, w), query.device) * 2 - 1) * self.noise_std
        return params

    def render(self, params: dict[str, Tensor]) -> Tensor:
        def block(x: Tensor, name: str, stride: int = 1) -> Tensor:
            y = grouped_conv(x, params[f"{name}.w"], params[f"{name}.b"], stride, self.conv)
            return F.leaky_relu(F.instance_norm(y), 0.2)

        e0 = block(params["noise"], "e0")
        e1 = block(e0, "e1", stride=2)
        e2 = block(e1, "e2", stride=2)
        s1 = grouped_conv(e1, params["s1.w"], params["s1.b"], impl=self.conv)
        d1 = block(torch.cat([F.interpolate(e2, size=e1.shape[-2:], mode="nearest"), s1], 1), "d1")
        s0 = grouped_conv(e0, params["s0.w"], params["s0.b"], impl=self.conv)
        d0 = block(torch.cat([F.interpolate(d1, size=e0.shape[-2:], mode="nearest"), s0], 1), "d0")
        return torch.sigmoid(grouped_conv(d0, params["out.w"], params["out.b"], impl=self.conv))


class INRPrior(ImagePrior):
    """Implicit neural representation: a per-image coordinate MLP ``(u, v) -> pixel``.

    Coordinates lie in ``[-1, 1]^2``. With ``activation="relu"`` they are first mapped to
    Fourier features ``[sin(2 pi B p), cos(2 pi B p)]`` with a fixed Gaussian matrix
    ``B ~ N(0, fourier_scale^2)`` (``fourier_features`` frequencies, the same for every image:
    drawn from a generator seeded with 0, so it is part of the architecture, not of the chunk).
    With ``activation="sine"`` (SIREN) the raw coordinates enter, the hidden layers compute
    ``sin(omega_0 (W h + b))`` with SIREN's initialisation. The output layer is linear followed
    by a sigmoid in both cases.

    Args:
        hidden: Width of the hidden layers.
        layers: Number of hidden layers.
        activation: ``"relu"`` (with Fourier features) or ``"sine"`` (SIREN).
        fourier_features: Number of frequencies (relu only).
        fourier_scale: Standard deviation of the frequencies, in cycles per image half-width.
        omega0: SIREN's frequency factor (sine only).
    """

    name = "inr"

    def __init__(
        self,
        hidden: int = 64,
        layers: int = 3,
        activation: str = "relu",
        fourier_features: int = 64,
        fourier_scale: float = 3.0,
        omega0: float = 30.0,
    ) -> None:
        if activation not in INR_ACTIVATIONS:
            raise ValueError(f"inr activation must be one of {list(INR_ACTIVATIONS)}, got {activation!r}")
        if layers < 1:
            raise ValueError(f"inr layers must be >= 1, got {layers}")
        self.hidden, self.layers, self.activation = hidden, layers, activation
        self.fourier_features, self.fourier_scale, self.omega0 = fourier_features, fourier_scale, omega0
        self._coords: dict[tuple, Tensor] = {}

    def inputs(self, h: int, w: int, device: torch.device) -> Tensor:
        """Network inputs for an ``h x w`` image: ``[h*w, d]`` (cached per size and device)."""
        key = (h, w, str(device))
        if key not in self._coords:
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            p = torch.stack([ys, xs], -1).reshape(-1, 2)
            if self.activation == "relu":
                g = torch.Generator().manual_seed(0)
                freqs = torch.randn(2, self.fourier_features, generator=g) * self.fourier_scale
                proj = 2 * math.pi * p @ freqs
                p = torch.cat([proj.sin(), proj.cos()], -1)
            self._coords[key] = p.to(device)
        return self._coords[key]

    def init(self, query: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        n, ch, h, w = query.shape
        d_in = self.inputs(h, w, query.device).shape[1]
        dims = [d_in] + [self.hidden] * self.layers + [ch]
        shapes: dict[str, tuple[int, ...]] = {}
        bounds: dict[str, float] = {}
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            shapes[f"l{i}.w"], shapes[f"l{i}.b"] = (a, b), (b,)
            if self.activation == "sine":
                bound = 1.0 / a if i == 0 else math.sqrt(6.0 / a) / self.omega0
            else:
                bound = 1.0 / math.sqrt(a)  # nn.Linear's default bounds
            bounds[f"l{i}.w"] = bound
            bounds[f"l{i}.b"] = 1.0 / math.sqrt(a)
        params = _uniform_params(seeds, shapes, bounds, query.device)
        params["_shape"] = torch.zeros(n, ch, h, w, device=query.device)  # carries the image size, never optimised
        return params

    def render(self, params: dict[str, Tensor]) -> Tensor:
        n, ch, h, w = params["_shape"].shape
        x = self.inputs(h, w, params["_shape"].device).expand(n, -1, -1)
        last = self.layers
        for i in range(last + 1):
            x = torch.baddbmm(params[f"l{i}.b"].unsqueeze(1), x, params[f"l{i}.w"])
            if i < last:
                x = torch.sin(self.omega0 * x) if self.activation == "sine" else F.relu(x)
        return torch.sigmoid(x).transpose(1, 2).reshape(n, ch, h, w)


def fixed_entries(params: dict[str, Tensor]) -> set[str]:
    """Entries of a prior's parameters that are inputs, not weights (never optimised)."""
    return {k for k in params if k == "noise" or k.startswith("_")}


__all__ = ["CONV_IMPLS", "DIPPrior", "INRPrior", "ImagePrior", "PixelPrior", "PRIORS", "fixed_entries", "grouped_conv", "psnr"]
