"""The guided reverse-diffusion sampler the diffusion counterfactual methods share.

Pure and batched: every function takes one timestep per image (``t``: ``LongTensor [B]``) and
touches no global random state. Per-image independence comes from :class:`NoiseStream` /
:func:`record_noise`: row ``b`` of every draw comes from a generator seeded by the record's own
seed only, so a counterfactual never depends on which records share its chunk, and the same
seed gives the same output.

The schedule math lives with the model (:mod:`lit_cf.models.diffusion`, where training and
validation use it too) and is re-exported here: :func:`respaced_timesteps`, :func:`q_sample`,
:func:`x0_from_eps`, :func:`ddpm_posterior`, :func:`ddpm_step`, :func:`ddim_step`.

:func:`guided_sample` runs a reverse chain whose mean (DDPM) or noise estimate (DDIM) is
shifted by a guidance callback, and keeps snapshots of the clean estimate x0-hat (the
progression strips that ``explain`` draws from the ``stages`` tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lit_cf.models.base import freeze
from lit_cf.models.diffusion import (
    DiffusionModel,
    _alpha_bar,
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    previous_timesteps,
    q_sample,
    respaced_timesteps,
    x0_from_eps,
)
from lit_cf.utils.checkpoint import load_module

SAMPLERS = ("ddpm", "ddim")


def load_diffusion(path: str | Path) -> DiffusionModel:
    """Load a ``lit-cf fit`` DDPM checkpoint safely (weights only), frozen, in eval mode.

    Raises:
        UserError: missing or unreadable file, or a checkpoint of another kind of model.
    """
    return freeze(load_module(path, DiffusionModel))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63 - 1))


class NoiseStream:
    """Per-record standard-normal (and uniform) draws, one generator per record.

    Draw ``k`` of record ``b`` depends only on ``seeds[b]`` and ``k``. Draws are made on the CPU
    (bit-identical across devices and chunkings) and moved to ``device``. Uniform draws (for
    random augmentations) come from a second generator per record, so switching them on does
    not change the noise.

    Args:
        seeds: ``LongTensor [B]`` of record seeds.
        shape: Shape of one record's draw (e.g. the denoiser's ``(C, S, S)``).
        device: Where draws are returned.
    """

    def __init__(self, seeds: Tensor, shape: Sequence[int], device: torch.device | str) -> None:
        self.shape, self.device = tuple(shape), torch.device(device)
        seed_list = [int(s) for s in seeds.tolist()]
        # one generator per record: the loop is over the chunk once per draw, not per pixel
        self._normal = [_generator(s) for s in seed_list]
        self._uniform = [_generator(s * 7_919 + 104_729) for s in seed_list]

    def __len__(self) -> int:
        return len(self._normal)

    def normal(self) -> Tensor:
        """The next draw ``[B, *shape]`` of standard normal noise."""
        if not self._normal:
            return torch.empty(0, *self.shape, device=self.device)
        return torch.stack([torch.randn(self.shape, generator=g) for g in self._normal]).to(self.device)

    def uniform(self, shape: Sequence[int]) -> Tensor:
        """The next draw ``[B, *shape]`` of uniform ``[0, 1)`` numbers (augmentation parameters)."""
        if not self._uniform:
            return torch.empty(0, *shape, device=self.device)
        return torch.stack([torch.rand(tuple(shape), generator=g) for g in self._uniform]).to(self.device)


def record_noise(seeds: Tensor, shape: tuple[int, ...], draws: int, device: torch.device | str) -> Tensor:
    """``[draws, B, *shape]`` standard normal noise; row ``b`` from a generator seeded by ``seeds[b]`` only.

    Draw ``k`` is the noise a sampler uses at its call ``k`` (the same as the ``k``-th
    :meth:`NoiseStream.normal` of a stream with these seeds).
    """
    stream = NoiseStream(seeds, shape, device)
    return torch.stack([stream.normal() for _ in range(draws)]) if draws else torch.empty(0, len(seeds), *shape)


@dataclass
class GuidanceStep:
    """What a guidance callback sees at one reverse step (denoiser space, one row per image).

    ``x_t`` requires grad when the sampler runs with ``grad_through_denoiser`` (then ``eps``
    and ``x0_hat`` carry the denoiser's graph); otherwise all are detached.
    """

    k: int
    t: Tensor
    t_prev: Tensor
    x_t: Tensor
    eps: Tensor
    x0_hat: Tensor
    mean: Tensor
    var: Tensor


Guidance = Callable[[GuidanceStep], Tensor]


def stage_indices(num_steps: int, num_stages: int) -> list[int]:
    """Steps after which x0-hat is kept: ``num_stages`` (at most ``num_steps``) evenly spaced, the last one
    the final step."""
    k = min(num_stages, num_steps)
    return [num_steps * (s + 1) // k - 1 for s in range(k)] if k > 0 else []


def guided_sample(
    model: DiffusionModel,
    x_start: Tensor,
    timesteps: Tensor,
    guidance: Guidance | None,
    noise: NoiseStream,
    sampler: str = "ddpm",
    grad_through_denoiser: bool = False,
    clip_denoised: bool = True,
    num_stages: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Run the reverse chain from ``x_start`` (at ``timesteps[0]``) with a guidance shift per step.

    At step ``k`` (``t -> t_prev``): ``eps = model.eps(x_t, t)``, ``x0_hat`` from it; the posterior
    ``mean, var`` of ``q(x_{t_prev} | x_t, x0_hat)`` (x0-hat clipped to ``[-1, 1]`` when
    ``clip_denoised``); ``g = guidance(step)`` (a direction of ascent in denoiser space, or
    ``None``/no callback: unguided). Then

    * ``ddpm``: ``x_{t_prev} = mean + var * g + sqrt(var) * noise`` (the guided-diffusion mean
      shift; the noise is drawn from ``noise`` at every step, also the last, where ``var = 0``);
    * ``ddim`` (eta = 0): the noise estimate becomes ``eps - sqrt(1 - a_t) * g`` (classifier
      guidance for DDIM, Dhariwal & Nichol), and ``x_{t_prev}`` is the DDIM step from it.

    Args:
        model: The DDPM (its EMA denoiser is called).
        x_start: ``[B, C, S, S]`` in denoiser space.
        timesteps: Descending grid (:func:`respaced_timesteps`); the chain ends at clean.
        guidance: Callback ``GuidanceStep -> [B, C, S, S]`` shift (see above).
        noise: Per-record noise stream (DDPM steps draw one normal per step).
        sampler: ``ddpm`` or ``ddim``.
        grad_through_denoiser: Let the callback differentiate through the denoiser
            (``x_t`` requires grad and ``eps``/``x0_hat`` keep their graph).
        clip_denoised: Clip x0-hat to ``[-c, c]`` for the step, ``c = model.clip_value`` (1: the
            image range; a latent DDPM's code range), the callback sees it unclipped.
        num_stages: x0-hat snapshots to keep (:func:`stage_indices`); 0: none.

    Returns:
        ``(x_0, stages)``: the final sample in denoiser space and ``[B, K, C, S, S]`` clipped
        x0-hat snapshots in denoiser space (the last is the final sample), or ``None``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    ac = model.alphas_cumprod
    clip = float(getattr(model, "clip_value", 1.0))
    prev = previous_timesteps(timesteps)
    keep = set(stage_indices(len(timesteps), num_stages))
    stages: list[Tensor] = []
    x_t = x_start.detach()
    b = len(x_t)
    for k, (t_s, tp_s) in enumerate(zip(timesteps.tolist(), prev.tolist())):
        t = torch.full((b,), t_s, device=x_t.device, dtype=torch.long)
        t_prev = torch.full_like(t, tp_s)
        x_in = x_t.detach().requires_grad_(grad_through_denoiser)
        with torch.set_grad_enabled(grad_through_denoiser):
            eps = model.eps(x_in, t)
            x0_hat = x0_from_eps(x_in, eps, t, ac)
        x_det = x_in.detach()
        with torch.no_grad():
            x0_step = x0_hat.detach().clamp(-clip, clip) if clip_denoised else x0_hat.detach()
            mean, var = ddpm_posterior(x_det, x0_step, t, t_prev, ac)
        shift = None
        if guidance is not None:
            step = GuidanceStep(
                k,
                t,
                t_prev,
                x_in,
                eps if grad_through_denoiser else eps.detach(),
                x0_hat if grad_through_denoiser else x0_hat.detach(),
                mean,
                var,
            )
            with torch.enable_grad():
                shift = guidance(step)
            shift = shift.detach() if shift is not None else None
        with torch.no_grad():
            eps = eps.detach()
            if sampler == "ddpm":
                z = noise.normal().to(x_det)
                x_t = mean + (var * shift if shift is not None else 0) + var.sqrt() * z
            else:
                a_t = _alpha_bar(ac, t, x_det.dim()).to(x_det)
                if shift is not None:
                    eps = eps - (1 - a_t).sqrt() * shift
                    x0_step = x0_from_eps(x_det, eps, t, ac)
                    x0_step = x0_step.clamp(-clip, clip) if clip_denoised else x0_step
                if clip_denoised:  # the noise estimate consistent with the clipped x0-hat
                    eps = (x_det - a_t.sqrt() * x0_step) / (1 - a_t).sqrt()
                x_t = ddim_step(x_det, x0_step, eps, t, t_prev, ac)
            x0_keep = x0_step
            if k in keep:
                stages.append((x_t if k == len(timesteps) - 1 else x0_keep).detach().clamp(-clip, clip))
    return x_t.detach(), (torch.stack(stages, 1) if stages else None)


def noised_start(model: DiffusionModel, x01: Tensor, timesteps: Tensor, noise: NoiseStream) -> Tensor:
    """The query noised to ``timesteps[0]`` (draw 0 of ``noise``): the start of a guided chain."""
    x0 = model.to_model(x01)
    t0 = timesteps[:1].expand(len(x0)).to(x0.device)
    return q_sample(x0, t0, noise.normal().to(x0), model.alphas_cumprod)


__all__ = [
    "SAMPLERS",
    "GuidanceStep",
    "NoiseStream",
    "ddim_step",
    "ddpm_posterior",
    "ddpm_step",
    "guided_sample",
    "load_diffusion",
    "noised_start",
    "q_sample",
    "record_noise",
    "respaced_timesteps",
    "stage_indices",
    "x0_from_eps",
]
