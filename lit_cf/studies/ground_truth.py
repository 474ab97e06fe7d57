"""Ground truth for counterfactual attributions: does the explanation find the planted shortcut?

``lit-cf study --config configs/study/ground_truth.yaml`` (measured numbers and the reasons
for the defaults: ``docs/results/ground_truth.md``).

On the built-in rendered digits (known factors), with a planted shortcut in training (the
corner mark is on iff the digit is the ``shortcut_class``, 7 by default; "7" below means that
class, also in the names of the diagnostics), the study

1. trains a *shortcut* classifier (``configs/data/rendered_shortcut.yaml`` + ``model/cnn.yaml``),
   a *clean* classifier (the same CNN on ``configs/data/rendered.yaml``), a factor regressor
   (``model/factor_regressor.yaml``: the 7 known factors from an image) and LatentAttack's
   generator (``model/autoencoder.yaml`` with ``ae_output``, or ``generator: vae``); regressor and
   generator see auxiliary data in which the mark is on for ``aux_mark_rate`` of the images, so
   both can read / draw it;
2. explains non-7 clean test digits towards 7 with every method of ``methods`` (pixel,
   latent_attack and disc by default; the diffusion methods dvce, fastdime and ace on request),
   for both classifiers; the diffusion methods use a DDPM (``diffusion_config``) trained on the
   generator's auxiliary data, so it can draw the mark on any digit, or a given ``diffusion``
   checkpoint;
3. ranks the known factors by their global attribution score, the mean over successful
   counterfactuals of ``P_j(after) - P_j(before)`` (:func:`lit_cf.attribution.attribute_run`, 95%
   bootstrap intervals), per method, classifier and source, and gives a verdict per method
   (:func:`verdict`): PASS when ``mark`` ranks first with a positive score for the shortcut
   classifier and does not rank first for the clean one. The study passes when every method
   passes on its verdict source: ``image`` for pixel, ``disc_source`` (``recon``) for DISC,
   ``latent_source`` (``recon``) for LatentAttack, ``image`` for the diffusion methods (they
   start from the query itself); the other sources are informative.

Attribution sources (the ``source`` column):

* ``image``: the factor regressor on the query and on the counterfactual (every method; what
  ``lit-cf evaluate --descriptors`` reads). For a latent method it includes the generator's
  reconstruction error, reported as the reconstruction shift ``R(decode(z0)) - R(query)``.
* ``recon``: the factor regressor on the method's start image (``decode(z0)`` for LatentAttack,
  the fitted prior's image for DISC) and on the counterfactual: the edit the method made.
* ``latent`` (latent methods): linear predictors of the factors fitted on the autoencoder's
  codes (ridge; logistic for the mark), applied to the saved start and final codes: the
  paper's own attribution.

Method settings that differ from the methods' own defaults, each a setting here: LatentAttack
``latent_loss`` (``log_prob``; the paper's ``prob`` stalls on confident classifiers),
``latent_pixel_weight`` (1.5, an L2 term ``||x' - decode(z0)||^2``; the paper has none),
``latent_original`` (``reconstruction``, the paper's), ``ae_output`` (``identity``: a sigmoid
saturates on the empty corner); DISC without a DUQ model (``duq: null``, ``mc_weight: 0``: these
classifiers are plain CNNs), the INR prior, 50 steps per stage, 200 prior-fit steps and
``l2_weight`` 1.0 (``disc_args`` adds to or overrides these; the old script used 5, with which
the shipped staged DISC reaches the target for about 1 in 5 queries at full scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

from lit_cf.errors import UserError
from lit_cf.studies.core import (
    CONFIG_ROOT,
    ModelSpec,
    Study,
    StudyContext,
    StudyResult,
    register_study,
    require_positive,
    resolve_config,
)

__all__ = [
    "CLASSIFIERS",
    "DIFFUSION_METHODS",
    "KNOWN_METHODS",
    "SHORTCUT",
    "GroundTruthStudy",
    "fmt_rank",
    "mark_rank",
    "non_target_indices",
    "overall_verdict",
    "parse_methods",
    "rankings_of",
    "verdict",
]

KNOWN_METHODS = ("pixel", "latent_attack", "disc", "dvce", "fastdime", "ace")
DIFFUSION_METHODS = ("dvce", "fastdime", "ace")
DEFAULT_METHODS = ("pixel", "latent_attack", "disc")
CLASSIFIERS = ("shortcut", "clean")
SHORTCUT = "mark"
SOURCES = ("image", "recon", "latent")


def parse_methods(values: tuple[str, ...] | list[str]) -> list[str]:
    """Method names normalised (``latent`` -> ``latent_attack``, ``-`` -> ``_``), checked, deduplicated."""
    methods: list[str] = []
    for value in values:
        for m in str(value).replace(",", " ").split():
            m = m.strip().lower().replace("-", "_")
            if m == "latent":
                m = "latent_attack"
            if m not in KNOWN_METHODS:
                raise UserError(f"unknown method {m!r} in methods; choose from {list(KNOWN_METHODS)}")
            if m not in methods:
                methods.append(m)
    if not methods:
        raise UserError("methods needs at least one method")
    return methods


# ----------------------------------------------------------------------------- diagnostics
def classifier_diagnostics(ckpt: Path, test_size: int, target: int) -> dict[str, float]:
    """Accuracy on the clean and the shortcut test split, and the effect of stamping the mark."""
    import torch

    from lit_cf.data.rendered import FACTOR_NAMES, RenderedDigits, RenderedDigitsDataModule, render_digits
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    model = load_module(ckpt, ImageClassifier).eval()
    dm = RenderedDigitsDataModule(test_size=test_size, shortcut_class=target, shortcut_strength=1.0)
    out: dict[str, float] = {}
    with torch.no_grad():
        for split in ("test", "test_shortcut"):
            data = cast(RenderedDigits, dm.dataset(split))
            pred = torch.cat([model(data.images[i : i + 500]).argmax(-1) for i in range(0, len(data), 500)])
            out[f"accuracy_{split}"] = float((pred == data.labels).float().mean())
        data = cast(RenderedDigits, dm.dataset("test"))
        mark = list(FACTOR_NAMES).index(SHORTCUT)
        keep = (data.labels != target) & (data.factors[:, mark] < 0.5)  # non-target digits without the mark
        factors = data.factors[keep].clone()
        factors[:, mark] = 1.0
        stamped = render_digits(data.labels[keep], factors)
        p_before = model(data.images[keep]).softmax(-1)
        p_after = model(stamped).softmax(-1)
    out["mark_makes_7_rate"] = float((p_after.argmax(-1) == target).float().mean())
    out["p7_without_mark"] = float(p_before[:, target].mean())
    out["p7_with_mark"] = float(p_after[:, target].mean())
    return out


def regressor_quality(regressor: Any, test_size: int) -> dict[str, float]:
    """Held-out R^2 (continuous factors) / accuracy (mark) of the image factor regressor."""
    import torch

    from lit_cf.attribution import descriptor_targets
    from lit_cf.data.rendered import RenderedDigits

    data = RenderedDigits(test_size, split="test", mark_rate=0.5)
    y = descriptor_targets(data)
    with torch.no_grad():
        pred = torch.cat([regressor.predict_descriptors(data.images[i : i + 500]) for i in range(0, len(data), 500)])
    out = {}
    for j, (name, kind) in enumerate(zip(y.names, y.kinds)):
        if kind == "binary":
            out[name] = float(((pred[:, j] > 0.5) == (y.values[:, j] > 0.5)).float().mean())
        else:
            sst = (y.values[:, j] - y.values[:, j].mean()).square().sum()
            out[name] = float(1 - (y.values[:, j] - pred[:, j]).square().sum() / sst)
    return out


def fit_latent_predictors(ae: Any, n: int, aux_mark_rate: float, seed: int) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Linear factor predictors on the autoencoder's codes of auxiliary data; held-out quality."""
    import torch

    from lit_cf.attribution import descriptor_targets, encode_dataset, fit_linear_predictors
    from lit_cf.data.rendered import RenderedDigits

    train = RenderedDigits(n, split="train", mark_rate=aux_mark_rate, seed=seed + 1000)
    test = RenderedDigits(max(n // 4, 200), split="test", mark_rate=aux_mark_rate, seed=seed + 1000)
    y_train, y_test = descriptor_targets(train), descriptor_targets(test)
    codes_train, codes_test = encode_dataset(ae, train), encode_dataset(ae, test)
    pred = fit_linear_predictors(codes_train, y_train.values, y_train.kinds, y_train.names, l2=1e-2)
    with torch.no_grad():
        recon = torch.cat([ae.decode(codes_test[i : i + 500]) for i in range(0, len(test), 500)])
    err = (recon - test.images).square()
    ae_stats = {"recon_mse": float(err.mean()), "recon_mse_mark_corner": float(err[..., :3, :3].mean())}
    return pred, pred.quality(codes_test, y_test.values), ae_stats


def non_target_indices(test_size: int, n: int, target: int) -> list[int]:
    """The first ``n`` test indices whose label is not ``target`` (the queries)."""
    from lit_cf.data.rendered import RenderedDigits, RenderedDigitsDataModule

    labels = cast(RenderedDigits, RenderedDigitsDataModule(test_size=test_size).dataset("test")).labels
    idx = (labels != target).nonzero().flatten().tolist()
    if len(idx) < n:
        raise UserError(
            f"only {len(idx)} non-{target} digits among {test_size} test images: raise test_size or lower num_queries"
        )
    return [int(i) for i in idx[:n]]


def mark_path(ae: Any, latent_pred: Any, shortcut: Path, test_size: int, target: int, n: int = 64) -> dict[str, Any]:
    """How the generator draws the mark along its latent mark direction.

    From the codes ``z0`` of ``n`` non-target test digits, step ``alpha`` along the unit direction
    of the latent mark predictor and record the mean corner brightness of ``decode(z0 + alpha m)``
    and the shortcut classifier's mean p(target) on it, next to ``|z0|`` and the latent distance
    between a digit's code and the code of the same digit with the mark stamped on. A mark that
    appears only after a long step, with p(target) flat or falling on the way, cannot be found by
    a local (gradient) attack on this generator.
    """
    import torch

    from lit_cf.data.rendered import MARK_SIZE, RenderedDigits
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    clf = load_module(shortcut, ImageClassifier).eval()
    data = RenderedDigits(test_size, split="test")
    x = data.images[torch.tensor(non_target_indices(test_size, n, target))]  # a copy (advanced indexing)
    x[..., :MARK_SIZE, :MARK_SIZE] = 0.0  # test digits carry the mark at the clean rate: start without it
    z0 = ae.encode(x)
    m = latent_pred.direction(SHORTCUT).float()
    m = (m / m.norm()).view(1, *z0.shape[1:])
    stamped = x.clone()
    stamped[..., :MARK_SIZE, :MARK_SIZE] = 1.0
    out: dict[str, Any] = {
        "code_norm": float(z0.flatten(1).norm(dim=1).mean()),
        "stamp_distance": float((ae.encode(stamped) - z0).flatten(1).norm(dim=1).mean()),
        "alpha": [],
        "corner": [],
        "p7": [],
    }
    for frac in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        alpha = frac * out["code_norm"]
        xa = ae.decode(z0 + alpha * m)
        out["alpha"].append(round(alpha, 2))
        out["corner"].append(float(xa[..., :MARK_SIZE, :MARK_SIZE].mean()))
        out["p7"].append(float(clf(xa).softmax(-1)[:, target].mean()))
    return out


# ----------------------------------------------------------------------------- attribution
def rankings_of(
    run: Any,
    regressor: Any,
    ae: Any,
    latent_pred: Any,
    n_boot: int,
    seed: int,
    target: int,
    start_image: str | None = None,
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """``({source: ranking}, reconstruction shift)`` for one run; ranking rows ``(name, score, lo, hi)``.

    ``ae`` (and ``latent_pred``) only for runs of a latent method on that autoencoder;
    ``start_image``: the saved tensor a method without a latent starts from (DISC's
    ``prior_image``), its ``recon`` source. The reconstruction shift is the mean over the
    attributed counterfactuals of ``R(start) - R(query)`` per factor (``R``: the factor
    regressor): the part of the ``image`` score the reconstruction error contributes, before
    any step of the method (``image`` = shift + ``recon``). A source without any successful
    counterfactual holds the error message instead of a ranking.
    """
    from lit_cf.attribution import attribute_run

    def ranked(res: dict[str, Any]) -> Any:
        return res["per_class"].get(target, res["global"])

    out: dict[str, Any] = {}
    try:
        res_image = attribute_run(run, regressor, inputs="image", n_boot=n_boot, seed=seed, k=3)
    except UserError as err:  # e.g. no successful counterfactual
        return {"image": str(err)}, None
    out["image"] = ranked(res_image)
    res_recon = None
    if start_image is not None:
        res_recon = attribute_run(run, regressor, inputs="image", n_boot=n_boot, seed=seed, k=3, before=start_image)
    elif ae is not None:

        def recon_fn(z: Any) -> Any:
            return regressor.predict_descriptors(ae.decode(z).clamp(0, 1))

        res_recon = attribute_run(run, recon_fn, names=list(regressor.names), inputs="latent", n_boot=n_boot, seed=seed, k=3)
        if latent_pred is not None:
            out["latent"] = ranked(attribute_run(run, latent_pred, inputs="latent", n_boot=n_boot, seed=seed, k=3))
    shift = None
    if res_recon is not None:
        out["recon"] = ranked(res_recon)
        mean = (res_recon["desc_query"] - res_image["desc_query"]).mean(0)
        shift = {n: float(v) for n, v in zip(regressor.names, mean)}
    return out, shift


def verdict(shortcut: Any, clean: Any, factor: str = SHORTCUT) -> dict[str, Any]:
    """The ground-truth rule on two rankings (rows ``(name, score, lo, hi)``, or an error string).

    PASS when ``factor`` ranks first with a positive score for the shortcut classifier and does
    not rank first for the clean classifier. ``ci_separated``: the lower end of the factor's
    interval lies above every other factor's ``|score|`` (informative).
    """
    if isinstance(shortcut, str) or isinstance(clean, str):
        return {"pass": False, "why": "no ranking (no successful counterfactuals)"}
    first_s, first_c = shortcut[0], clean[0]
    ok_s = first_s[0] == factor and first_s[1] > 0
    ok_c = first_c[0] != factor
    why = []
    if not ok_s:
        why.append(f"shortcut classifier: {first_s[0]} ({first_s[1]:+.3f}) ranks first, not +{factor}")
    if not ok_c:
        why.append(f"clean classifier: {factor} ranks first ({first_c[1]:+.3f})")
    mark_s = next(r for r in shortcut if r[0] == factor)
    return {
        "pass": ok_s and ok_c,
        "shortcut_ok": ok_s,
        "clean_ok": ok_c,
        "ci_separated": ok_s and len(shortcut) > 1 and mark_s[2] > abs(shortcut[1][1]),
        "why": "; ".join(why),
    }


def overall_verdict(results: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """``(pass, lines)`` over methods: each must pass on its primary source (the others are informative)."""
    overall = True
    lines = []
    for method, res in results.items():
        if res["primary_source"] not in res["verdicts"]:
            overall = False
            lines.append(f"FAIL {method}: no {res['primary_source']} attribution for both classifiers")
        for source, v in res["verdicts"].items():
            primary = source == res["primary_source"]
            overall &= bool(v["pass"]) or not primary
            tag = "PASS" if v["pass"] else "FAIL"
            note = "" if v["pass"] else f": {v['why']}"
            lines.append(f"{tag} {method} ({source}{'' if primary else ', informative'}){note}")
    return overall, lines


def fmt_rank(ranking: Any, k: int = 3) -> str:
    """The first ``k`` rows of a ranking as ``name score [lo,hi] | ...``."""
    if isinstance(ranking, str):
        return ranking
    return " | ".join(f"{n} {s:+.3f} [{lo:+.3f},{hi:+.3f}]" for n, s, lo, hi in ranking[:k])


def mark_rank(ranking: Any, factor: str = SHORTCUT) -> tuple[int, float] | tuple[None, None]:
    """``(rank, score)`` of ``factor`` in a ranking (1-based), or ``(None, None)``."""
    if isinstance(ranking, str):
        return None, None
    for i, (n, s, *_) in enumerate(ranking):
        if n == factor:
            return i + 1, float(s)
    return None, None


def ranking_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One table row per method, source and classifier."""
    rows = []
    for method, res in results.items():
        for source in SOURCES:
            for clf in CLASSIFIERS:
                r = res["classifiers"][clf]
                if source not in r["rankings"]:
                    continue
                rank, score = mark_rank(r["rankings"][source])
                rows.append(
                    {
                        "method": method,
                        "source": source + ("" if source == res["primary_source"] else " (info)"),
                        "classifier": clf,
                        "n": r["n"],
                        "success": round(r["success_rate"], 3),
                        "steps": f"{r['steps_mean']:.0f}",
                        "mark rank": rank if rank else "-",
                        "mark score": score if score is not None else math.nan,
                        "top 3": fmt_rank(r["rankings"][source]),
                    }
                )
    return rows


# ----------------------------------------------------------------------------- the study
@register_study
class GroundTruthStudy(Study):
    """Ground truth: does a counterfactual explanation find the planted shortcut (mark <=> 7)?

    Args:
        train_size: Training images of every model.
        test_size: Test split size (the queries come from it).
        epochs: Epochs of the classifiers.
        ae_epochs: Epochs of the generator (default: epochs).
        regressor_epochs: Epochs of the factor regressor (default: epochs).
        num_queries: Non-7 test digits explained per method and classifier.
        methods: Methods among pixel, latent_attack, disc, dvce, fastdime, ace.
        seed: Seed of every model, explain run and bootstrap.
        shortcut_class: The class that carries the mark in the shortcut training data, and the target.
        aux_mark_rate: Mark rate of the regressor's and the generator's training data.
        pixel_steps: Steps of the pixel method.
        pixel_lr: Learning rate of the pixel method.
        pixel_l1: L1 weight of the pixel method (sparse edits).
        pixel_stop: Stop probability of the pixel method.
        latent_steps: LatentAttack steps (paper, MNIST: 1,000).
        latent_lr: LatentAttack Adam lr (paper, MNIST: 0.1).
        latent_threshold: LatentAttack threshold tau (paper: 0.75).
        latent_loss: LatentAttack loss: log_prob (no vanishing gradient on confident classifiers) or the paper's prob.
        latent_pixel_weight: LatentAttack's pixel proximity weight ||x' - x_ref||^2 (0: off, as in the paper).
        latent_original: LatentAttack's original_prediction (and x_ref of the pixel term); the paper: reconstruction.
        latent_source: The attribution LatentAttack's verdict reads (all three are reported).
        disc_source: The attribution DISC's verdict reads: the edit from its fitted prior's image, or from the query.
        generator: LatentAttack's generator: model/autoencoder.yaml (64-d) or model/vae.yaml (16-d).
        ae_output: The autoencoder's output activation, sigmoid or identity (default identity; the VAE is always sigmoid).
        disc_args: Extra explain arguments for DISC (dotted keys), added after the study's own
            (duq null, mc_weight 0, prior inr, steps 50, fit_steps 200, l2_weight 1.0), e.g.
            ``{model.init_args.prior: dip}``.
        diffusion: A DDPM checkpoint of 28x28 rendered digits for dvce / fastdime / ace (default:
            train ``diffusion_config`` on the auxiliary data, mark at ``aux_mark_rate``).
        diffusion_config: The DDPM model config the study trains when ``diffusion`` is not given.
        diffusion_epochs: Epochs of that DDPM (default: epochs).
        diffusion_args: Extra explain arguments of the diffusion methods (dotted keys), per method
            name, e.g. ``{dvce: {model.init_args.num_steps: 50}}``.
        n_boot: Bootstrap resamples of the intervals.
        accelerator: Trainer accelerator of every step.
        threads: Torch intra-op CPU threads (default: torch's choice; on a busy machine 1 is often fastest).
    """

    name = "ground_truth"

    def __init__(
        self,
        train_size: int = 20000,
        test_size: int = 2000,
        epochs: int = 5,
        ae_epochs: int | None = None,
        regressor_epochs: int | None = None,
        num_queries: int = 200,
        methods: tuple[str, ...] = DEFAULT_METHODS,
        seed: int = 0,
        shortcut_class: int = 7,
        aux_mark_rate: float = 0.5,
        pixel_steps: int = 300,
        pixel_lr: float = 0.01,
        pixel_l1: float = 0.4,
        pixel_stop: float = 0.5,
        latent_steps: int = 1000,
        latent_lr: float = 0.1,
        latent_threshold: float = 0.75,
        latent_loss: Literal["prob", "log_prob"] = "log_prob",
        latent_pixel_weight: float = 1.5,
        latent_original: Literal["query", "reconstruction"] = "reconstruction",
        latent_source: Literal["recon", "latent", "image"] = "recon",
        disc_source: Literal["recon", "image"] = "recon",
        generator: Literal["autoencoder", "vae"] = "autoencoder",
        ae_output: str | None = None,
        disc_args: dict[str, Any] | None = None,
        diffusion: str | None = None,
        diffusion_config: str = "model/ddpm_mnist.yaml",
        diffusion_epochs: int | None = None,
        diffusion_args: dict[str, dict[str, Any]] | None = None,
        n_boot: int = 1000,
        accelerator: str = "auto",
        threads: int | None = None,
    ) -> None:
        require_positive(train_size=train_size, test_size=test_size, epochs=epochs, num_queries=num_queries)
        optional = (("ae_epochs", ae_epochs), ("regressor_epochs", regressor_epochs), ("diffusion_epochs", diffusion_epochs))
        for key, opt in (*optional, ("threads", threads)):
            if opt is not None and opt < 1:
                raise UserError(f"{key} must be >= 1 (or null), got {opt}")
        if not 0 <= shortcut_class <= 9:
            raise UserError(f"shortcut_class must be a digit 0..9, got {shortcut_class}")
        if latent_pixel_weight < 0:
            raise UserError("latent_pixel_weight must be >= 0")
        if n_boot < 1:
            raise UserError("n_boot must be >= 1")
        self.methods = parse_methods(methods)
        missing = [m for m in self.methods if not (CONFIG_ROOT / "explain" / f"{m}.yaml").is_file()]
        if missing:
            raise UserError(f"no explain config for {missing} under {CONFIG_ROOT / 'explain'}")
        if ae_output is None:
            ae_output = "identity" if generator == "autoencoder" else "sigmoid"
        if generator == "vae" and ae_output != "sigmoid":
            raise UserError(f"ae_output {ae_output} needs generator autoencoder (the VAE's Bernoulli likelihood needs a sigmoid)")
        from lit_cf.models.autoencoder import OUTPUT_ACTIVATIONS

        if ae_output not in OUTPUT_ACTIVATIONS:
            raise UserError(f"ae_output must be one of {list(OUTPUT_ACTIVATIONS)}, got {ae_output!r}")
        self.train_size, self.test_size, self.epochs = train_size, test_size, epochs
        self.ae_epochs, self.regressor_epochs, self.num_queries = ae_epochs, regressor_epochs, num_queries
        self.seed, self.target, self.aux_mark_rate = seed, shortcut_class, aux_mark_rate
        self.pixel = {"steps": pixel_steps, "lr": pixel_lr, "l1_weight": pixel_l1, "stop_probability": pixel_stop}
        self.latent = {
            "steps": latent_steps,
            "lr": latent_lr,
            "threshold": latent_threshold,
            "loss": latent_loss,
            "pixel_weight": latent_pixel_weight,
            "original_prediction": latent_original,
        }
        self.latent_source, self.disc_source = latent_source, disc_source
        self.generator, self.ae_output = generator, ae_output
        self.disc_args = dict(disc_args or {})
        self.diffusion_args = {str(m): dict(v or {}) for m, v in (diffusion_args or {}).items()}
        unknown = sorted(set(self.diffusion_args) - set(DIFFUSION_METHODS))
        if unknown:
            raise UserError(f"diffusion_args has keys {unknown}; use the method names {list(DIFFUSION_METHODS)}")
        self.diffusion, self.diffusion_config, self.diffusion_epochs = None, diffusion_config, diffusion_epochs
        if any(m in DIFFUSION_METHODS for m in self.methods):
            if diffusion is not None:
                self.diffusion = Path(diffusion).expanduser().resolve()
                if not self.diffusion.is_file():
                    raise UserError(f"diffusion: no DDPM checkpoint at {self.diffusion}; train one or leave it null")
            else:
                try:
                    resolve_config(diffusion_config)
                except UserError as err:
                    raise UserError(f"diffusion_config: {err}") from None
        self.n_boot, self.accelerator, self.threads = n_boot, accelerator, threads

    # ------------------------------------------------------------------ models
    def model_specs(self) -> dict[str, ModelSpec]:
        """The models the study trains (keyed by their config: reused when unchanged)."""
        sizes = {
            "seed_everything": self.seed,
            "data.init_args.train_size": self.train_size,
            "data.init_args.test_size": self.test_size,
            "data.init_args.val_size": min(2000, max(100, self.train_size // 10)),
        }
        aux = {"data.init_args.mark_rate": self.aux_mark_rate}
        cnn = ("data/rendered.yaml", "model/cnn.yaml")
        specs = {
            "shortcut": ModelSpec(
                "shortcut",
                ("data/rendered_shortcut.yaml", "model/cnn.yaml"),
                {**sizes, "data.init_args.shortcut_class": self.target, "trainer.max_epochs": self.epochs},
            ),
            "clean": ModelSpec("clean", cnn, {**sizes, "trainer.max_epochs": self.epochs}),
            "regressor": ModelSpec(
                "regressor",
                ("data/rendered.yaml", "model/factor_regressor.yaml"),
                {**sizes, **aux, "trainer.max_epochs": self.regressor_epochs or self.epochs},
            ),
        }
        if "latent_attack" in self.methods:
            # stored as "autoencoder" whichever generator it is (a VAE encodes to its posterior mean)
            gen = {"model.init_args.output_activation": self.ae_output} if self.generator == "autoencoder" else {}
            specs["autoencoder"] = ModelSpec(
                "autoencoder",
                ("data/rendered.yaml", f"model/{self.generator}.yaml"),
                {**sizes, **aux, **gen, "trainer.max_epochs": self.ae_epochs or self.epochs},
            )
        if self.diffusion is None and any(m in DIFFUSION_METHODS for m in self.methods):
            specs["diffusion"] = ModelSpec(
                "diffusion",
                ("data/rendered.yaml", self.diffusion_config),
                {**sizes, **aux, "trainer.max_epochs": self.diffusion_epochs or self.epochs},
            )
        return specs

    def method_args(self, method: str, ckpt: Mapping[str, Path]) -> dict[str, Any]:
        """Explain arguments of ``method`` (on top of ``configs/explain/<method>.yaml``)."""
        if method == "pixel":
            return {f"model.init_args.{k}": v for k, v in self.pixel.items()}
        if method == "latent_attack":
            return {
                "model.init_args.generator": ckpt["autoencoder"],
                **{f"model.init_args.{k}": v for k, v in self.latent.items()},
            }
        if method in DIFFUSION_METHODS:
            return {"model.init_args.diffusion": ckpt["diffusion"], **self.diffusion_args.get(method, {})}
        # our classifiers are plain CNNs: DISC's manifold-consistency term (a DUQ model) is off
        # unless disc_args switches it on (later keys override earlier ones)
        base = {
            "model.init_args.duq": None,
            "model.init_args.mc_weight": 0,
            "model.init_args.prior": "inr",
            "model.init_args.steps": 50,
            "model.init_args.fit_steps": 200,
            "model.init_args.l2_weight": 1.0,  # the script had 5; see docs/results/ground_truth.md
        }
        return {**base, **self.disc_args}

    # ------------------------------------------------------------------ run
    def run(self, ctx: StudyContext) -> StudyResult:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        target = self.target
        indices = non_target_indices(self.test_size, self.num_queries, target)
        specs = self.model_specs()
        ckpt = {name: ctx.fit(spec) for name, spec in specs.items()}
        keys = {name: spec.key() for name, spec in specs.items()}
        if self.diffusion is not None:
            ckpt["diffusion"] = self.diffusion
        loaded: dict[str, Any] = {}

        def regressor() -> Any:
            if "regressor" not in loaded:
                from lit_cf.models import DescriptorPredictor
                from lit_cf.utils.checkpoint import load_module

                loaded["regressor"] = load_module(ckpt["regressor"], DescriptorPredictor).eval()
            return loaded["regressor"]

        def latent() -> tuple[Any, Any, dict[str, float], dict[str, float]]:
            """The generator and its latent factor predictors (fitted once, on demand)."""
            if "latent" not in loaded:
                import lightning as L

                from lit_cf.utils.checkpoint import load_module

                ae = load_module(ckpt["autoencoder"], L.LightningModule).eval()
                with torch.no_grad():
                    pred, quality, stats = fit_latent_predictors(ae, min(self.train_size, 5000), self.aux_mark_rate, self.seed)
                (ctx.out / "cache").mkdir(parents=True, exist_ok=True)
                pred.save(ctx.out / "cache" / "latent_predictors.safetensors")
                loaded["latent"] = (ae, pred, quality, stats)
            return cast(tuple[Any, Any, dict[str, float], dict[str, float]], loaded["latent"])

        def diagnostics() -> dict[str, Any]:
            out: dict[str, Any] = {c: classifier_diagnostics(ckpt[c], self.test_size, target) for c in CLASSIFIERS}
            out["regressor_quality"] = regressor_quality(regressor(), self.test_size)
            if "autoencoder" in ckpt:
                ae, pred, quality, stats = latent()
                out["latent_predictor_quality"] = quality
                out["autoencoder"] = stats
                with torch.no_grad():
                    out["mark_path"] = mark_path(ae, pred, ckpt["shortcut"], self.test_size, target)
            return out

        diag_key = {"models": keys, "test_size": self.test_size, "target": target, "aux": self.aux_mark_rate, "seed": self.seed}
        diag: dict[str, Any] = ctx.cached("diagnostics", {**diag_key, "n_latent": min(self.train_size, 5000)}, diagnostics)

        explain_common = {
            "data.init_args.test_size": self.test_size,
            "indices": indices,
            "target": target,
            "on_source_equals_target": "skip",
            "chunk_size": 256,
            "seed": self.seed,
        }
        results: dict[str, Any] = {}
        for method in self.methods:
            runs = {}
            for clf in CLASSIFIERS:
                runs[clf] = ctx.explain(
                    f"{clf}-{method}",
                    ("data/rendered.yaml", f"explain/{method}.yaml"),
                    {**self.method_args(method, ckpt), "classifier": ckpt[clf], **explain_common},
                )

            def attribute(method: str = method, runs: dict[str, Path] = runs) -> dict[str, Any]:
                from lit_cf.runs import ExplainRun

                per_clf = {}
                for clf, path in runs.items():
                    run = ExplainRun(path)
                    rows = run.manifest
                    steps = [r["steps"] for r in rows]
                    is_latent = method == "latent_attack"
                    ae, pred = (latent()[:2]) if is_latent else (None, None)
                    start = "prior_image" if method == "disc" else None
                    with torch.no_grad():
                        ranks, shift = rankings_of(run, regressor(), ae, pred, self.n_boot, self.seed, target, start)
                    per_clf[clf] = {
                        "run": str(path),
                        "n": len(rows),
                        "success_rate": sum(bool(r["success"]) for r in rows) / max(len(rows), 1),
                        "steps_mean": sum(steps) / max(len(steps), 1),
                        "rankings": ranks,
                        "reconstruction_shift": shift,
                    }
                return per_clf

            attr_key = {**diag_key, "method": method, "runs": {c: str(p) for c, p in runs.items()}, "n_boot": self.n_boot}
            per_clf = ctx.cached(f"attribution-{method}", attr_key, attribute)
            sources = [s for s in SOURCES if all(s in per_clf[c]["rankings"] for c in CLASSIFIERS)]
            verdicts = {s: verdict(per_clf["shortcut"]["rankings"][s], per_clf["clean"]["rankings"][s]) for s in sources}
            primary = {"latent_attack": self.latent_source, "disc": self.disc_source}.get(method, "image")
            results[method] = {"classifiers": per_clf, "verdicts": verdicts, "primary_source": primary}

        overall, verdict_lines = overall_verdict(results)
        notes = diagnostic_lines(diag, target) + shift_lines(results) + verdict_lines
        on = ", ".join(f"{m} {r['primary_source']}" for m, r in results.items())
        notes.append(f"ground_truth: {'PASS' if overall else 'FAIL'} (verdict on each method's own attribution: {on})")
        failing = [
            f"{m}: {r['verdicts'].get(r['primary_source'], {}).get('why') or 'no ' + r['primary_source'] + ' attribution'}"
            for m, r in results.items()
            if not r["verdicts"].get(r["primary_source"], {}).get("pass")
        ]
        why = (
            f"+{SHORTCUT} ranks first for the shortcut classifier and not for the clean one, for every method ({on})"
            if overall
            else "; ".join(failing)
        )
        return StudyResult(
            rows=ranking_rows(results),
            verdict={
                "pass": overall,
                "why": why,
                "target": target,
                "shortcut_factor": SHORTCUT,
                "methods": {m: {"primary_source": r["primary_source"], "verdicts": r["verdicts"]} for m, r in results.items()},
            },
            passed=overall,
            notes=notes,
            details={"query_indices": indices, "diagnostics": diag, "results": results},
        )


def diagnostic_lines(diag: Mapping[str, Any], target: int) -> list[str]:
    """The classifiers', regressor's and generator's diagnostics as printed lines."""
    lines = [f"classifiers (accuracy on the clean / shortcut test split; stamping the mark on non-{target} digits):"]
    for c in CLASSIFIERS:
        d = diag[c]
        lines.append(
            f"  {c:9s} acc {d['accuracy_test']:.3f} / {d['accuracy_test_shortcut']:.3f}   "
            f"mark -> predicted {target}: {d['mark_makes_7_rate']:.1%}   "
            f"p({target}) {d['p7_without_mark']:.3f} -> {d['p7_with_mark']:.3f}"
        )
    fmt: Callable[[Mapping[str, float]], str] = lambda q: ", ".join(f"{k} {v:.2f}" for k, v in q.items())  # noqa: E731
    lines.append("factor regressor (held-out R^2; mark: accuracy): " + fmt(diag["regressor_quality"]))
    if "latent_predictor_quality" in diag:
        lines.append("latent predictors (held-out R^2; mark: accuracy): " + fmt(diag["latent_predictor_quality"]))
        ae = diag["autoencoder"]
        lines.append(f"autoencoder reconstruction MSE {ae['recon_mse']:.4f} (mark corner {ae['recon_mse_mark_corner']:.4f})")
        mp = diag["mark_path"]
        lines.append(
            f"generator's mark path (|z0| {mp['code_norm']:.1f}; stamping the mark moves the code by "
            f"{mp['stamp_distance']:.1f}): alpha along the latent mark direction -> corner brightness, shortcut p({target}): "
            + " | ".join(f"{a:.1f}: {c:.2f}, {p:.3f}" for a, c, p in zip(mp["alpha"], mp["corner"], mp["p7"]))
        )
    return lines


def shift_lines(results: Mapping[str, Any]) -> list[str]:
    """The reconstruction shift of each latent / prior-based run, as printed lines."""
    lines = []
    for method, res in results.items():
        for clf in CLASSIFIERS:
            shift = res["classifiers"][clf]["reconstruction_shift"]
            if shift:
                lines.append(
                    f"{method} {clf}: reconstruction shift R(start) - R(query), part of the image score: "
                    + ", ".join(f"{n} {v:+.3f}" for n, v in shift.items())
                )
    return lines
