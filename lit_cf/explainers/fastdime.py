"""FastDiME (Weng et al., 2024) and DiME (Jeanneret et al., 2022): guided re-denoising of the query.

The query is noised to ``tau`` (default 0.3: step 60 of the authors' 200-step grid) and
denoised on a respaced DDPM grid while each step's mean is pushed by a guidance gradient:

``x_{t-1} = mu(x_t, x0_hat) - sigma_t^2 * g + sigma_t * z`` with
``g = grad_c (scale * -logit_target(C(c)) + w_p * P(c, x)) / sqrt(alpha_bar_t) + grad_{x_t} w_1 * |x_t - x|_1``

where ``c`` is the *clean estimate* at step ``t``, ``P`` a perceptual distance and
``sigma_t^2`` the posterior variance. The gradient is taken at ``c`` (not through the
denoiser) and divided by ``sqrt(alpha_bar_t)`` (DiME's code; it is the chain-rule factor
``d x0_hat / d x_t`` of the one-step estimate, switch ``divide_by_sqrt_alpha_bar``).

* ``clean_estimate: x0`` (FastDiME): ``c`` = the one-call ``x0_hat`` of the step: one denoiser
  call per step (60 per attempt at the defaults).
* ``clean_estimate: chain`` (DiME): ``c`` = the end of the whole *unguided* DDPM chain run from
  ``x_t`` down to 0 with fresh noise, re-run at every step: ``n (n + 1) / 2`` calls per attempt
  (1,830 at the defaults).

**Self-optimised mask** (FastDiME; ``mask_from``, default from halfway): from step
``round(mask_from * num_steps)`` on, ``m = dilate(sum_c |x - c| / max, mask_kernel) > mask_threshold``
(per image, in the classifier's image space, so a padded border of the denoiser's input never
sets the scale); outside ``m``, the clean estimate and
``x0_hat`` are reset to the query and ``x_t`` to the query noised to ``t`` (fresh noise), so
the edit stays where it is needed and the output equals the query outside the last mask.
``mask_from: null`` switches it off (DiME).

**Retries** (``class_scales``, default 8, 10, 15): every image runs with the first scale;
the images whose output the classifier does not assign to the target run again with the
next scale, in one sub-batch, until none is left or the scales run out. Each image keeps the
output of its last attempt (the first that flipped it, or the last scale). Each attempt
draws its own per-record noise, so an image's result depends only on its own seed.

**Perceptual term** (``perceptual_weight``, default 30): the papers use VGG; no pretrained
weights exist here, so the distance is lit-cf's ``perceptual_domain`` (unit-normalised
feature maps of one layer per resolution stage, squared difference, spatial mean, mean over
layers) on ``feature_network``, a lit-cf classifier checkpoint, the kind ``lit-cf evaluate
--feature_network`` takes. ``feature_network: null`` uses the explained classifier's
backbone (documented choice: a shipped config needs no second model; pass an independent
network to keep guidance and proximity apart).

Recorded per record: ``steps`` (guided steps run, ``num_steps`` per attempt), ``attempt``
(1-based attempt whose output was kept), ``class_scale``,
``denoiser_calls`` (all attempts), ``mask_fraction`` (share of the final mask, 1 without
mask) and the x0-hat trajectory ``stages`` ``[B, num_stages, C, H, W]`` of the kept attempt
(progression strips in the run's grids).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.explainers.diffusion_base import DiffusionCounterfactual
from lit_cf.explainers.diffusion_ops import (
    CountedDenoiser,
    difference_mask,
    full_precision,
    mask_to_model,
    posterior_variance,
    stream_noise,
)
from lit_cf.explainers.diffusion_sampler import ddpm_step, q_sample, stage_indices, x0_from_eps
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.utils.checkpoint import checkpoint_class, file_sha256, load_module

__all__ = ["FastDiME", "PerceptualTerm", "dime_chain_estimate", "fastdime_attempt"]

CLEAN_ESTIMATES = ("x0", "chain")
# noise streams of one attempt's step k: (attempt, k, STEP) for the step and mask noise,
# (attempt, k, CHAIN) for DiME's unguided chain; (attempt, -1, START) for noising the query
_STEP, _CHAIN, _START = 0, 1, 2


class _Backbone(nn.Module):
    """``backbone(normalize(x))`` of a classifier; named ``model`` so evaluate's layer names apply."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.model = classifier

    def forward(self, x: Tensor) -> Tensor:
        normalize = getattr(self.model, "normalize", None)
        return cast(nn.Module, self.model.backbone)(normalize(x) if callable(normalize) else x)


