"""Base class of the diffusion counterfactual methods (DVCE, FastDiME, ACE): the DDPM and its checks.

A method of this family explains with a DDPM trained on the data by ``lit-cf fit``
(:class:`lit_cf.models.DiffusionModel`), passed as a checkpoint path (``diffusion``). The
checkpoint is checked without loading any model by :meth:`DiffusionCounterfactual.check`,
which ``describe`` calls while ``explain`` plans the run (a bad file or setting fails with one
line before any output exists), and against the classifier and the data by
:meth:`DiffusionCounterfactual.check_data` (called by the engine before output exists). It is
loaded (weights only, EMA weights, frozen, eval mode) when the classifier is attached, as a
submodule so Lightning moves it with the method.

Subclasses implement :meth:`DiffusionCounterfactual.generate`; the engine's per-step Adam loop
is not used: :meth:`DiffusionCounterfactual.optimise` calls ``generate`` once per chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.diffusion_ops import full_precision
from lit_cf.explainers.diffusion_sampler import NoiseStream, load_diffusion, respaced_timesteps
from lit_cf.models.base import ImageClassifier
from lit_cf.models.diffusion import DiffusionModel, data_identity
from lit_cf.utils.checkpoint import checkpoint_class, file_sha256, read_checkpoint

__all__ = ["DiffusionCounterfactual", "check_diffusion_checkpoint"]


def check_diffusion_checkpoint(path: str | Path | None, method: str = "this method") -> dict[str, Any]:
    """Check (without building the model) that ``path`` holds a ``lit-cf fit`` DDPM.

    Returns ``{"hparams": ..., "data": <recorded training data or None>, "latent": <a latent DDPM>}``.

    Raises:
        UserError: no path, a missing or unreadable file, or a checkpoint of another model.
    """
    if not path:
        raise UserError(
            f"{method} needs a DDPM: pass --model.init_args.diffusion=<.ckpt from "
            "`lit-cf fit --config configs/model/ddpm_mnist.yaml`>"
        )
    cls, hparams = checkpoint_class(path)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionModel)):
        raise UserError(
            f"the diffusion checkpoint {path} holds a {hparams['_class_path']}, not a lit_cf.models.DiffusionModel: "
            "train one with `lit-cf fit --config configs/model/ddpm_mnist.yaml`"
        )
    from lit_cf.models.latent_diffusion import LatentDiffusionModel

    latent = issubclass(cls, LatentDiffusionModel)
    return {"hparams": hparams, "data": read_checkpoint(path).get("lit_cf_data"), "latent": latent}


def _ste_clamp(x: Tensor) -> Tensor:
    """Clamp to ``[0, 1]`` in the forward pass, identity in the backward pass."""
    return x + (x.clamp(0, 1) - x).detach()


class DiffusionCounterfactual(CounterfactualMethod):
    """Shared part of the diffusion counterfactual methods (see the module docstring).

    Per-image independence: every random draw of record ``b`` comes from a
    :class:`~lit_cf.explainers.diffusion_sampler.NoiseStream` seeded by the record's seed, and
    the DDPM's denoiser normalises per image (GroupNorm), so a counterfactual does not depend
    on its chunk-mates and the same seed gives the same result.

    Outputs per record (besides the engine's): ``stages`` ``[B, K, C, H, W]``, the x0-hat
    trajectory (``num_stages`` snapshots, the last being the counterfactual), drawn by
    ``explain`` as progression strips.

    Args:
        diffusion: Checkpoint of a :class:`lit_cf.models.DiffusionModel` (``lit-cf fit``); a
            :class:`lit_cf.models.LatentDiffusionModel` works with the methods whose edits are not
            spatial (DVCE).
        tau: Noise level to start from, as a share of the schedule, in ``(0, 1]``.
        num_steps: Reverse steps from ``tau`` to clean (a respaced grid;
            ``<= round(tau * T)``).
        num_stages: x0-hat snapshots kept as ``stages`` (0: none).
        allow_other_data: Accept a DDPM whose recorded training data (datamodule class,
            dataset) differs from the data being explained (same image shape required).
        log_every: Log per-step quantities every this many steps (0 disables).
    """

    #: true for methods whose edits are spatial (masks): they refuse a latent DDPM
    pixel_space_only: bool = False

    abstract = True  # a base of methods, not a registered method

    def __init__(
        self,
        diffusion: str | None = None,
        tau: float = 0.5,
        num_steps: int = 100,
        num_stages: int = 5,
        allow_other_data: bool = False,
        log_every: int = 10,
    ) -> None:
        # settings are validated by check() (describe/attach), not here: LightningCLI would wrap an
        # error raised while it instantiates the method in a traceback instead of one line
        super().__init__(steps=max(1, int(num_steps)), lr=1.0, stop_probability=None, log_every=log_every)
        self.diffusion_path = str(diffusion) if diffusion else ""
        self.tau, self.num_steps, self.num_stages = float(tau), int(num_steps), int(num_stages)
        self.allow_other_data = allow_other_data
        self.diffusion: DiffusionModel | None = None
        self._checked: dict[str, Any] | None = None

    # ----------------------------------------------------------------- checks
    def validate_settings(self) -> None:
        """Check the settings alone (no files); raises UserError. Subclasses extend it."""
        if not 0.0 < self.tau <= 1.0:
            raise UserError(f"tau must be in (0, 1] (the share of the noise schedule to start from), got {self.tau}")
        if self.num_steps < 1:
            raise UserError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_stages < 0:
            raise UserError(f"num_stages must be >= 0, got {self.num_stages}")

    def check(self) -> None:
        """Check the settings, the DDPM checkpoint and the settings against its schedule, without
        loading models (``explain`` calls it through ``describe`` before any output exists)."""
        if self._checked is None:
            self.validate_settings()
            info = check_diffusion_checkpoint(self.diffusion_path, type(self).__name__)
            if info["latent"] and self.pixel_space_only:
                raise UserError(
                    f"{type(self).__name__} edits images in pixel space (spatial masks) and cannot use the latent DDPM "
                    f"{self.diffusion_path}: pass a pixel-space DDPM (configs/model/ddpm_mnist.yaml), or explain with "
                    "DVCE, which works on a latent DDPM"
                )
            T = int(info["hparams"].get("num_train_timesteps", 1000))
            respaced_timesteps(T, self.tau, self.num_steps)  # UserError: tau or num_steps vs the schedule
            self.check_settings(info)
            self._checked = info

    def check_settings(self, info: dict[str, Any]) -> None:
        """Subclass hook: check further settings and files (raise UserError) before any output."""

    def check_data(self, classifier: ImageClassifier, image_shape: tuple[int, ...], datamodule: Any = None) -> None:
        """Check the DDPM against the classifier's images and the explained data; raises UserError.

        The DDPM's ``image_shape`` must equal the query images' shape, and (unless
        ``allow_other_data``) its recorded training data must name the same datamodule and
        dataset as ``datamodule``.
        """
        self.check()
        assert self._checked is not None  # set by check()
        hparams, trained_on = self._checked["hparams"], self._checked["data"]
        ddpm_shape = tuple(int(s) for s in hparams.get("image_shape", (1, 28, 28)))
        if tuple(image_shape) != ddpm_shape:
            raise UserError(
                f"the DDPM {self.diffusion_path} models images of shape {list(ddpm_shape)} but the classifier is "
                f"explained on images of shape {list(image_shape)}: train a DDPM on this data"
            )
        if datamodule is not None and trained_on and not self.allow_other_data:
            here = data_identity(datamodule)
            theirs = {k: trained_on.get(k) for k in ("datamodule", "dataset")}
            if {k: here[k] for k in theirs} != theirs:
                raise UserError(
                    f"the DDPM {self.diffusion_path} was trained on {theirs['dataset'] or theirs['datamodule']} but the "
                    f"queries come from {here['dataset'] or here['datamodule']}: train a DDPM on this data "
                    "(or pass --model.init_args.allow_other_data=true)"
                )

    def describe(self) -> dict[str, Any]:
        self.check()  # explain plans the run with describe(): fail here, before any output exists
        return {**super().describe(), "diffusion_sha256": file_sha256(self.diffusion_path)}

    # ----------------------------------------------------------------- wiring
    def attach(self, classifier: ImageClassifier) -> None:
        self.check()
        super().attach(classifier)
        if self.diffusion is None:
            self.diffusion = load_diffusion(self.diffusion_path)  # a submodule: moves with the method
        try:
            with torch.no_grad():
                classifier(torch.zeros(1, *self.diffusion.image_shape, device=next(classifier.parameters()).device))
        except RuntimeError as err:
            raise UserError(
                f"the classifier cannot take the DDPM's images of shape {list(self.diffusion.image_shape)}: "
                f"{str(err).splitlines()[0]}; train a DDPM on the classifier's data"
            ) from err

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + ([self.diffusion] if self.diffusion is not None else [])

    def require_diffusion(self) -> DiffusionModel:
        if self.diffusion is None:
            raise RuntimeError("no DDPM loaded: call attach(classifier) before explaining")
        return self.diffusion

    # ----------------------------------------------------------------- helpers for subclasses
    def denoiser(self) -> DiffusionModel:
        """The loaded DDPM (``eps``, ``alphas_cumprod``, ``to_model``, ``to_image``)."""
        return self.require_diffusion()

    def grid(self) -> list[int]:
        """The descending respaced timesteps from ``tau`` as ints (UserError if they do not fit the schedule)."""
        return [int(t) for t in respaced_timesteps(len(self.denoiser().alphas_cumprod), self.tau, self.num_steps)]

    def timesteps(self, device: torch.device) -> Tensor:
        """The descending respaced grid from ``tau`` (``num_steps`` steps)."""
        return respaced_timesteps(self.require_diffusion().num_train_timesteps, self.tau, self.num_steps).to(device)

    def noise_stream(self, batch: dict[str, Tensor]) -> NoiseStream:
        """Per-record noise in the denoiser's shape, seeded by each record's seed."""
        return NoiseStream(batch["seed"], self.require_diffusion().model_shape, batch["image"].device)

    def classifier_input(self, x0_model: Tensor) -> Tensor:
        """Denoiser-space images -> what the classifier sees: ``[0, 1]`` image space, clamped
        with a straight-through gradient (a plain clamp would zero the gradient of every pixel
        the denoiser puts slightly outside, e.g. MNIST's background)."""
        return _ste_clamp(self.require_diffusion().to_image(x0_model))

    def declared_outputs(self) -> tuple[str, ...]:
        return ("stages",) if getattr(self, "num_stages", 0) else ()

    def stages_to_images(self, stages: Tensor | None) -> dict[str, Tensor]:
        """``{"stages": [B, K, C, H, W]}`` in ``[0, 1]`` from denoiser-space snapshots (or ``{}``)."""
        if stages is None:
            return {}
        d = self.require_diffusion()
        b, k = stages.shape[:2]
        images = d.to_image(stages.flatten(0, 1)).clamp(0, 1)
        return {"stages": images.view(b, k, *images.shape[1:])}

    # ----------------------------------------------------------------- engine
    def generate(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Counterfactuals ``[B, C, H, W]`` in ``[0, 1]`` and per-record extras (``stages``, ...)."""
        raise NotImplementedError

    def optimise(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run :meth:`generate` on one chunk; returns what the engine writes."""
        self.check_ready()
        d = self.require_diffusion()
        if tuple(batch["image"].shape[1:]) != tuple(d.image_shape):
            raise UserError(
                f"the DDPM models images of shape {list(d.image_shape)} but the queries have shape "
                f"{list(batch['image'].shape[1:])}: train a DDPM on this data"
            )
        with torch.enable_grad():
            x_cf, extras = self.generate(batch)
        with torch.no_grad():
            x_cf = full_precision(x_cf.detach()).clamp(0, 1)
            probs = full_precision(self.attached_classifier()(x_cf)).softmax(-1)
        steps = torch.full_like(batch["target"], self.num_steps)
        return {"counterfactual": x_cf, "final_probs": probs, "steps": steps, **{k: v.detach() for k, v in extras.items()}}
