"""Latent-space counterfactuals: Counterfactual Attacks (Goldwasser & Hooker, 2025) and a linear edit.

Both methods optimise the latent code of a pretrained *generator* and render the
counterfactual as ``x' = decode(z)``, so the edits stay on what the generator can produce.

**Generator interface.** ``generator`` is the checkpoint path of any LightningModule (written
by ``lit-cf fit``, loaded safely with :func:`lit_cf.utils.checkpoint.load_module`) that has

* ``encode(x) -> z``: latent codes ``[B, ...]`` of images ``[B, C, H, W]`` in ``[0, 1]``;
* ``decode(z) -> x``: images in ``[0, 1]`` (values outside are clamped) from codes.

:class:`lit_cf.models.AutoEncoder` and :class:`lit_cf.models.VAE` (posterior mean) qualify. A
GAN fits through a small wrapper module whose ``decode`` is the generator ``G(w)`` and whose
``encode`` is a GAN inversion: an encoder network, or an optimisation that reconstructs ``x``
(``encode`` is called with autograd enabled, so an inversion may take gradients inside; only
its detached result is used). As for every checkpoint lit-cf loads, the class must live in
``lit_cf`` or in a module already imported (importing a module named by a file runs its
code). The generator is loaded lazily when the classifier is attached,
frozen, kept in eval mode and registered as a submodule so Lightning moves it to the device.
Its checkpoint is checked by :meth:`describe`, which ``lit-cf explain`` calls while planning
the run, before it creates any output (a bad generator fails with a one-line error and leaves
nothing behind), and again when it is loaded; its SHA-256 enters the run's fingerprint.
Building the method does no file I/O.

**Original prediction.** The engine's manifest fields ``orig_pred``/``orig_prob``/
``orig_target_prob`` (and the target rule) always come from the *query*. The optimisation
itself starts from the reconstruction ``x0 = decode(encode(x))``, which the classifier may see
differently; so every record also stores ``recon_pred``, ``recon_target_prob`` (the classifier
on ``x0``) and ``recon_mse`` (mean squared reconstruction error), plus the tensors
``latent_init`` (``z0``) and ``latent`` (the final ``z``). ``original_prediction`` (recorded
with the method settings in ``run.json``) says which one the method treats as the original:
``"query"`` (default) or ``"reconstruction"``. The latter makes ``x0`` the reference of the
optional pixel distance term; the start point is the reconstruction in both cases
(``x' = decode(z0)`` at step 0), so an image whose reconstruction already reaches the
threshold stops at step 0. Read ``recon_*`` instead of ``orig_*`` for such runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import lightning as L
import torch
from torch import Tensor

from lit_cf.errors import UserError
from lit_cf.explainers.base import CounterfactualMethod, per_image_sum
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.utils.checkpoint import checkpoint_class, file_sha256, load_module

__all__ = ["LatentAttack", "LatentLinearEdit", "check_generator_checkpoint"]

ORIGINAL_PREDICTION = ("query", "reconstruction")
ATTACK_LOSSES = ("prob", "log_prob")
PIXEL_NORMS = ("l2", "l1")


class Codec(Protocol):
    """What latent methods use of a generator: ``encode(x) -> z`` and ``decode(z) -> x``."""

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...


def _has_codec(obj: Any) -> bool:
    return callable(getattr(obj, "encode", None)) and callable(getattr(obj, "decode", None))


def check_generator_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check (without building the model) that ``path`` holds a LightningModule with ``encode``/``decode``.

    Returns the checkpoint's hyperparameters. Raises :class:`~lit_cf.errors.UserError` with
    what is wrong: missing or unreadable file, unknown class, or a class without the interface.
    """
    if not path:
        raise UserError("LatentAttack needs a generator: pass --model.init_args.generator=<autoencoder .ckpt>")
    cls, hparams = checkpoint_class(path)
    class_path = hparams["_class_path"]
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)) or not _has_codec(cls):
        raise UserError(
            f"the generator {path} holds a {class_path}, which has no encode/decode: a latent method needs a "
            "LightningModule with encode(x) -> z and decode(z) -> x (e.g. lit_cf.models.AutoEncoder, or a "
            "GAN-inversion wrapper)"
        )
    return hparams