class PerceptualTerm(nn.Module):
    """``perceptual_domain`` distance to reference images, differentiable in its second argument.

    Uses the same feature maps and distance as ``lit-cf evaluate``'s ``perceptual_domain``
    (one layer per resolution stage of a lit-cf classifier's backbone).
    """

    def __init__(self, classifier: nn.Module, example: Tensor | None = None) -> None:
        super().__init__()
        # metrics import the run format and explainers; import at attach time, not module import
        from lit_cf.metrics.features import FeatureMaps

        if hasattr(classifier, "backbone"):
            from lit_cf.metrics.suite import perceptual_layers

            # any module with a backbone: perceptual_layers reads only `backbone`
            self.maps = FeatureMaps(_Backbone(classifier), perceptual_layers(cast(ImageClassifier, classifier)))
        else:  # any other module (e.g. a user's torchvision model): one layer per resolution stage
            from lit_cf.metrics.sources import auto_feature_layers

            if example is None:
                raise ValueError("a module without a lit-cf backbone needs an example input to choose its layers")
            self.maps = FeatureMaps(classifier, auto_feature_layers(classifier, example))

    def features(self, x01: Tensor) -> list[Tensor]:
        return self.maps(x01)

    def distance(self, reference: Sequence[Tensor], x01: Tensor) -> Tensor:
        """Per-image distance ``[B]`` between precomputed reference features and images ``x01``."""
        from lit_cf.metrics.closeness import perceptual_distance

        return perceptual_distance(list(reference), self.maps(x01))


def _tvec(t: int, like: Tensor) -> Tensor:
    return torch.full((len(like),), int(t), dtype=torch.long, device=like.device)


@torch.no_grad()
def dime_chain_estimate(
    denoiser: CountedDenoiser,
    x_t: Tensor,
    eps: Tensor,
    k: int,
    timesteps: Sequence[int],
    rows: Tensor,
    noise: Tensor,
    clip_denoised: bool,
) -> Tensor:
    """DiME's clean estimate at grid step ``k``: the unguided DDPM chain from ``x_t`` down to 0.

    ``eps`` is the denoiser output at ``x_t`` (already computed for the guided step, so it is
    reused); the chain costs ``len(timesteps) - k - 1`` further calls. ``noise``
    ``[>= len(timesteps) - k - 1, B, ...]`` are the chain's step noises.
    """
    ac = denoiser.alphas_cumprod
    n = len(timesteps)
    x, e = x_t, eps
    for j in range(k, n):
        t = _tvec(timesteps[j], x)
        x0 = x0_from_eps(x, e, t, ac)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if j == n - 1:
            return x0
        x = ddpm_step(x, x0, t, _tvec(timesteps[j + 1], x), noise[j - k], ac)
        e = denoiser.eps(x, timesteps[j + 1], rows)
    raise AssertionError("unreachable: the loop returns at its last step")


