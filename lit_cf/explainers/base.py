"""The counterfactual engine: per-image latents optimised inside Lightning's predict loop.

Mechanism (and why): each predict batch is a *chunk* of (query, target) records, and
``predict_step`` runs the whole optimisation of that chunk under ``torch.enable_grad()``.
Lightning's predict loop then supplies devices, precision (autocast around the step),
strategies (each rank gets its own chunks) and callbacks (the writer), while the latents live
only for the chunk. A ``fit`` per chunk would rebuild optimizers, loggers and checkpoints for
every chunk and, under DDP, all-reduce gradients across ranks, which would couple images that
must stay independent. Here gradients are taken with ``torch.autograd.grad`` on tensors
created in the step, so no DDP hook ever fires.

Per-image independence: the loss is a *sum* of per-image terms, the optimiser is an
element-wise Adam whose state and step counter are per image, and every random draw comes from
a generator seeded by the record's own seed. So the counterfactual of image i does not depend
on which images share its chunk or device.

Per-image stopping: an image whose stopping rule is met stops changing (its update is masked
to zero and its Adam step counter stops); the step at which it stopped is recorded.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.report.outputs import IMAGE_SEQUENCE, OutputSpec


def per_image_sum(t: Tensor) -> Tensor:
    """Sum every dimension but the first: ``[B, ...] -> [B]``."""
    return t.flatten(1).sum(1)


class CounterfactualMethod(L.LightningModule):
    """Base class of explain methods: subclasses define latents, rendering and loss terms.

    Every concrete subclass in :mod:`lit_cf.explainers` is a registered method
    (:mod:`lit_cf.explainers.registry`) and must pass the method contract test
    (``tests/explainers/test_method_contract.py``); intermediate bases set ``abstract = True``.

    Subclasses implement :meth:`init_latents`, :meth:`render` and :meth:`loss_terms`, and may
    override :meth:`project` (after each update) and :meth:`extra_outputs`. The engine
    (:meth:`optimise`) is shared.

    Args:
        steps: Maximum optimisation steps per image.
        lr: Adam learning rate of the latents.
        betas: Adam betas.
        stop_probability: Stop an image once the classifier's target probability reaches this
            value (``None``: always run ``steps`` steps).
        log_every: Log the per-step quantities every this many steps (0 disables).
    """

    abstract = True
    # Settings added after runs of the method existed, with the value that reproduces the method
    # as it was before: ``describe`` leaves a setting out of the record while it holds that value,
    # so earlier runs keep their fingerprint (explain resumes them, studies reuse them).
    later_settings: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        steps: int = 200,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        stop_probability: float | None = 0.9,
        log_every: int = 10,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if stop_probability is not None and not 0.0 < stop_probability <= 1.0:
            raise ValueError(f"stop_probability must be in (0, 1] or None, got {stop_probability}")
        self.steps, self.lr, self.betas = steps, lr, cast(tuple[float, float], tuple(betas))
        self.stop_probability = stop_probability
        self.log_every = log_every
        self.classifier: ImageClassifier | None = None
        self._log_step = 0
        # under DDP a rank may have no pending chunk (few chunks, or a resume near the end)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # ----------------------------------------------------------------- wiring
    def attach(self, classifier: ImageClassifier) -> None:
        """Attach the classifier to explain, frozen and in eval mode (BN statistics fixed)."""
        self.classifier = freeze(classifier)

    def train(self, mode: bool = True) -> CounterfactualMethod:
        # models explained or used as priors stay in eval mode whatever the loop asks for
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that must stay in eval mode (the classifier, generators, DUQ models)."""
        return [self.classifier] if self.classifier is not None else []

    def prepare(self, classifier: ImageClassifier) -> None:
        """Settle choices that depend on the explained classifier before the run is planned.

        ``lit-cf explain`` calls it before :meth:`describe`, so that what ``describe`` records
        is what the run does (e.g. DISC's ``duq: auto``). The default does nothing.
        """

    def stopping_rule(self) -> str:
        """When an image stops, in words (recorded in the run as ``stopping``, shown by evaluate)."""
        if self.stop_probability is None:
            return f"none: every image runs {self.steps} steps"
        return f"per image at p(target) >= {self.stop_probability:g}, at most {self.steps} steps"

    def describe(self) -> dict[str, Any]:
        """Method settings recorded in the run directory (with the :meth:`stopping_rule`)."""
        settings = {k: v for k, v in self.hparams.items() if not (k in self.later_settings and v == self.later_settings[k])}
        out = {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            **settings,
            "stopping": self.stopping_rule(),
        }
        specs = self.output_specs()
        if specs:  # what the grids and the report draw; absent for methods that declare no pictures
            out["outputs"] = {k: v.to_json() for k, v in specs.items()}
        return out

    # ----------------------------------------------------------------- subclass hooks
    def init_latents(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-image latents (leading dimension = chunk size), e.g. ``{"x": query.clone()}``."""
        raise NotImplementedError

    def render(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Counterfactual images in ``[0, 1]`` from the latents."""
        raise NotImplementedError

    def loss_terms(
        self, x_cf: Tensor, logits: Tensor, latents: dict[str, Tensor], batch: dict[str, Tensor], step: int
    ) -> dict[str, Tensor]:
        """Per-image loss terms ``{name: [B]}``; the engine minimises their sum."""
        raise NotImplementedError

    def project(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        """In-place projection after each update (e.g. clamp pixels to ``[0, 1]``)."""

    def extra_outputs(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra per-record tensors saved with the counterfactuals (leading dim = chunk size)."""
        return {}

    def declared_outputs(self) -> tuple[str, ...]:
        """Names of the extra tensors every chunk of this method (with these settings) saves.

        The contract test checks them against the run; :meth:`output_specs` says which of them
        the grids and the report draw.
        """
        return ()

    def output_specs(self) -> dict[str, OutputSpec]:
        """How the pictures draw declared outputs: ``{name: OutputSpec}`` (recorded by :meth:`describe`).

        Outputs not named here are saved but not drawn. By default a declared ``stages`` output
        (``[B, K, C, H, W]`` intermediate images) is an image sequence, drawn as progression
        strips by the explain grids and the evaluate report; override to caption it.
        """
        if "stages" in self.declared_outputs():
            return {"stages": OutputSpec(IMAGE_SEQUENCE, "stages of the optimisation, first to last")}
        return {}

    # ----------------------------------------------------------------- hooks
    def add_forward_hook(self, module: torch.nn.Module, hook: Any) -> None:
        """Register a forward hook on a model this method uses; :meth:`remove_hooks` removes it.

        Hooks are registered inside the predict loop (not in :meth:`attach`) so the method stays
        picklable for ``ddp_spawn``, and removed when the loop ends, so the user's classifier is
        left as it was given.
        """
        self.__dict__.setdefault("_hook_handles", []).append(module.register_forward_hook(hook))

    def has_hooks(self) -> bool:
        return bool(self.__dict__.get("_hook_handles"))

    def remove_hooks(self) -> None:
        """Remove every forward hook this method registered (idempotent)."""
        for handle in self.__dict__.pop("_hook_handles", []):
            handle.remove()

    def on_predict_end(self) -> None:
        self.remove_hooks()

    # ----------------------------------------------------------------- engine
    def target_reached(self, target_prob: Tensor) -> Tensor:
        if self.stop_probability is None:
            return torch.zeros_like(target_prob, dtype=torch.bool)
        return target_prob >= self.stop_probability

    def _log(self, terms: dict[str, Tensor], target_prob: Tensor, active: Tensor) -> None:
        if not self.log_every or self._trainer is None or self._log_step % self.log_every:
            self._log_step += 1
            return
        metrics = {f"explain/{k}": float(v.detach().mean()) for k, v in terms.items()}
        metrics["explain/target_prob"] = float(target_prob.mean())
        metrics["explain/active"] = float(active.float().mean())
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self._log_step)
        self._log_step += 1

    def check_ready(self) -> None:
        """Raise unless a classifier is attached and autograd is available."""
        if self.classifier is None:
            raise RuntimeError("no classifier attached: call attach(classifier) before explaining")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "explain needs gradients but inference mode is on: call optimise() outside torch.inference_mode() "
                "(predict_step, which Trainer.predict and lit-cf explain call, leaves it by itself)"
            )

    def attached_classifier(self) -> ImageClassifier:
        """The attached classifier; raises like :meth:`check_ready` when none is attached."""
        if self.classifier is None:
            raise RuntimeError("no classifier attached: call attach(classifier) before explaining")
        return self.classifier

    def new_latents(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Leaf latents from :meth:`init_latents` and their zeroed Adam moments."""
        latents = {k: v.detach().float().requires_grad_(True) for k, v in self.init_latents(batch).items()}
        moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in latents.items()}
        return latents, moments

    def descend(
        self,
        latents: dict[str, Tensor],
        moments: dict[str, tuple[Tensor, Tensor]],
        t: Tensor,
        batch: dict[str, Tensor],
        steps: int,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Up to ``steps`` masked Adam steps until :meth:`target_reached` holds per image.

        ``active`` (default: all) masks images that must not move at all (they report 0 steps).
        Returns ``(steps_used, t)``: the step at which each image stopped (``steps`` if it never
        did) and the per-image Adam step counters (pass them back in to continue the same
        optimiser, as progressive methods do between stages).
        """
        target = batch["target"]
        if active is None:
            active = torch.ones(len(target), dtype=torch.bool, device=target.device)
        steps_used = torch.where(active, steps, 0).to(target.dtype)
        classifier = self.attached_classifier()
        for step in range(steps):
            x_cf = self.render(latents, batch)
            logits = classifier(x_cf)
            target_prob = logits.float().softmax(-1).gather(1, target[:, None]).squeeze(1).detach()
            done = active & self.target_reached(target_prob)
            steps_used = torch.where(done, torch.full_like(steps_used, step), steps_used)
            active = active & ~done
            if not active.any():
                break
            terms = self.loss_terms(x_cf, logits, latents, batch, step)
            total = torch.stack([v.float() for v in terms.values()]).sum(0)
            self._log(terms, target_prob, active)
            grads = torch.autograd.grad(total.sum(), list(latents.values()), allow_unused=True)
            t = t + active.float()
            masked_adam_update(latents, grads, moments, t, active, self.lr, self.betas)
            with torch.no_grad():
                self.project(latents, batch)
        return steps_used, t

    def optimise(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Optimise the latents of one chunk; returns counterfactuals and per-record results."""
        self.check_ready()
        target = batch["target"]
        with torch.enable_grad():
            latents, moments = self.new_latents(batch)
            t = torch.zeros(len(target), device=target.device)
            steps_used, _ = self.descend(latents, moments, t, batch, self.steps)
            with torch.no_grad():
                x_cf = self.render(latents, batch).detach()
                probs = self.attached_classifier()(x_cf).float().softmax(-1)
                extras = {k: v.detach() for k, v in self.extra_outputs(latents, batch).items()}
        return {
            "counterfactual": x_cf.clamp(0, 1),
            "final_probs": probs,
            "steps": steps_used,
            **extras,
        }

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Optimise one chunk inside Lightning's predict loop, whatever its grad mode.

        The loop runs under ``torch.inference_mode`` (``Trainer(inference_mode=True)``, the
        default) or ``torch.no_grad``; the optimisation needs autograd, so this step leaves
        inference mode for its own duration and works on copies of the batch tensors (tensors
        made in inference mode cannot take part in autograd). The trainer's settings are left
        as the user gave them.
        """
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: v.clone() if isinstance(v, Tensor) and v.is_inference() else v for k, v in batch.items()}
            start = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            out: dict[str, Any] = dict(self.optimise(batch))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                out["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:  # the process's peak resident memory so far (Linux reports KiB)
                out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["chunk_seconds"] = time.perf_counter() - start
        return out


@torch.no_grad()
def masked_adam_update(
    latents: dict[str, Tensor],
    grads: Sequence[Tensor | None],
    moments: dict[str, tuple[Tensor, Tensor]],
    t: Tensor,
    active: Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
) -> None:
    """One element-wise Adam step per image, in place; images with ``active`` false do not move.

    ``t`` holds each image's own step counter (already incremented for this step), so an image's
    bias correction does not depend on its chunk-mates. The same arithmetic runs whether or not
    some images have stopped; the masked path only selects, with ``where`` rather than a product
    so that a NaN gradient of a stopped image cannot leak into its latent.
    """
    b1, b2 = betas
    all_active = bool(active.all())
    for (name, latent), grad in zip(latents.items(), grads):
        if grad is None:
            continue
        keep = active.view(-1, *[1] * (latent.dim() - 1))
        m, v = moments[name]
        tt = t.clamp_min(1).view(keep.shape)
        m_new = b1 * m + (1 - b1) * grad
        v_new = b2 * v + (1 - b2) * grad * grad
        update = lr * (m_new / (1 - b1**tt)) / ((v_new / (1 - b2**tt)).sqrt() + eps)
        if all_active:
            m.copy_(m_new)
            v.copy_(v_new)
            latent.sub_(update)
        else:
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))
            latent.sub_(torch.where(keep, update, torch.zeros_like(update)))


def cross_entropy_to_target(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image cross-entropy towards the target class ``[B]``."""
    return F.cross_entropy(logits.float(), target, reduction="none")


def seeded_uniform(seeds: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Per-record uniform draws ``[B, *shape]``, each row from a generator seeded by its record seed.

    One generator per record (a loop over the chunk, once per chunk, not per step) keeps every
    random choice of image i independent of its chunk-mates.
    """
    rows = []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(int(s) % (2**63 - 1))
        rows.append(torch.rand(shape, generator=g))
    return torch.stack(rows).to(device) if rows else torch.empty(0, *shape, device=device)


def tv_losses(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image total variation ``(TV_l1, TV_l2)`` over horizontal, vertical and diagonal neighbours."""
    diffs = [
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    ]
    tv1 = cast(Tensor, sum(per_image_sum(d.abs()) for d in diffs))  # sum() of tensors: a tensor
    tv2 = cast(Tensor, sum(per_image_sum(d * d) for d in diffs)).clamp_min(1e-12).sqrt()
    return tv1, tv2


__all__ = [
    "CounterfactualMethod",
    "cross_entropy_to_target",
    "masked_adam_update",
    "per_image_sum",
    "seeded_uniform",
    "tv_losses",
]