class _LatentMethod(CounterfactualMethod):
    """Shared part of the latent methods: the generator, the start code and the recorded extras."""

    abstract = True  # a base of methods, not a registered method

    def __init__(
        self,
        generator: str,
        steps: int,
        lr: float,
        threshold: float,
        original_prediction: str,
        log_every: int,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if original_prediction not in ORIGINAL_PREDICTION:
            raise ValueError(f"original_prediction must be one of {list(ORIGINAL_PREDICTION)}, got {original_prediction!r}")
        super().__init__(steps=steps, lr=lr, stop_probability=threshold, log_every=log_every)
        self.generator_path = str(generator)
        self.generator_hparams: dict[str, Any] | None = None  # set by check()
        self.threshold = threshold
        self.original_prediction = original_prediction
        self.generator: L.LightningModule | None = None
        # per-chunk state set by init_latents (one chunk is optimised at a time per process)
        self._chunk: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- wiring
    def check(self) -> None:
        """Check the input files (generator checkpoint, ...) without loading models; raises UserError."""
        if self.generator_hparams is None:
            self.generator_hparams = check_generator_checkpoint(self.generator_path)

    def attach(self, classifier: ImageClassifier) -> None:
        self.check()
        super().attach(classifier)
        if self.generator is None:
            generator = load_module(self.generator_path, L.LightningModule)
            if not _has_codec(generator):
                raise UserError(f"the generator {self.generator_path} has no encode/decode methods")
            self.generator = freeze(generator)  # a submodule: Lightning moves it with the method

    def frozen_modules(self) -> list[torch.nn.Module]:
        return super().frozen_modules() + ([self.generator] if self.generator is not None else [])

    def describe(self) -> dict[str, Any]:
        self.check()  # explain plans the run with describe(): fail here, before any output exists
        return {**super().describe(), "generator_sha256": file_sha256(self.generator_path)}

    def _require_generator(self) -> Codec:
        if self.generator is None:
            raise RuntimeError("no generator loaded: call attach(classifier) before explaining")
        return cast(Codec, self.generator)  # attach() checked encode/decode (_has_codec)

    # ----------------------------------------------------------------- helpers
    def decode(self, z: Tensor) -> Tensor:
        return self._require_generator().decode(z).float().clamp(0, 1)

    def _start(self, batch: dict[str, Tensor]) -> Tensor:
        """Encode the queries, keep ``z0``, ``x0`` and the classifier on ``x0`` for this chunk."""
        query = batch["image"].float()
        z0 = self._require_generator().encode(query).detach().float()
        with torch.no_grad():
            x0 = self.decode(z0)
            probs = self.attached_classifier()(x0).float().softmax(-1)
        self._chunk = {"z0": z0, "x0": x0, "recon_probs": probs}
        return z0

    def _reference(self, batch: dict[str, Tensor]) -> Tensor:
        """The image treated as the original (pixel distance): the query or its reconstruction."""
        return self._chunk["x0"] if self.original_prediction == "reconstruction" else batch["image"].float()

    def declared_outputs(self) -> tuple[str, ...]:
        return ("latent", "latent_init", "latent_l2", "recon_pred", "recon_target_prob", "recon_mse")

    def _extras(self, z: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        z0, x0, probs = self._chunk["z0"], self._chunk["x0"], self._chunk["recon_probs"]
        return {
            "latent": z.detach(),
            "latent_init": z0,
            "latent_l2": (z.detach() - z0).flatten(1).norm(dim=1),
            "recon_pred": probs.argmax(-1),
            "recon_target_prob": probs.gather(1, batch["target"][:, None]).squeeze(1),
            "recon_mse": (x0 - batch["image"].float()).square().flatten(1).mean(1),
        }


class LatentAttack(_LatentMethod):
    """Counterfactual Attack (Goldwasser & Hooker, 2025): Adam on the latent code, stop at a threshold.

    From ``z0 = encode(x)``, each step renders ``x' = decode(z)``, reads the classifier's
    probability ``p`` of the class of interest, stops the image once ``p`` crosses the
    threshold, and otherwise takes one Adam step on ``-p`` (the authors' code: the loss is
    the probability itself, not a cross-entropy; no distance penalty, no projection:
    proximity comes from stopping early). See the module docstring for the generator
    interface and the recorded extras.

    Per-image loss terms: ``attack`` = ``-p_target`` (or ``+p_source`` when ``decreasing``),
    or with ``loss="log_prob"`` ``-log p_target`` (``-log(1 - p_source)`` when decreasing),
    plus, only when their weight is non-zero, ``latent`` = ``latent_weight * ||z - z0||^2``
    and ``pixel`` = ``pixel_weight * ||x' - x_ref||^2`` (``pixel_norm="l2"``) or
    ``pixel_weight * ||x' - x_ref||_1`` (``pixel_norm="l1"``) (``x_ref``: the query, or its
    reconstruction with ``original_prediction="reconstruction"``). The squared norm is cheap
    for a small change spread over many pixels (dimming every stroke a little) and dear for a
    large change of a few (a small bright mark); the L1 norm prices both by their total change,
    as the pixel baseline's L1 term does.

    **Attack loss.** ``loss="prob"`` (default) is the authors' ``-p``. Its gradient is
    ``p * d(logit margin)``, which vanishes when the classifier is certain the image is *not*
    the target: with ``p`` below about 1e-10 Adam's step ``m / (sqrt(v) + eps)`` falls far
    under ``lr`` and the code does not move in 1,000 steps (observed for confident MNIST-style
    classifiers, see the ground-truth study, ``docs/results/ground_truth.md``). ``loss="log_prob"`` uses the log of the same
    probability, whose gradient does not shrink with ``p``; the stopping rule is unchanged, so
    it only changes the path, and only matters for such saturated starts.

    **Increasing** (default): the class of interest is the target; an image stops when
    ``p_target >= threshold`` (paper: 0.75; digit-to-digit MNIST: 0.5).

    **Decreasing** (``decreasing=True``, binary classifiers only): the class of interest is the
    *source* ``1 - target`` (e.g. "smiling" when making a smiling face not smile); the loss is
    ``+p_source`` and an image stops when ``p_source <= 1 - threshold`` (the paper's tau = 0.25
    for the default threshold 0.75). With two classes ``p_source = 1 - p_target``, so the
    gradient and the stopping step equal those of the increasing attack towards the other
    class; the switch matters for what the run *means*: attributions of a decreasing run use
    sign -1 and group by the source class (:func:`lit_cf.attribution.attribute_run`).

    Args:
        generator: Checkpoint of a LightningModule with ``encode``/``decode`` (see above).
        steps: Maximum Adam steps per image (paper, MNIST: 1,000; CelebA/StyleGAN: 500).
        lr: Adam learning rate on the latent (paper: 0.1 for the MNIST autoencoder, 0.01 for
            StyleGAN latents).
        threshold: Stopping confidence (see increasing/decreasing above).
        decreasing: Decrease the source class of a binary classifier instead of increasing
            the target.
        latent_weight: Weight of ``||z - z0||^2`` (0: off, as in the paper).
        pixel_weight: Weight of the pixel proximity term (0: off, as in the paper).
        original_prediction: ``"query"`` or ``"reconstruction"`` (module docstring).
        loss: ``"prob"`` (the paper's ``-p``) or ``"log_prob"`` (``-log p``), see above.
        log_every: Log the loss terms every this many steps.
        pixel_norm: ``"l2"`` (squared, default) or ``"l1"``: the norm of the pixel term.
    """

    def __init__(
        self,
        generator: str,
        steps: int = 1000,
        lr: float = 0.1,
        threshold: float = 0.75,
        decreasing: bool = False,
        latent_weight: float = 0.0,
        pixel_weight: float = 0.0,
        original_prediction: str = "query",
        loss: str = "prob",
        log_every: int = 10,
        pixel_norm: str = "l2",
    ) -> None:
        if latent_weight < 0 or pixel_weight < 0:
            raise ValueError("latent_weight and pixel_weight must be >= 0")
        if loss not in ATTACK_LOSSES:
            raise ValueError(f"loss must be one of {list(ATTACK_LOSSES)}, got {loss!r}")
        if pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"pixel_norm must be one of {list(PIXEL_NORMS)}, got {pixel_norm!r}")
        super().__init__(generator, steps, lr, threshold, original_prediction, log_every)
        self.save_hyperparameters()
        self.decreasing, self.loss = decreasing, loss
        self.latent_weight, self.pixel_weight, self.pixel_norm = latent_weight, pixel_weight, pixel_norm

    def attach(self, classifier: ImageClassifier) -> None:
        if self.decreasing and getattr(classifier, "num_classes", 2) != 2:
            raise UserError(
                f"decreasing: true needs a binary classifier (a binary attribute), this one has "
                f"{classifier.num_classes} classes; use the increasing attack towards a target class"
            )
        super().attach(classifier)

    def interest_prob(self, probs: Tensor, target: Tensor) -> Tensor:
        """Probability of the class of interest: the target, or the source ``1 - target`` when decreasing."""
        cls = 1 - target if self.decreasing else target
        return probs.gather(1, cls[:, None]).squeeze(1)

    def target_reached(self, target_prob: Tensor) -> Tensor:
        if self.decreasing:  # binary: p_source = 1 - p_target must fall to 1 - threshold
            return (1 - target_prob) <= 1 - self.threshold
        return target_prob >= self.threshold

    def init_latents(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # a copy: the engine updates its latents in place, z0 must stay the start code
        return {"z": self._start(batch).clone()}

    def render(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return self.decode(latents["z"])

    def loss_terms(
        self, x_cf: Tensor, logits: Tensor, latents: dict[str, Tensor], batch: dict[str, Tensor], step: int
    ) -> dict[str, Tensor]:
        if self.loss == "log_prob":
            # -log p_target; when decreasing (binary only) log(1 - p_source) is the same log p_target
            log_p = logits.float().log_softmax(-1).gather(1, batch["target"][:, None]).squeeze(1)
            terms = {"attack": -log_p}
        else:
            p = self.interest_prob(logits.float().softmax(-1), batch["target"])
            terms = {"attack": p if self.decreasing else -p}
        if self.latent_weight:
            terms["latent"] = self.latent_weight * per_image_sum((latents["z"] - self._chunk["z0"]).square())
        if self.pixel_weight:
            diff = x_cf - self._reference(batch)
            terms["pixel"] = self.pixel_weight * per_image_sum(diff.abs() if self.pixel_norm == "l1" else diff.square())
        return terms

    def extra_outputs(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._extras(latents["z"], batch)


class LatentLinearEdit(_LatentMethod):
    """Linear latent edit along one descriptor's direction (InterFaceGAN-style baseline).

    ``z = z0 + alpha * sign * w / ||w||`` with ``w`` the direction of ``descriptor`` in a
    linear latent predictor file (:meth:`lit_cf.attribution.LinearPredictors.direction`,
    written by :meth:`~lit_cf.attribution.LinearPredictors.save` from codes of the same
    generator). The edit does not use the classifier's gradient: ``alpha`` follows the fixed
    schedule ``alpha_t = t * step_size`` and the classifier only decides when to stop (at
    ``p_target >= threshold``), so the result says how far along the descriptor direction the
    classifier changes its mind, if at all.

    Implementation on the engine: ``alpha`` (one scalar per image, starting at 0) is the
    optimised latent with the loss term ``walk = -alpha``. Its gradient is the constant -1,
    for which Adam's normalised step is exactly ``lr`` (``m_hat / sqrt(v_hat) = -1``), so with
    ``lr = step_size`` every active image moves by ``step_size`` per step and a stopped image
    stays where it stopped. ``alpha`` is recorded per record (manifest field), with the
    latents and reconstruction extras of :class:`LatentAttack`.

    Args:
        generator: Checkpoint of a LightningModule with ``encode``/``decode``.
        direction: Path of a linear predictor file (safetensors) fitted on this generator's codes.
        descriptor: Which descriptor's direction to follow.
        sign: ``+1`` walks towards more of the descriptor, ``-1`` towards less.
        step_size: Latent distance per step (along the unit direction).
        steps: Maximum steps (largest edit: ``steps * step_size``).
        threshold: Stop once the target probability reaches this value.
        original_prediction: ``"query"`` or ``"reconstruction"`` (module docstring).
        log_every: Log the loss terms every this many steps.
    """

    unit_direction: Tensor | None  # buffer, registered in __init__, set by check()

    def __init__(
        self,
        generator: str,
        direction: str,
        descriptor: str,
        sign: float = 1.0,
        step_size: float = 0.1,
        steps: int = 200,
        threshold: float = 0.75,
        original_prediction: str = "query",
        log_every: int = 10,
    ) -> None:
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        super().__init__(generator, steps, step_size, threshold, original_prediction, log_every)
        self.save_hyperparameters()
        self.direction_path, self.descriptor, self.sign = str(direction), descriptor, float(sign)
        self.register_buffer("unit_direction", None, persistent=False)  # set by check()

    def check(self) -> None:
        super().check()
        if self.unit_direction is not None:
            return
        from lit_cf.attribution.predictors import LinearPredictors

        w = LinearPredictors.load(self.direction_path).direction(self.descriptor).float()
        norm = float(w.norm())
        if not norm > 0:
            raise UserError(f"the direction of {self.descriptor!r} in {self.direction_path} is zero: refit the predictors")
        latent_dim = (self.generator_hparams or {}).get("latent_dim")
        if isinstance(latent_dim, int) and latent_dim != w.numel():
            raise UserError(
                f"the direction in {self.direction_path} is {w.numel()}-d but the generator's latent is "
                f"{latent_dim}-d: fit the predictors on codes of this generator"
            )
        self.unit_direction = self.sign * w / norm

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "direction_sha256": file_sha256(self.direction_path)}

    def _direction(self) -> Tensor:
        if self.unit_direction is None:
            raise RuntimeError("no direction loaded: call attach(classifier) before explaining")
        return self.unit_direction

    def _z(self, alpha: Tensor) -> Tensor:
        z0 = self._chunk["z0"]
        return z0 + alpha.view(-1, *[1] * (z0.dim() - 1)) * self._direction().view(1, *z0.shape[1:]).to(z0.device)

    def init_latents(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        z0 = self._start(batch)
        if z0[0].numel() != self._direction().numel():
            raise UserError(
                f"the direction is {self._direction().numel()}-d but the generator's codes are "
                f"{z0[0].numel()}-d: fit the predictors on codes of this generator"
            )
        return {"alpha": torch.zeros(len(z0), 1, device=z0.device)}

    def render(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return self.decode(self._z(latents["alpha"]))

    def loss_terms(
        self, x_cf: Tensor, logits: Tensor, latents: dict[str, Tensor], batch: dict[str, Tensor], step: int
    ) -> dict[str, Tensor]:
        return {"walk": -latents["alpha"].squeeze(1)}

    def declared_outputs(self) -> tuple[str, ...]:
        return ("alpha", *super().declared_outputs())

    def extra_outputs(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        alpha = latents["alpha"].detach()
        return {"alpha": alpha.squeeze(1), **self._extras(self._z(alpha), batch)}