def fastdime_attempt(
    denoiser: CountedDenoiser,
    classifier: Callable[[Tensor], Tensor],
    perceptual: Callable[[Tensor], Tensor] | None,
    x: Tensor,
    target: Tensor,
    seeds: Tensor,
    rows: Tensor,
    attempt: int,
    scale: float,
    timesteps: Sequence[int],
    *,
    clean_estimate: str = "x0",
    l1_weight: float = 0.05,
    perceptual_weight: float = 30.0,
    mask_start: int | None = None,
    mask_kernel: int = 5,
    mask_threshold: float = 0.15,
    divide_by_sqrt_alpha_bar: bool = True,
    clip_denoised: bool = True,
    stage_steps: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """One guided re-denoising of a sub-batch of queries at one classifier scale.

    Args:
        denoiser: The counted denoiser (counts per chunk record).
        classifier: Images in ``[0, 1]`` -> logits.
        perceptual: Images in ``[0, 1]`` -> per-image distance to these rows' queries, or None.
        x: Queries in ``[0, 1]`` ``[b, C, H, W]`` (classifier space).
        target: Target class per query ``[b]``.
        seeds: Record seeds ``[b]``.
        rows: Chunk rows of the queries ``[b]`` (for call counting).
        attempt: Attempt number (selects the noise streams).
        scale: Weight of the target-logit term.
        timesteps: Descending grid timesteps, the first is the noising level.
        stage_steps: Grid step indices whose clean estimate is kept as a stage.

    Returns:
        ``(x0, stages, mask_fraction)``: the output in denoiser space ``[b, ...]``, the clean
        estimates at ``stage_steps`` in ``[0, 1]`` ``[b, S, C, H, W]`` and the share of the
        last mask ``[b]`` (1 where no mask was used).
    """
    ac = denoiser.alphas_cumprod
    n = len(timesteps)
    xm = denoiser.to_model(full_precision(x))
    shape = tuple(xm.shape[1:])
    device = xm.device
    start = stream_noise(seeds, (attempt, -1, _START), shape, 1, device)[0]
    x_t = q_sample(xm, _tvec(timesteps[0], xm), start, ac)
    mask_image = torch.ones_like(x[:, :1])
    stages: list[Tensor] = []
    for k in range(n):
        t, t_prev = int(timesteps[k]), int(timesteps[k + 1]) if k + 1 < n else -1
        tv = _tvec(t, xm)
        noise = stream_noise(seeds, (attempt, k, _STEP), shape, 2, device)
        with torch.no_grad():
            eps = denoiser.eps(x_t, t, rows).to(x_t.dtype)
            x0_hat = x0_from_eps(x_t, eps, tv, ac)
            if clip_denoised:
                x0_hat = x0_hat.clamp(-1, 1)
            if clean_estimate == "chain":
                chain_noise = stream_noise(seeds, (attempt, k, _CHAIN), shape, max(n - k - 1, 1), device)
                est = dime_chain_estimate(denoiser, x_t, eps, k, timesteps, rows, chain_noise, clip_denoised)
            else:
                est = x0_hat
            if mask_start is not None and k >= mask_start:
                mask_image = difference_mask(x, denoiser.to_image(est), mask_kernel, mask_threshold)
                mask = mask_to_model(denoiser, mask_image, x.shape[1])
                est = mask * est + (1 - mask) * xm
                x0_hat = mask * x0_hat + (1 - mask) * xm
                x_t = mask * x_t + (1 - mask) * q_sample(xm, tv, noise[1], ac)
        with torch.enable_grad():
            c = est.detach().requires_grad_(True)
            image = denoiser.to_image(c)
            loss = -scale * full_precision(classifier(image)).gather(1, target[:, None]).squeeze(1)
            if perceptual is not None and perceptual_weight:
                loss = loss + perceptual_weight * perceptual(image)
            (grad,) = torch.autograd.grad(loss.sum(), c)
        with torch.no_grad():
            if divide_by_sqrt_alpha_bar:
                grad = grad / ac[t].to(grad.dtype).sqrt()
            if l1_weight:
                grad = grad + l1_weight * torch.sign(x_t - xm)
            if k in stage_steps:
                stages.append(denoiser.to_image(est).clamp(0, 1))
            var = posterior_variance(ac, t, t_prev)
            x_t = ddpm_step(x_t, x0_hat, tv, _tvec(t_prev, xm), noise[0], ac) - var * grad
    stacked = torch.stack(stages, 1) if stages else torch.empty(len(xm), 0, *x.shape[1:], device=device)
    return x_t.detach(), stacked, mask_image.flatten(1).mean(1)


class FastDiME(DiffusionCounterfactual):
    """FastDiME / DiME counterfactuals: DDPM re-denoising of the query guided by the target logit.

    See the module docstring for the algorithm, the mask, the retries and the recorded extras.

    Args:
        diffusion: Checkpoint of a :class:`~lit_cf.models.DiffusionModel` trained by ``lit-cf fit``
            on the classifier's data.
        tau: Noise level the query is taken to (fraction of the training steps, in (0, 1]).
        num_steps: Denoising steps from ``tau`` to 0 on the respaced grid (authors: 60 for 0.3).
        clean_estimate: ``x0`` (FastDiME: one-call x0-hat) or ``chain`` (DiME: full unguided chain).
        class_scales: Strictly increasing target-logit scales; later ones rerun unflipped images.
        l1_weight: Weight of ``|x_t - x|_1`` on the noisy sample.
        perceptual_weight: Weight of the perceptual distance of the clean estimate to the query.
        feature_network: Classifier checkpoint for the perceptual term (None: the explained one).
        mask_from: Fraction of the steps after which the self-optimised mask applies (None: no mask).
        mask_kernel: Odd dilation kernel of the mask.
        mask_threshold: Threshold of the normalised, dilated difference, in [0, 1).
        divide_by_sqrt_alpha_bar: Divide the clean-estimate gradient by ``sqrt(alpha_bar_t)``.
        clip_denoised: Clamp x0-hat to the data range before each DDPM step.
        num_stages: Clean estimates kept as the progression (evenly over the steps, last included; 0: none).
        allow_other_data: Accept a DDPM trained on other data of the same image shape.
        log_every: Log every this many chunks (0: off).
    """

    method_name = "fastdime"
    pixel_space_only = True  # spatial masks: no latent DDPM

    def stopping_rule(self) -> str:
        scales = ", ".join(f"{s:g}" for s in self.class_scales)
        return (
            f"per image between attempts: each attempt runs {self.num_steps} steps; an image whose output is the "
            f"target is not rerun at the next class scale ({scales})"
        )

    def __init__(
        self,
        diffusion: str | None = None,
        tau: float = 0.3,
        num_steps: int = 60,
        clean_estimate: str = "x0",
        class_scales: Sequence[float] = (8.0, 10.0, 15.0),
        l1_weight: float = 0.05,
        perceptual_weight: float = 30.0,
        feature_network: str | None = None,
        mask_from: float | None = 0.5,
        mask_kernel: int = 5,
        mask_threshold: float = 0.15,
        divide_by_sqrt_alpha_bar: bool = True,
        clip_denoised: bool = True,
        num_stages: int = 6,
        allow_other_data: bool = False,
        log_every: int = 0,
    ) -> None:
        # settings are validated by validate_settings() (describe/attach, before any output), not
        # here: LightningCLI would turn an error raised while it builds the method into a traceback
        super().__init__(
            diffusion=diffusion,
            tau=tau,
            num_steps=num_steps,
            num_stages=num_stages,
            allow_other_data=allow_other_data,
            log_every=log_every,
        )
        self.save_hyperparameters()
        self.clean_estimate, self.class_scales = clean_estimate, [float(s) for s in class_scales]
        self.l1_weight, self.perceptual_weight = float(l1_weight), float(perceptual_weight)
        self.feature_network_path = str(feature_network) if feature_network else None
        self.mask_from, self.mask_kernel, self.mask_threshold = mask_from, int(mask_kernel), float(mask_threshold)
        self.divide_by_sqrt_alpha_bar, self.clip_denoised = divide_by_sqrt_alpha_bar, clip_denoised
        self.feature_net: ImageClassifier | None = None
        self.perceptual: PerceptualTerm | None = None

    # ----------------------------------------------------------------- wiring
    def validate_settings(self) -> None:
        """Check the settings alone (no files); raises UserError naming the setting."""
        super().validate_settings()
        scales = self.class_scales
        if self.clean_estimate not in CLEAN_ESTIMATES:
            raise UserError(f"clean_estimate must be one of {list(CLEAN_ESTIMATES)}, got {self.clean_estimate!r}")
        if not scales or scales[0] <= 0 or any(b <= a for a, b in zip(scales, scales[1:])):
            raise UserError(f"class_scales must be positive and strictly increasing (e.g. [8, 10, 15]), got {scales}")
        for name in ("l1_weight", "perceptual_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mask_from is not None and not 0.0 <= self.mask_from <= 1.0:
            raise UserError(f"mask_from must be in [0, 1] or null (no mask), got {self.mask_from}")
        if self.mask_kernel < 1 or self.mask_kernel % 2 == 0:
            raise UserError(f"mask_kernel must be an odd number >= 1, got {self.mask_kernel}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise UserError(f"mask_threshold must be in [0, 1), got {self.mask_threshold}")

    def check_settings(self, info: dict[str, Any]) -> None:
        """Check the feature network checkpoint (without loading it); raises UserError."""
        super().check_settings(info)
        if self.feature_network_path is None or not self.perceptual_weight:
            return
        cls, _ = checkpoint_class(self.feature_network_path)
        if not (isinstance(cls, type) and issubclass(cls, ImageClassifier)):
            raise UserError(
                f"feature_network {self.feature_network_path} holds a {cls.__name__ if isinstance(cls, type) else cls}, "
                "not a lit-cf classifier: pass a classifier checkpoint (the kind `lit-cf evaluate --feature_network` "
                "takes) or null for the explained classifier"
            )

    def describe(self) -> dict[str, Any]:
        out = super().describe()  # checks every file and setting before explain creates any output
        if self.feature_network_path is not None and self.perceptual_weight:
            out["feature_network_sha256"] = file_sha256(self.feature_network_path)
        return out

    def attach(self, classifier: ImageClassifier) -> None:
        super().attach(classifier)
        if not self.perceptual_weight:
            return
        if self.feature_network_path is not None and self.feature_net is None:
            self.feature_net = freeze(load_module(self.feature_network_path, ImageClassifier))
        network = self.feature_net if self.feature_net is not None else self.attached_classifier()
        try:
            example = torch.zeros(2, *self.require_diffusion().image_shape)
            self.perceptual = PerceptualTerm(network, example.to(next(network.parameters()).device))
        except ValueError as err:
            raise UserError(f"cannot build the perceptual term on {type(network).__name__}: {err}") from err

    def frozen_modules(self) -> list[torch.nn.Module]:
        return super().frozen_modules() + ([self.feature_net] if self.feature_net is not None else [])

    # ----------------------------------------------------------------- method
    def generate(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.validate_settings()
        x, target, seeds = full_precision(batch["image"]), batch["target"], batch["seed"]
        n = len(x)
        counted = CountedDenoiser(self.denoiser(), n, x.device)
        timesteps = self.grid()
        steps_at = stage_indices(len(timesteps), self.num_stages)
        mask_start = None if self.mask_from is None else round(self.mask_from * len(timesteps))
        reference = None
        term = self.perceptual
        if term is not None:
            with torch.no_grad():
                reference = [f.detach() for f in term.features(x)]
        out = x.clone()
        stages = x[:, None].repeat(1, len(steps_at), 1, 1, 1)
        attempt = torch.zeros(n, dtype=torch.long, device=x.device)
        scale_used = torch.zeros(n, device=x.device)
        mask_fraction = torch.ones(n, device=x.device, dtype=x.dtype)
        rows = torch.arange(n, device=x.device)
        for a, scale in enumerate(self.class_scales):
            perceptual: Callable[[Tensor], Tensor] | None = None
            if reference is not None and term is not None:
                perceptual = functools.partial(term.distance, [f[rows] for f in reference])
            x0, st, mf = fastdime_attempt(
                counted,
                self.attached_classifier(),
                perceptual,
                x[rows],
                target[rows],
                seeds[rows],
                rows,
                a,
                scale,
                timesteps,
                clean_estimate=self.clean_estimate,
                l1_weight=self.l1_weight,
                perceptual_weight=self.perceptual_weight,
                mask_start=mask_start,
                mask_kernel=self.mask_kernel,
                mask_threshold=self.mask_threshold,
                divide_by_sqrt_alpha_bar=self.divide_by_sqrt_alpha_bar,
                clip_denoised=self.clip_denoised,
                stage_steps=steps_at,
            )
            with torch.no_grad():
                image = counted.to_image(x0).clamp(0, 1)
                pred = self.attached_classifier()(image).argmax(-1)
            out[rows], stages[rows], mask_fraction[rows] = image, st, mf
            attempt[rows], scale_used[rows] = a + 1, scale
            rows = rows[pred != target[rows]]
            if len(rows) == 0:
                break
        extras = {"stages": stages} if steps_at else {}
        return out, {
            **extras,
            "steps": attempt * len(timesteps),
            "attempt": attempt,
            "class_scale": scale_used,
            "denoiser_calls": counted.counts.to(x.device),
            "mask_fraction": mask_fraction,
        }
