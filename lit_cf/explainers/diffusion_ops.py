"""Small batched pieces that FastDiME and ACE share on top of the guided sampler.

* :func:`stream_noise`: per-record standard normal draws for one named *stream* (an attempt,
  a step, an iteration), each row from a generator seeded by the record's seed and the stream
  only, so a counterfactual never depends on its chunk-mates or on how many draws another
  stream took. Drawing per stream (instead of every draw of a run up front) keeps memory at
  one step's worth of noise even for DiME's ~1,800-call chain.
* :func:`difference_mask`: the dilated, thresholded ``|x - y|`` region both methods edit in.
* :func:`posterior_variance`: the variance of ``q(x_{t_prev} | x_t, x_0)`` on a respaced grid,
  the factor guidance scales its gradient by.
* :class:`CountedDenoiser`: a denoiser wrapper counting calls per record (benchmarks, tests).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cf.explainers.diffusion_sampler import record_noise

__all__ = [
    "CountedDenoiser",
    "Denoiser",
    "difference_mask",
    "mask_to_model",
    "posterior_variance",
    "stream_noise",
    "stream_seeds",
]

_MIX = 6364136223846793005  # an odd 64-bit multiplier (Knuth's MMIX LCG) to spread stream ids
_INC = 1442695040888963407


class ModelSpace(Protocol):
    """The image <-> denoiser-space maps of a denoiser (what :func:`mask_to_model` needs)."""

    def to_model(self, x01: Tensor) -> Tensor: ...

    def to_image(self, xm: Tensor) -> Tensor: ...


class Denoiser(ModelSpace, Protocol):
    """What the methods use of a :class:`~lit_cf.models.diffusion.DiffusionModel`."""

    alphas_cumprod: Tensor

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor: ...


def stream_seeds(seeds: Tensor, *stream: int) -> Tensor:
    """Seeds of one noise stream: a fixed function of each record's seed and the stream ids."""
    out = []
    for s in seeds.tolist():  # Python ints: exact 64-bit mixing, once per stream, not per pixel
        h = int(s) % 2**64
        for v in stream:
            h = (h * _MIX + _INC + int(v)) % 2**64
        out.append(h % 2**62)
    return torch.tensor(out, dtype=torch.long)


def stream_noise(seeds: Tensor, stream: tuple[int, ...], shape: tuple[int, ...], draws: int, device: torch.device) -> Tensor:
    """``[draws, B, *shape]`` standard normal noise of one stream, row ``b`` from record ``b``'s seed only."""
    return record_noise(stream_seeds(seeds.cpu(), *stream), tuple(shape), draws, device)


def full_precision(x: Tensor) -> Tensor:
    """``x`` in at least float32: half and bfloat16 (autocast) are upcast, float64 is kept (so a
    float64 run, e.g. the benchmark's ``--precision 64``, stays float64 end to end)."""
    return x if x.dtype == torch.float64 else x.float()


def difference_mask(x: Tensor, y: Tensor, kernel: int, threshold: float) -> Tensor:
    """Where ``x`` and ``y`` differ: ``dilate(sum_c |x - y| / its per-image max, kernel) > threshold``.

    Returns a float mask ``[B, 1, H, W]`` of zeros and ones. Dilation is a ``kernel x kernel``
    max filter (odd kernel, same size); since it commutes with the threshold, dilating the
    normalised map or the thresholded map gives the same mask. An image with ``x == y``
    everywhere gets an empty mask.
    """
    diff = (full_precision(x) - full_precision(y)).abs().sum(1, keepdim=True)
    peak = diff.flatten(1).amax(1).view(-1, 1, 1, 1)
    norm = torch.where(peak > 0, diff / peak.clamp_min(1e-12), torch.zeros_like(diff))
    dilated = F.max_pool2d(norm, kernel, stride=1, padding=kernel // 2) if kernel > 1 else norm
    return (dilated > threshold).to(x.dtype)


def mask_to_model(denoiser: ModelSpace, mask_image: Tensor, channels: int) -> Tensor:
    """An image-space mask ``[B, 1, H, W]`` lifted to the denoiser's space (padded or resized as it does).

    ``to_model`` maps 0 below and 1 above zero, so thresholding at 0 keeps the mask binary; a
    border the denoiser pads with black falls outside the mask (it is kept as the query's).
    ``channels``: the images' channel count (what ``to_model`` expects).
    """
    lifted = denoiser.to_model(mask_image.expand(-1, channels, -1, -1))
    return (lifted[:, :1] > 0).to(mask_image.dtype)


def posterior_variance(alphas_cumprod: Tensor, t: int, t_prev: int) -> float:
    """Variance of ``q(x_{t_prev} | x_t, x_0)`` between two grid timesteps (``t_prev = -1``: 0)."""
    if t_prev < 0:
        return 0.0
    ab, abp = float(alphas_cumprod[t]), float(alphas_cumprod[t_prev])
    beta = 1.0 - ab / abp
    return beta * (1.0 - abp) / (1.0 - ab)


class CountedDenoiser:
    """Calls ``denoiser.eps`` and counts, per record of the chunk, how often each was denoised.

    ``rows`` names the chunk records of the batch passed in (methods run sub-batches of the
    records still active), so ``counts[i]`` is the number of denoiser evaluations record ``i``
    cost, whatever its chunk-mates did.
    """

    def __init__(self, denoiser: Denoiser, num_records: int, device: torch.device | str = "cpu") -> None:
        self.denoiser = denoiser
        self.counts = torch.zeros(num_records, dtype=torch.long, device=device)  # where rows live: no sync

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.denoiser.alphas_cumprod

    def to_model(self, x01: Tensor) -> Tensor:
        return self.denoiser.to_model(x01)

    def to_image(self, xm: Tensor) -> Tensor:
        return self.denoiser.to_image(xm)

    def eps(self, x_t: Tensor, t: int, rows: Tensor) -> Tensor:
        """Noise prediction at grid timestep ``t`` (shared by the sub-batch) for the records ``rows``."""
        self.counts[rows.to(self.counts.device)] += 1
        return self.denoiser.eps(x_t, torch.full((len(x_t),), int(t), dtype=torch.long, device=x_t.device))
