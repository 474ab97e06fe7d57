"""DISC (Thiagarajan et al., NeurIPS 2021): see :class:`DISCCounterfactual`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.explainers.base import CounterfactualMethod, cross_entropy_to_target, masked_adam_update, per_image_sum, tv_losses
from lit_cf.explainers.priors import PRIORS, DIPPrior, ImagePrior, INRPrior, PixelPrior, fixed_entries, psnr
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.utils.checkpoint import checkpoint_class, file_sha256, load_module

DEFAULT_LR = {"pixels": 0.01, "dip": 0.001, "inr": 0.0005}
DEFAULT_FIT_LR = {"pixels": 0.0, "dip": 0.01, "inr": 0.003}
MC_LOSSES = ("log_kernel", "bce")
STAGE_RULES = ("steps", "threshold")
DUQ_CHOICES = ("auto", "self")
FEATURE_DISTANCES = ("mse", "relative_mse", "cosine")


class DISCCounterfactual(CounterfactualMethod):
    """DISC (Thiagarajan et al., NeurIPS 2021): data-free counterfactuals with strong image priors.

    Only the explained classifier (and, for manifold consistency, a DUQ model) is used: DISC never
    reads training data; it optimises the parameters of a per-image image prior so that the
    rendered image ``x'`` reaches the target class while keeping the query's semantics.

    Loss per image (every term is a switch; a term with weight 0 is absent from the loss)::

        cf_weight      * CE(f(x'), target)                                   counterfactual
      + feature_weight * sum_l d(F_l(x'), F_l(x))                            semantic preservation
      + mc_weight      * L_mc(x')                                            manifold consistency
      + tv_weight * TV_l2(x') + l2_weight * ||x' - x||_2^2                   optional priors

    How the open points of the paper are read here (each one is a setting):

    * **Priors** (``prior``): ``pixels`` (ISO), ``dip``, ``inr`` (:mod:`lit_cf.explainers.priors`).
      A network prior is first *fitted to the query* (the natural reading): up to ``fit_steps``
      Adam steps on ``||x' - x||^2`` at ``fit_lr``, per image until its PSNR reaches
      ``fit_psnr``. The PSNR reached is recorded per record (``prior_psnr``; 100 dB for pixels),
      and the fitted prior's image is saved (``prior_image``): attributions can then score
      the edit from it (:func:`lit_cf.attribution.attribute_run` with ``before="prior_image"``).
      ``fit_steps: 0`` skips the fit (the prior starts from its random output).
    * **Feature layers** (``feature_layers``): module names of the classifier (as in
      ``named_modules()``); ``None`` = every ``Conv2d`` of the classifier. The features are the
      modules' outputs (cloned, so an in-place activation after them does not change them), the
      distance ``feature_distance`` is the mean squared difference (``mse``), the squared
      difference relative to the query's feature energy ``||F(x') - F(x)||^2 / ||F(x)||^2``
      (``relative_mse``: scale-free, so one weight carries over between classifiers; ``mse``'s
      scale follows the classifier's activations) or one minus the cosine similarity
      (``cosine``) per layer, summed over layers, against the query's features.
    * **Manifold consistency** (``duq``): ``"auto"`` (default: the explained classifier when it
      is a :class:`~lit_cf.models.DUQClassifier`, else off, since no DUQ model is available),
      ``None`` (off), ``"self"`` (the explained classifier, which must be a DUQ model) or the
      path of an auxiliary DUQ checkpoint for the same classes. The run records which model
      was used (``manifold_consistency`` in ``run.json``'s method entry) and ``auto`` prints it.
      ``mc_loss="log_kernel"`` minimises ``-log K_target(x')``
      (exact, from the DUQ model's log-kernel logits, so it keeps a gradient where ``K``
      underflows); ``mc_loss="bce"`` the DUQ training loss ``BCE(K(x'), onehot(target))``.
    * **Progressive optimisation** (``progressive``): the target probability is raised through
      ``stages``; each stage continues from the previous one with the same optimiser state and
      every stage's image is kept (``stages`` tensor ``[B, S, C, H, W]``, with
      ``stage_target_prob`` and ``stage_steps``): a progression strip. Without ``progressive``
      there is one stage at ``stages[-1]`` with the same total budget (``steps * len(stages)``).
      How a stage ends is ``stage_rule``:

      - ``"steps"`` (default; the authors run the full optimisation budget): every stage runs
        ``steps`` steps. Stage ``s`` pulls the prediction towards a soft label with probability
        ``stages[s]`` on the target and the rest on the query's predicted class (cross-entropy
        to that label; ``1.0`` is the plain cross-entropy to the target), so the target is
        raised between stages rather than used as a stopping point. An image stops early only
        at ``stop_probability`` (default ``None``: never), so the prior, the feature term and
        the manifold term shape every image for the whole budget.
      - ``"threshold"`` (the earlier behaviour, kept as a switch): each stage optimises the
        plain cross-entropy until the image's target probability reaches the stage value (at
        most ``steps`` steps), i.e. it stops a few steps past each stage value (the last one is
        the stopping threshold; ``stop_probability`` is not used). A stage already met at its
        start costs no step. An image that fails a stage goes back to its state at the end of
        the previous stage and takes no further steps, so every strip is non-decreasing in
        target probability. Measured on MNIST (issue 16), stopping this early leaves DISC's
        counterfactuals adversarial: 6.7 steps on average and an oracle agreement of 0.46.

    ``lr`` and ``fit_lr`` default (``None``) to values that suit each prior: pixels 0.01 / -,
    DIP 0.001 / 0.01, INR 0.0005 / 0.003 (Adam on network weights needs smaller steps than on
    pixels).

    Args:
        prior: ``pixels``, ``dip`` or ``inr``.
        steps: Maximum optimisation steps per stage.
        lr: Adam learning rate of the counterfactual optimisation (``None``: per prior).
        cf_weight: Weight of the cross-entropy towards the target.
        feature_weight: Weight of semantic preservation (0 disables).
        feature_layers: Classifier module names whose outputs are preserved (``None``: all Conv2d).
        feature_distance: ``mse``, ``relative_mse`` or ``cosine``.
        duq: Manifold consistency model: ``None``, ``"self"`` or a DUQ checkpoint path.
        mc_weight: Weight of manifold consistency (0 disables).
        mc_loss: ``log_kernel`` or ``bce``.
        tv_weight: Weight of the L2 total variation of ``x'`` (0 disables).
        l2_weight: Weight of ``||x' - x||_2^2`` (0 disables).
        progressive: Raise the target probability in stages.
        stages: Increasing target probabilities in ``(0, 1]`` (``(0, 1)`` with ``stage_rule:
            threshold``, where the last is the stopping threshold).
        stage_rule: ``steps`` (every stage runs ``steps`` steps towards a soft label) or
            ``threshold`` (a stage ends at its target probability; the earlier default).
        stop_probability: With ``stage_rule: steps``, stop an image once its target probability
            reaches this value (``None``: never; every image runs the whole budget).
        fit_steps: Maximum steps fitting a network prior to the query.
        fit_lr: Adam learning rate of the fit (``None``: per prior).
        fit_psnr: Stop fitting an image once its PSNR reaches this value (dB).
        dip_channels, dip_noise_channels, dip_skip_channels: DIP widths (:class:`DIPPrior`).
        inr_hidden, inr_layers, inr_activation, inr_fourier_features, inr_fourier_scale: INR
            settings (:class:`INRPrior`).
        log_every: Log the loss terms every this many steps.
    """

    def __init__(
        self,
        prior: str = "dip",
        steps: int = 100,
        lr: float | None = None,
        cf_weight: float = 1.0,
        feature_weight: float = 1.0,
        feature_layers: list[str] | None = None,
        feature_distance: str = "mse",
        duq: str | None = "auto",
        mc_weight: float = 0.0,
        mc_loss: str = "log_kernel",
        tv_weight: float = 0.0,
        l2_weight: float = 0.0,
        progressive: bool = True,
        stages: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        stage_rule: str = "steps",
        stop_probability: float | None = None,
        fit_steps: int = 300,
        fit_lr: float | None = None,
        fit_psnr: float = 30.0,
        dip_channels: int = 32,
        dip_noise_channels: int = 8,
        dip_skip_channels: int = 4,
        inr_hidden: int = 64,
        inr_layers: int = 3,
        inr_activation: str = "sine",
        inr_fourier_features: int = 64,
        inr_fourier_scale: float = 3.0,
        log_every: int = 10,
    ) -> None:
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")
        if stage_rule not in STAGE_RULES:
            raise ValueError(f"stage_rule must be one of {list(STAGE_RULES)}, got {stage_rule!r}")
        stages = [float(s) for s in stages]
        top = 1.0 if stage_rule == "steps" else 1.0 - 1e-12
        if not stages or any(not 0 < s <= top for s in stages) or any(b <= a for a, b in zip(stages, stages[1:])):
            bound = "(0, 1]" if stage_rule == "steps" else "(0, 1) (stage_rule: threshold stops at them)"
            raise ValueError(f"stages must be strictly increasing probabilities in {bound}, got {stages}")
        if mc_loss not in MC_LOSSES:
            raise ValueError(f"mc_loss must be one of {list(MC_LOSSES)}, got {mc_loss!r}")
        if feature_distance not in FEATURE_DISTANCES:
            raise ValueError(f"feature_distance must be one of {list(FEATURE_DISTANCES)}, got {feature_distance!r}")
        if min(cf_weight, feature_weight, mc_weight, tv_weight, l2_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if mc_weight > 0 and not duq:
            raise ValueError("mc_weight > 0 needs a DUQ model: duq: self (the explained DUQ classifier) or a DUQ .ckpt")
        if fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0, got {fit_steps}")
        lr = DEFAULT_LR[prior] if lr is None else lr
        stop = stages[-1] if stage_rule == "threshold" else stop_probability
        super().__init__(steps=steps, lr=lr, stop_probability=stop, log_every=log_every)
        self.save_hyperparameters()
        self.prior_name = prior
        self.cf_weight, self.feature_weight, self.mc_weight = cf_weight, feature_weight, mc_weight
        self.feature_layers = list(feature_layers) if feature_layers is not None else None
        self.feature_distance, self.duq_source, self.mc_loss = feature_distance, duq, mc_loss
        self.tv_weight, self.l2_weight = tv_weight, l2_weight
        self.progressive, self.stages, self.stage_rule = progressive, stages, stage_rule
        self.fit_steps, self.fit_psnr = fit_steps, fit_psnr
        self.fit_lr = DEFAULT_FIT_LR[prior] if fit_lr is None else fit_lr
        if prior == "dip":
            self.prior: ImagePrior = DIPPrior(dip_channels, dip_noise_channels, dip_skip_channels)
        elif prior == "inr":
            self.prior = INRPrior(inr_hidden, inr_layers, inr_activation, inr_fourier_features, inr_fourier_scale)
        else:
            self.prior = PixelPrior()
        self.duq_model: ImageClassifier | None = None
        self._duq_checked = False
        self._threshold = stages[-1]
        self._soft_target = 1.0  # the target's share of the label of the running stage (stage_rule: steps)
        self._mc_source: str | None = None  # resolved by prepare(): "self", a checkpoint path, or None
        self._layer_names: list[str] = []
        self._feats: list[Tensor] = []
        self._chunk: dict[str, Any] = {}

    # ----------------------------------------------------------------- wiring
    def _uses_aux_duq(self) -> bool:
        return bool(self.mc_weight) and self.duq_source not in (None, *DUQ_CHOICES)

    def _duq_path(self) -> str:
        """The auxiliary DUQ checkpoint (only called where :meth:`_uses_aux_duq` holds)."""
        if self.duq_source is None:
            raise RuntimeError("no auxiliary DUQ checkpoint configured")
        return self.duq_source

    def _resolve_duq(self, classifier: ImageClassifier) -> str | None:
        """``"self"``, the auxiliary checkpoint, or ``None`` (term off) for this classifier."""
        from lit_cf.models.duq import DUQClassifier

        if not self.mc_weight or self.duq_source is None:
            return None
        if self.duq_source == "auto":
            return "self" if isinstance(classifier, DUQClassifier) else None
        return self.duq_source

    def prepare(self, classifier: ImageClassifier) -> None:
        """Resolve ``duq: auto`` for ``classifier`` before the run is planned (``describe`` records it)."""
        self._mc_source = self._resolve_duq(classifier)
        self._prepared = True
        if self.duq_source == "auto" and self.mc_weight:
            print(f"DISC manifold consistency: {self.manifold_consistency()}")

    def manifold_consistency(self) -> str:
        """Which DUQ model the manifold-consistency term uses, in words (recorded in the run)."""
        if not self.mc_weight:
            return "off (mc_weight: 0)"
        if self.duq_source is None:
            return "off (duq: null)"
        if not getattr(self, "_prepared", False) and self.duq_source == "auto":
            return "auto (resolved when a classifier is attached)"
        source = self._mc_source if getattr(self, "_prepared", False) else self.duq_source
        if source is None:
            return "off (duq: auto, and the explained classifier is not a DUQ model; pass a DUQ checkpoint as duq to use one)"
        if source == "self":
            return f"on: the explained classifier (a DUQ model), {self.mc_loss}, weight {self.mc_weight:g}"
        return f"on: auxiliary DUQ checkpoint {source}, {self.mc_loss}, weight {self.mc_weight:g}"

    def stopping_rule(self) -> str:
        stages = ", ".join(f"{v:g}" for v in (self.stages if self.progressive else self.stages[-1:]))
        budget = self.steps if self.progressive else self.steps * len(self.stages)
        if self.stage_rule == "threshold":
            return f"per image at each stage's target probability ({stages}), at most {budget} steps per stage"
        if self.progressive:
            each = f"{budget} steps per stage (soft targets {stages})"
        else:
            each = f"{budget} steps (one stage, soft target {stages})"
        if self.stop_probability is None:
            return f"none: every image runs {each}"
        return f"per image at p(target) >= {self.stop_probability:g}, else {each}"

    def check(self) -> None:
        """Check the auxiliary DUQ checkpoint without loading it; raises UserError."""
        if self._duq_checked or not self._uses_aux_duq():
            return
        from lit_cf.models.duq import DUQClassifier

        cls, _ = checkpoint_class(self._duq_path())
        if not (isinstance(cls, type) and issubclass(cls, DUQClassifier)):
            raise UserError(
                f"duq: {self.duq_source} holds a {cls.__name__ if isinstance(cls, type) else cls}, not a DUQClassifier: "
                "manifold consistency needs a DUQ model (train one with configs/model/duq_cnn.yaml)"
            )
        self._duq_checked = True

    def describe(self) -> dict[str, Any]:
        self.check()  # explain plans the run with describe(): fail before any output exists
        out = super().describe()
        if self._uses_aux_duq():
            out["duq_sha256"] = file_sha256(self._duq_path())
        out["manifold_consistency"] = self.manifold_consistency()
        return out

    def attach(self, classifier: ImageClassifier) -> None:
        from lit_cf.models.duq import DUQClassifier

        self.check()
        super().attach(classifier)
        self._mc_source = self._resolve_duq(classifier)
        self._prepared = True
        if self._mc_source is not None:
            if self._mc_source == "self":
                if not isinstance(classifier, DUQClassifier):
                    raise UserError(
                        f"duq: self needs the explained classifier to be a DUQClassifier, it is a "
                        f"{type(classifier).__name__}: pass an auxiliary DUQ checkpoint as duq instead"
                    )
            elif self.duq_model is None:
                duq = load_module(self._duq_path(), DUQClassifier)
                if duq.num_classes != classifier.num_classes:
                    raise UserError(
                        f"the DUQ model {self.duq_source} has {duq.num_classes} classes, the classifier "
                        f"{classifier.num_classes}: manifold consistency needs a DUQ model of the same classes"
                    )
                self.duq_model = freeze(duq)  # a submodule: Lightning moves it with the method
        self._layer_names = self._resolve_layers()

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + ([self.duq_model] if self.duq_model is not None else [])

    def _resolve_layers(self) -> list[str]:
        """Names of the preserved classifier layers (checked here, at attach time)."""
        if not self.feature_weight:
            return []
        if getattr(self.classifier, "scripted", False):  # lit_cf.models.ExternalClassifier around TorchScript
            raise UserError(
                "DISC's feature preservation observes the classifier's layers, which TorchScript does not allow: give the "
                "classifier as {module: {class_path: ...}, weights: <the TorchScript file>} or set feature_weight: 0"
            )
        modules = dict(self.attached_classifier().named_modules())
        if self.feature_layers is None:
            names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not names:
                raise UserError("the classifier has no Conv2d layer: name the layers to preserve in feature_layers")
        else:
            missing = [n for n in self.feature_layers if n not in modules]
            if missing:
                known = [n for n in modules if n][:30]
                raise UserError(f"feature_layers {missing} are not modules of the classifier; some that are: {known}")
            names = self.feature_layers
        return names

    def _register_hooks(self) -> None:
        # registered inside the predict loop, not in attach, so the method stays picklable for ddp_spawn
        if not self.has_hooks():  # removed again when the predict loop ends (CounterfactualMethod.remove_hooks)
            modules = dict(self.attached_classifier().named_modules())
            for n in self._layer_names:
                self.add_forward_hook(modules[n], self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._feats.append(output.clone())  # a clone: an in-place activation must not change it

    # ----------------------------------------------------------------- losses
    def feature_loss(self, feats: list[Tensor], ref: list[Tensor]) -> Tensor:
        total: Tensor | float = 0.0
        for a, b in zip(feats, ref):
            a, b = a.float().flatten(1), b.float().flatten(1)
            if self.feature_distance == "mse":
                total = total + (a - b).square().mean(1)
            elif self.feature_distance == "relative_mse":  # scale-free: ||a - b||^2 / ||b||^2 per layer
                total = total + (a - b).square().sum(1) / b.square().sum(1).clamp_min(1e-12)
            else:
                total = total + 1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)
        return cast(Tensor, total)  # a tensor: DISC preserves at least one layer when feature_weight is on

    def manifold_loss(self, x_cf: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        # DUQ logits are the log-kernel values log K_c(x)
        if self._mc_source == "self" or self.duq_source == "self":
            log_k = logits.float()
        else:
            assert self.duq_model is not None  # attach() loads the auxiliary DUQ model
            log_k = self.duq_model(x_cf).float()
        if self.mc_loss == "log_kernel":
            return -log_k.gather(1, target[:, None]).squeeze(1)
        onehot = F.one_hot(target, log_k.shape[1]).float()
        # BCE(K, y) from log K: -y log K - (1 - y) log(1 - K), with log(1 - K) = log1p(-exp(log K))
        log_1mk = torch.log1p(-log_k.exp().clamp(max=1 - 1e-6))
        return -(onehot * log_k + (1 - onehot) * log_1mk).sum(1)

    def loss_terms(
        self, x_cf: Tensor, logits: Tensor, latents: dict[str, Tensor], batch: dict[str, Tensor], step: int
    ) -> dict[str, Tensor]:
        target = batch["target"]
        feats, self._feats = self._feats, []
        terms: dict[str, Tensor] = {}
        if self.cf_weight:
            if self._soft_target < 1.0:  # a progressive stage below the last: a soft label (see stage_rule)
                terms["cf"] = self.cf_weight * soft_cross_entropy(logits, target, self._chunk["source"], self._soft_target)
            else:
                terms["cf"] = self.cf_weight * cross_entropy_to_target(logits, target)
        if self.feature_weight:
            terms["feature"] = self.feature_weight * self.feature_loss(feats[-len(self._layer_names) :], self._chunk["ref_feats"])
        if self.mc_weight and self._mc_source is not None:
            terms["mc"] = self.mc_weight * self.manifold_loss(x_cf, logits, target)
        if self.tv_weight:
            terms["tv"] = self.tv_weight * tv_losses(x_cf)[1]
        if self.l2_weight:
            terms["l2"] = self.l2_weight * per_image_sum((x_cf - batch["image"].float()).square())
        if not terms:
            raise ValueError("every DISC loss weight is 0: nothing to optimise")
        return terms

    # ----------------------------------------------------------------- latents
    def _params(self, latents: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**self._chunk["fixed"], **latents}

    def init_latents(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self._register_hooks()
        query = batch["image"].float()
        params = self.prior.init(query, batch["seed"])
        fixed = fixed_entries(params)
        self._chunk = {"fixed": {k: params[k] for k in fixed}}
        latents = {k: v for k, v in params.items() if k not in fixed}
        if self.prior.needs_fit and self.fit_steps:
            latents, fit_steps = self._fit(latents, query)
        else:
            fit_steps = torch.zeros(len(query), dtype=torch.long, device=query.device)
        with torch.no_grad():
            x0 = self.prior.render(self._params(latents))
            self._feats = []
            probs = self.attached_classifier()(x0).float().softmax(-1)
            self._feats = []
            query_logits = self.attached_classifier()(query)  # and the query's features at the preserved layers
            ref, self._feats = self._feats, []
        source = batch["orig_pred"] if "orig_pred" in batch else query_logits.argmax(-1)
        self._chunk.update(
            ref_feats=[r.detach() for r in ref],
            x0=x0,
            psnr=psnr(x0, query),
            fit_steps=fit_steps,
            prior_target_prob=probs.gather(1, batch["target"][:, None]).squeeze(1),
            source=source,
        )
        return latents

    def _fit(self, latents: dict[str, Tensor], query: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Fit the prior to the query: masked Adam on ``||x' - x||^2`` until ``fit_psnr`` (per image)."""
        with torch.enable_grad():
            latents = {k: v.detach().requires_grad_(True) for k, v in latents.items()}
            moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in latents.items()}
            n = len(query)
            active = torch.ones(n, dtype=torch.bool, device=query.device)
            used = torch.full((n,), self.fit_steps, dtype=torch.long, device=query.device)
            t = torch.zeros(n, device=query.device)
            for step in range(self.fit_steps):
                x = self.prior.render(self._params(latents))
                err = per_image_sum((x - query).square())
                done = active & (psnr(x.detach(), query) >= self.fit_psnr)
                used = torch.where(done, torch.full_like(used, step), used)
                active = active & ~done
                if not active.any():
                    break
                grads = torch.autograd.grad(err.sum(), list(latents.values()))
                t = t + active.float()
                masked_adam_update(latents, grads, moments, t, active, self.fit_lr, self.betas)
        return {k: v.detach() for k, v in latents.items()}, used

    def render(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        self._feats = []  # the classifier's forward on this image fills them again
        return self.prior.render(self._params(latents))

    def project(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        if self.prior_name == "pixels":
            latents["x"].clamp_(0, 1)

    def target_reached(self, target_prob: Tensor) -> Tensor:
        if self.stage_rule == "steps":
            return super().target_reached(target_prob)  # stop_probability (None: never)
        return target_prob >= self._threshold

    # ----------------------------------------------------------------- engine
    @staticmethod
    def _snapshot(latents: dict[str, Tensor], moments: dict[str, tuple[Tensor, Tensor]], t: Tensor) -> tuple:
        return (
            {k: v.detach().clone() for k, v in latents.items()},
            {k: (m.clone(), v.clone()) for k, (m, v) in moments.items()},
            t.clone(),
        )

    @staticmethod
    @torch.no_grad()
    def _restore(latents: dict[str, Tensor], moments: dict[str, tuple[Tensor, Tensor]], saved: tuple, rows: Tensor) -> None:
        """Put the latents and Adam moments of the images ``rows`` back to ``saved``."""
        for k, v in latents.items():
            keep = rows.view(-1, *[1] * (v.dim() - 1))
            v.copy_(torch.where(keep, saved[0][k], v))
            for cur, old in zip(moments[k], saved[1][k]):
                cur.copy_(torch.where(keep, old, cur))

    def declared_outputs(self) -> tuple[str, ...]:
        prior = ("prior_psnr", "prior_fit_steps", "prior_target_prob", "prior_image")
        return prior + (("stages", "stage_target_prob", "stage_steps") if self.progressive else ())

    def optimise(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit the prior, then run the stages; see the module docstring."""
        self.check_ready()
        target = batch["target"]
        thresholds = self.stages if self.progressive else [self.stages[-1]]
        budget = self.steps if self.progressive else self.steps * len(self.stages)
        by_steps = self.stage_rule == "steps"
        stage_images, stage_probs, stage_steps = [], [], []
        with torch.enable_grad():
            latents, moments = self.new_latents(batch)
            t = torch.zeros(len(target), device=target.device)
            total_steps = torch.zeros_like(target)
            alive = torch.ones(len(target), dtype=torch.bool, device=target.device)
            # the start (the fitted prior, rendered by init_latents): what a failed first stage keeps
            x_prev, p_prev = self._chunk["x0"], self._chunk["prior_target_prob"]
            for threshold in thresholds:
                self._threshold = threshold
                self._soft_target = threshold if by_steps else 1.0
                if self.progressive and not by_steps:  # a failed stage reverts to the last stage's state
                    saved = self._snapshot(latents, moments, t)
                used, t = self.descend(latents, moments, t, batch, budget, active=alive)
                with torch.no_grad():
                    x = self.render(latents, batch).detach()
                    p = self.attached_classifier()(x).float().softmax(-1).gather(1, target[:, None]).squeeze(1)
                    if by_steps:  # an image that reached stop_probability stays stopped
                        alive = alive & ~self.target_reached(p)
                    elif self.progressive:
                        failed = alive & (p < threshold)
                        if failed.any():
                            self._restore(latents, moments, saved, failed)
                            t = torch.where(failed, saved[2], t)
                            x = torch.where(failed.view(-1, 1, 1, 1), x_prev, x)
                            p = torch.where(failed, p_prev, p)
                        alive = alive & ~failed
                        x_prev, p_prev = x, p
                total_steps = total_steps + used
                stage_images.append(x.clamp(0, 1))
                stage_probs.append(p)
                stage_steps.append(used)
            self._threshold, self._soft_target = self.stages[-1], 1.0
            self._feats = []
        x_cf = stage_images[-1]
        with torch.no_grad():
            probs = self.attached_classifier()(x_cf).float().softmax(-1)
            self._feats = []
        out = {
            "counterfactual": x_cf,
            "final_probs": probs,
            "steps": total_steps,
            "prior_psnr": self._chunk["psnr"],
            "prior_fit_steps": self._chunk["fit_steps"],
            "prior_target_prob": self._chunk["prior_target_prob"],
            "prior_image": self._chunk["x0"].clamp(0, 1),
        }
        if self.progressive:
            out["stages"] = torch.stack(stage_images, 1)
            out["stage_target_prob"] = torch.stack(stage_probs, 1)
            out["stage_steps"] = torch.stack(stage_steps, 1)
        return out


def soft_cross_entropy(logits: Tensor, target: Tensor, source: Tensor, share: float) -> Tensor:
    """Per-image cross-entropy to the soft label ``share`` on ``target``, ``1 - share`` on ``source``.

    Where ``source == target`` the label is the one-hot target.
    """
    log_p = logits.float().log_softmax(-1)
    on_target = log_p.gather(1, target[:, None]).squeeze(1)
    on_source = log_p.gather(1, source.long()[:, None]).squeeze(1)
    same = source.long() == target
    return torch.where(same, -on_target, -(share * on_target + (1 - share) * on_source))


__all__ = ["DISCCounterfactual", "soft_cross_entropy"]
