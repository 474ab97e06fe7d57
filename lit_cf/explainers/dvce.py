"""DVCE: Diffusion Visual Counterfactual Explanations (Augustin et al., NeurIPS 2022).

The query is noised to ``tau`` (default 0.5) with the forward process and the reverse chain is
run from there on a respaced grid (``num_steps`` steps, default 100: the authors' "step 100 of
200"), each step's mean shifted towards the target class and towards the query:

* classifier term ``g_c``: gradient of ``log p_C(target | x0-hat)``, the classifier on the
  clean estimate (averaged over ``augment`` random affine copies when set);
* distance term ``g_d``: gradient of ``||x0-hat - x||_1`` (``distance: l1``, DVCE) or of the
  L2 norm (``distance: l2``);
* ``x0_prediction: true`` takes both gradients w.r.t. ``x_t`` *through the denoiser*
  (x0-hat keeps its graph); ``false`` takes them directly at x0-hat (the denoiser is not
  differentiated) and applies them to the mean as they are. The paper's ablation can also be
  read as the classifier seeing the *noisy* sample when x0-prediction is off (plain classifier
  guidance, which a classifier not trained on noise cannot follow): ``x0_off_input: x_t`` does
  that (the classifier term's gradient of ``log p_C(target | x_t)`` at ``x_t``; the distance
  term stays at x0-hat), ``x0_hat`` (default) is the reading above. It only acts when
  ``x0_prediction`` is false;
* each term is rescaled per image to a common norm before weighting: ``normalisation: noise``
  (DVCE) uses the norm of the predicted noise, ``unit`` (DBVCE) unit norm times the norm of the
  step's posterior mean;
* DDPM step: ``x_{t-1} = mean + var * (classifier_weight * g_c - distance_weight * g_d) +
  sqrt(var) z`` (weights 0.1 and 0.15 by default). ``sampler: ddim`` shifts the noise estimate
  instead (:func:`lit_cf.explainers.diffusion_sampler.guided_sample`).

**Cone projection** (``cone: true``, with ``robust_classifier`` and ``cone_angle``, default
30 degrees): with ``g_r`` the gradient of the robust classifier's target log-probability, if
the angle between ``g_c`` and ``g_r`` exceeds the cone angle ``alpha``, ``g_c`` is replaced by
the vector at exactly ``alpha`` from ``g_c``, rotated towards ``g_r`` in the plane of both
(``unit(g_c) + tan(alpha) * unit(g_r orthogonal to g_c)``, scaled to ``||g_c||``); inside the
cone ``g_c`` is kept unchanged. As in the authors' code the cone is centred on the *explained*
classifier's gradient (the paper's text describes a cone around the robust one).

**Choices where the paper leaves room.** The last step (to clean) has zero posterior
variance, so it carries no guidance; the output is that step's sample (x0-hat clipped to
``[-1, 1]``, ``clip_denoised``). The classifier sees x0-hat clamped to ``[0, 1]`` with a
straight-through gradient. Augmentation is affine only (rotation +-10 degrees, shift +-7 %,
scale 0.9-1.1, border padding; the authors also use perspective). A zero-norm gradient
(e.g. a saturated classifier) contributes nothing.

Every random draw (start noise, step noise, augmentation parameters) comes from the record's
own seed, so a counterfactual does not depend on its chunk-mates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.explainers.diffusion_base import DiffusionCounterfactual
from lit_cf.explainers.diffusion_ops import full_precision
from lit_cf.explainers.diffusion_sampler import SAMPLERS, GuidanceStep, NoiseStream, guided_sample, noised_start
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.utils.checkpoint import checkpoint_class, file_sha256, load_module

__all__ = ["DVCE", "cone_project", "unit_per_image"]

DISTANCES = ("l1", "l2")
NORMALISATIONS = ("noise", "unit")
X0_OFF_INPUTS = ("x0_hat", "x_t")


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def unit_per_image(t: Tensor, eps: float = 1e-12) -> Tensor:
    """``t / ||t||`` per image (a zero row stays zero)."""
    n = _flat_norm(t)
    return torch.where(n > eps, t / n.clamp_min(eps), torch.zeros_like(t))


def cone_project(g: Tensor, r: Tensor, angle_deg: float, eps: float = 1e-12) -> Tensor:
    """DVCE's cone projection per image (see the module docstring).

    Where the angle between ``g`` and ``r`` is at most ``angle_deg``: ``g`` unchanged. Else the
    vector at exactly ``angle_deg`` from ``g``, rotated towards ``r`` in the plane of both, with
    the norm of ``g``. A zero ``r`` or an ``r`` anti-parallel to ``g`` (no plane) keeps ``g``.
    """
    alpha = math.radians(angle_deg)
    gf, rf = g.flatten(1).double(), r.flatten(1).double()
    gn, rn = gf.norm(dim=1, keepdim=True), rf.norm(dim=1, keepdim=True)
    u = gf / gn.clamp_min(eps)
    cos = (u * rf).sum(1, keepdim=True) / rn.clamp_min(eps)
    perp = rf - (u * rf).sum(1, keepdim=True) * u
    pn = perp.norm(dim=1, keepdim=True)
    v = u + math.tan(alpha) * perp / pn.clamp_min(eps)
    rotated = gn * v / v.norm(dim=1, keepdim=True)
    inside = (cos >= math.cos(alpha)) | (rn <= eps) | (gn <= eps) | (pn <= eps * rn)
    return torch.where(inside, gf, rotated).to(g.dtype).view_as(g)


def random_affine(x: Tensor, params: Tensor) -> Tensor:
    """Differentiable affine copies of ``x`` with per-image ``params`` ``[B, 4]`` uniform in ``[0, 1)``.

    Parameters map to rotation +-10 degrees, shifts +-7 % of the side and scale 0.9-1.1.
    """
    angle = (params[:, 0] * 2 - 1) * math.radians(10)
    tx, ty = (params[:, 1] * 2 - 1) * 0.14, (params[:, 2] * 2 - 1) * 0.14
    scale = 0.9 + 0.2 * params[:, 3]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class DVCE(DiffusionCounterfactual):
    """Diffusion Visual Counterfactual Explanations (Augustin et al., 2022); see the module docstring.

    Args:
        diffusion: Checkpoint of a :class:`lit_cf.models.DiffusionModel` (``lit-cf fit``).
        tau: Noise level to start from (share of the schedule, in ``(0, 1]``).
        num_steps: Reverse steps from ``tau`` (respaced; the authors: 100 of a 200-step grid).
        sampler: ``ddpm`` (stochastic, the authors') or ``ddim`` (deterministic).
        classifier_weight: Weight of the classifier term (0.1).
        distance_weight: Weight of the distance term (0.15; 0 switches it off).
        distance: ``l1`` (DVCE) or ``l2`` distance of x0-hat to the query.
        normalisation: ``noise`` (DVCE: each term scaled to the predicted noise's norm) or
            ``unit`` (DBVCE: unit norm times the norm of the posterior mean).
        x0_prediction: Gradients w.r.t. ``x_t`` through the denoiser (true) or at x0-hat (false).
        x0_off_input: With ``x0_prediction: false``: what the classifier sees, ``x0_hat`` (the
            clean estimate) or ``x_t`` (the noisy sample: plain classifier guidance).
        cone: Project the classifier gradient with a robust classifier's (needs
            ``robust_classifier``).
        robust_classifier: Checkpoint of the robust classifier of the cone.
        cone_angle: Cone angle in degrees, in ``(0, 90)``.
        augment: Random affine copies the classifier term is averaged over (0: none).
        clip_denoised: Clip x0-hat to ``[-1, 1]`` in the steps.
        num_stages: x0-hat snapshots kept as the ``stages`` progression strip.
        allow_other_data: Accept a DDPM trained on other data of the same shape.
        log_every: Log the guidance terms every this many steps (0 disables).
    """

    later_settings = {"x0_off_input": "x0_hat"}  # added 2026-12-02: not recorded at this value

    def __init__(
        self,
        diffusion: str | None = None,
        tau: float = 0.5,
        num_steps: int = 100,
        sampler: str = "ddpm",
        classifier_weight: float = 0.1,
        distance_weight: float = 0.15,
        distance: str = "l1",
        normalisation: str = "noise",
        x0_prediction: bool = True,
        x0_off_input: str = "x0_hat",
        cone: bool = False,
        robust_classifier: str | None = None,
        cone_angle: float = 30.0,
        augment: int = 0,
        clip_denoised: bool = True,
        num_stages: int = 5,
        allow_other_data: bool = False,
        log_every: int = 10,
    ) -> None:
        super().__init__(diffusion, tau, num_steps, num_stages, allow_other_data, log_every)
        self.save_hyperparameters()
        self.sampler, self.distance, self.normalisation = sampler, distance, normalisation
        self.classifier_weight, self.distance_weight = classifier_weight, distance_weight
        self.x0_prediction, self.cone, self.cone_angle = x0_prediction, cone, cone_angle
        self.x0_off_input = x0_off_input
        self.robust_classifier_path = robust_classifier
        self.augment, self.clip_denoised = augment, clip_denoised
        self.robust: ImageClassifier | None = None

    # ----------------------------------------------------------------- checks and wiring
    def validate_settings(self) -> None:
        super().validate_settings()
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.distance not in DISTANCES:
            raise UserError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}")
        if self.normalisation not in NORMALISATIONS:
            raise UserError(f"normalisation must be one of {list(NORMALISATIONS)}, got {self.normalisation!r}")
        if self.x0_off_input not in X0_OFF_INPUTS:
            raise UserError(f"x0_off_input must be one of {list(X0_OFF_INPUTS)}, got {self.x0_off_input!r}")
        if self.classifier_weight < 0 or self.distance_weight < 0:
            raise UserError("classifier_weight and distance_weight must be >= 0")
        if not 0.0 < self.cone_angle < 90.0:
            raise UserError(f"cone_angle must be in (0, 90) degrees, got {self.cone_angle}")
        if self.augment < 0:
            raise UserError(f"augment must be >= 0, got {self.augment}")
        if self.cone and not self.robust_classifier_path:
            raise UserError(
                "cone: true needs a second, robust classifier: pass --model.init_args.robust_classifier=<.ckpt> "
                "(e.g. from `lit-cf fit --config configs/model/robust_cnn.yaml`) or set cone: false"
            )

    def _robust_path(self) -> str:
        """The robust classifier's checkpoint (cone only; validate_settings requires it then)."""
        if not self.robust_classifier_path:
            raise UserError("cone: true needs a second, robust classifier: pass --model.init_args.robust_classifier=<.ckpt>")
        return self.robust_classifier_path

    def check_settings(self, info: dict[str, Any]) -> None:
        if self.cone:
            cls, hparams = checkpoint_class(self._robust_path())
            if not (isinstance(cls, type) and issubclass(cls, ImageClassifier)):
                raise UserError(
                    f"robust_classifier {self.robust_classifier_path} holds a {hparams['_class_path']}, not a lit-cf classifier"
                )

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.cone:
            info["robust_classifier_sha256"] = file_sha256(self._robust_path())
        return info

    def attach(self, classifier: ImageClassifier) -> None:
        super().attach(classifier)
        if self.cone and self.robust is None:
            robust = load_module(self._robust_path(), ImageClassifier)
            if robust.num_classes != classifier.num_classes:
                raise UserError(
                    f"the robust classifier has {robust.num_classes} classes, the explained one {classifier.num_classes}: "
                    "the cone needs two classifiers of the same classes"
                )
            self.robust = freeze(robust)  # a submodule: moves with the method

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + ([self.robust] if self.robust is not None else [])

    # ----------------------------------------------------------------- guidance
    def target_log_prob(self, model: nn.Module, images: Tensor, target: Tensor, noise: NoiseStream | None) -> Tensor:
        """``log p(target | image)`` per image, averaged over ``augment`` random affine copies."""
        if self.augment and noise is not None:
            b = len(images)
            params = noise.uniform((self.augment, 4)).transpose(0, 1).reshape(-1, 4)  # [k*B, 4], copy-major
            copies = random_affine(images.repeat(self.augment, 1, 1, 1), params)
            logp = full_precision(model(copies)).log_softmax(-1).gather(1, target.repeat(self.augment)[:, None]).squeeze(1)
            return logp.view(self.augment, b).mean(0)
        return full_precision(model(images)).log_softmax(-1).gather(1, target[:, None]).squeeze(1)

    def guidance_terms(
        self, step: GuidanceStep, query: Tensor, target: Tensor, noise: NoiseStream | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Raw gradients ``(g_c, g_d)`` (after the cone) w.r.t. x_t or x0-hat, and the per-image terms."""
        var = step.x_t if self.x0_prediction else step.x0_hat.detach().requires_grad_(True)
        x0 = step.x0_hat if self.x0_prediction else var
        images = self.classifier_input(x0)
        # the classifier's input and the variable of its gradient: x0-hat, unless x0_off_input: x_t
        var_c, seen = var, images
        if not self.x0_prediction and self.x0_off_input == "x_t":
            var_c = step.x_t.detach().requires_grad_(True)
            seen = self.classifier_input(var_c)
        logp = self.target_log_prob(self.attached_classifier(), seen, target, noise)
        diff = (images - query).flatten(1)
        dist = diff.abs().sum(1) if self.distance == "l1" else diff.norm(dim=1)
        zeros = torch.zeros_like(var)
        g_c = torch.autograd.grad(logp.sum(), var_c, retain_graph=True)[0] if self.classifier_weight else zeros
        if self.cone and self.classifier_weight:
            robust = self.robust
            assert robust is not None  # attach() loads it when cone is on
            logp_r = self.target_log_prob(robust, seen, target, None)
            g_r = torch.autograd.grad(logp_r.sum(), var_c, retain_graph=True)[0]
            g_c = cone_project(g_c, g_r, self.cone_angle)
        g_d = torch.autograd.grad(dist.sum(), var)[0] if self.distance_weight else zeros
        return g_c, g_d, {"log_prob": logp.detach(), "distance": dist.detach()}

    def generate(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        d = self.require_diffusion()
        query, target = full_precision(batch["image"]), batch["target"]
        timesteps = self.timesteps(query.device)
        noise = self.noise_stream(batch)
        x_start = noised_start(d, query, timesteps, noise)
        active = torch.ones_like(target, dtype=torch.bool)

        def guide(step: GuidanceStep) -> Tensor:
            g_c, g_d, terms = self.guidance_terms(step, query, target, noise)
            scale = _flat_norm(step.eps.detach() if self.normalisation == "noise" else step.mean)
            self._log(terms, terms["log_prob"].exp(), active)
            return scale * (self.classifier_weight * unit_per_image(g_c) - self.distance_weight * unit_per_image(g_d))

        x0, stages = guided_sample(
            d,
            x_start,
            timesteps,
            guide,
            noise,
            sampler=self.sampler,
            grad_through_denoiser=self.x0_prediction,
            clip_denoised=self.clip_denoised,
            num_stages=self.num_stages,
        )
        return d.to_image(x0).clamp(0, 1), self.stages_to_images(stages)
