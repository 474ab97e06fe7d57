"""Ground truth for counterfactual attributions: does the explanation find the planted shortcut?

On the built-in rendered digits (known factors), with a planted shortcut in training (the
corner mark is on iff the digit is a 7; ``--shortcut-class`` picks another class, which then
replaces 7 everywhere below, including the "7" in the names of the summary's diagnostics), this script

1. trains with ``lit-cf fit`` (subprocesses, as ``scripts/battery.py`` does) a *shortcut*
   classifier (``configs/data/rendered_shortcut.yaml``), a *clean* classifier (the same CNN on
   ``configs/data/rendered.yaml``), a factor regressor (``configs/model/factor_regressor.yaml``:
   the 7 known factors from an image) and LatentAttack's generator: the autoencoder of
   ``configs/model/autoencoder.yaml`` with ``--ae-output`` (default ``identity``, see below),
   or ``--generator vae`` (``configs/model/vae.yaml``); regressor and generator see auxiliary
   data in which the mark is on for half of the images (``--aux-mark-rate``), so both can
   read / draw it;
2. explains non-7 clean test digits towards 7 with every method of ``--methods`` (pixel,
   latent_attack and disc by default), for both classifiers;
3. ranks the known factors by their global attribution score, the mean over successful
   counterfactuals of ``P_j(after) - P_j(before)`` (``lit_cf.attribution.attribute_run``,
   with 95% bootstrap intervals), per method, classifier and source (below), prints a table
   and a verdict per method: PASS when ``mark`` ranks first with a positive score for the
   shortcut classifier and does not rank first for the clean one. The script passes when
   every method passes on its verdict source: ``image`` for pixel and DISC, ``--latent-source``
   (default ``recon``) for LatentAttack; the other sources are printed as informative.

Attribution sources (``source`` column):

* ``image``: the factor regressor on the query and on the counterfactual (every method; this
  is what ``lit-cf evaluate --descriptors`` reads). For a latent method it includes the
  generator's reconstruction error, printed as the "reconstruction shift" ``R(decode(z0)) -
  R(query)``: the same for both classifiers, since no step of the attack is in it.
* ``recon`` (latent methods): the factor regressor on the reconstruction ``decode(z0)`` and on
  the counterfactual ``decode(z)``: the edit the attack made. LatentAttack's verdict reads this
  one by default, because the paper's attribution is also relative to ``z0`` (the
  reconstruction is its original) and because the image regressor reads the factors far
  better than the linear predictors of the next source (held-out R^2 of the continuous
  factors 0.91-0.99 against 0.40-0.92 in the runs measured below).
* ``latent`` (latent methods): linear predictors of the factors fitted on the autoencoder's
  codes (``fit_linear_predictors``; ridge for continuous factors, logistic for the mark),
  applied to the saved start and final codes: the paper's own attribution, no re-encoding.

LatentAttack settings (switches, defaults in brackets): ``--latent-loss`` [``log_prob``; the
paper's ``prob`` stalls on these confident classifiers], ``--latent-pixel-weight`` [1.5, an
L2 term ``||x' - decode(z0)||^2``; the paper has none], ``--latent-original``
[``reconstruction``, the paper's: also the reference of the pixel term], ``--ae-output``
[``identity``]. Why each one, measured on a 2-core CPU at the full scale (the defaults) and
at the reduced scale (``--train-size 10000 --epochs 3 --ae-epochs 8 --num-queries 100``,
model seeds 0 and 1); "first / n-th" is the mark's rank for the shortcut / clean classifier
on the verdict source ``recon`` unless stated:

* the sigmoid output saturates on the empty corner: along the latent mark direction the
  corner stays dark until a step of about 20% of ``|z0|`` (the "mark path" diagnostic), so
  the gradient does not see the mark. In one side-by-side pair of autoencoders trained alike
  (scratch run, ``log_prob``, no pixel term) the mark ranked sixth or seventh on every source
  with the sigmoid output and first on ``latent`` (second on ``image``) with the identity output.
  With the default pixel term (reduced scale, seed 0) the sigmoid autoencoder's attacks reach
  p(7) = 0.75 for 30% / 46% of the queries (identity output: 100% / 88%); its successful
  ones rank the mark first / fifth;
* without a pixel term the attack dims and thins the strokes for both classifiers (identity
  output: fifth / seventh at the reduced scale, seed 0, behind thickness -0.198). The pixel
  weight has to suit the classifiers' confidence. Full scale: 1.0 second (+0.111, behind
  intensity -0.158) / seventh; 1.5 and 2.0 first (+0.206 and +0.257) / seventh. Reduced
  scale: 0.1 sixth and fourth (seeds 0, 1); 1.0 first (+0.188, +0.308) / sixth and seventh;
  1.5 first (+0.268, +0.394) / fifth and seventh; 3.0 first, but only 23% and 40% of the
  attacks on the shortcut classifier reach p(7) = 0.75. An L1 pixel term (``pixel_norm: l1``,
  full scale, 0.1 and 0.3) thins the strokes instead: seventh and sixth;
* the paper's loss ``-p`` (scratch identity autoencoder, weight 0): 53% of the attacks on the
  shortcut classifier succeed, against 100% with ``log_prob``.

On the other sources at weight 1.5: ``image`` ranks the mark third (reduced, seed 0), first
(seed 1) and second at full scale, behind the reconstruction shift (intensity -0.21 and
thickness +0.24 for both classifiers, full scale); ``latent`` ranks it third, first and third
(its linear predictors read thickness and intensity poorly: held-out R^2 0.40-0.73). The shortcut
classifier is partly a shape classifier: stamping the mark on a non-7 digit makes it say 7
for 21% (full scale) and 22% / 39% (reduced, seeds 0 / 1) of the digits. Earlier
measurements with the sigmoid generators and no pixel term: the mark ranked seventh
(autoencoder, paper loss, 35% of the attacks never moved) or second (VAE, ``log_prob``,
+0.084, behind intensity -0.42) on ``image``; with ``--shortcut-class 8`` (VAE) third.

DISC settings here (``--disc-args`` adds to or overrides them): no DUQ model (duq null,
mc_weight 0: these classifiers are plain CNNs), the INR prior (seconds per query on a CPU,
where DIP takes seconds per step), 50 steps per stage, 200 prior-fit steps and
``l2_weight`` 5 (``||x' - query||^2``). Measured on the full-scale models of the default run
(explain step only), on ``recon`` (the edit from the fitted prior's image): without the L2
term the mark ranks second (+0.168, behind intensity -0.355) / seventh; with weight 1.5 second
(+0.203, behind intensity -0.280); with weight 5 first (+0.270, 95% CI [+0.250, +0.288]) /
sixth, and first on ``image`` too, but only 78% / 62% of the queries reach the target. The DIP
prior without the L2 term (``dip_channels=16``, first 50 queries): third (+0.080) / seventh.
Without the L2 term DISC is done within 4 to 8 steps, and those first Adam steps on the
prior's weights dim the whole digit, for both classifiers.

Usage (the defaults are the full scale; the reduced run below took 8 minutes on a shared
2-core machine, 18 minutes when the cores were busier)::

    python scripts/ground_truth.py --out runs/ground-truth
    python scripts/ground_truth.py --out runs/gt-small --train-size 10000 --epochs 3 --ae-epochs 8 \\
        --num-queries 100 --threads 1
    python scripts/ground_truth.py --out runs/gt-dip --disc-args '--model.init_args.prior=dip'

Writes ``<out>/summary.json`` (settings, commands, diagnostics, rankings, verdicts), the models
under ``<out>/models`` and the explain runs under ``<out>/explain``. Exit status 0 on PASS, 1 on
FAIL, 2 on a usage or data error.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from script_env import ENV, prepare_out, set_threads  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
C = ROOT / "configs"
KNOWN_METHODS = ("pixel", "latent_attack", "disc")
DEFAULT_METHODS = ("pixel", "latent_attack", "disc")
CLASSIFIERS = ("shortcut", "clean")
LATENT_SOURCES = ("recon", "latent", "image")
TARGET = 7
SHORTCUT = "mark"
# entries this script creates inside --out (removed by --overwrite, nothing else is touched)
OWNED = ("models", "explain", "summary.json")

COMMANDS: list[str] = []


def lit_cf(*args: str) -> None:
    cmd = [sys.executable, "-m", "lit_cf", *args]
    shown = "lit-cf " + " ".join(shlex.quote(a) for a in args)
    COMMANDS.append(shown)
    print(f"$ {shown}", flush=True)
    try:
        subprocess.run(cmd, check=True, env=ENV)
    except subprocess.CalledProcessError as err:
        sys.exit(f"ground_truth: this command failed (exit status {err.returncode}):\n  {shown}")


def parse_methods(values: list[str]) -> list[str]:
    methods: list[str] = []
    for v in values:
        for m in v.replace(",", " ").split():
            m = m.strip().lower().replace("-", "_")
            if m == "latent":
                m = "latent_attack"
            if m not in KNOWN_METHODS:
                raise argparse.ArgumentTypeError(f"unknown method {m!r}; choose from {list(KNOWN_METHODS)}")
            if m not in methods:
                methods.append(m)
    if not methods:
        raise argparse.ArgumentTypeError("--methods needs at least one method")
    return methods


# ----------------------------------------------------------------------------- diagnostics
def classifier_diagnostics(ckpt: Path, test_size: int) -> dict[str, float]:
    """Accuracy on the clean and the shortcut test split, and the effect of stamping the mark."""
    import torch

    from lit_cf.data.rendered import FACTOR_NAMES, RenderedDigitsDataModule, render_digits
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    model = load_module(ckpt, ImageClassifier).eval()
    dm = RenderedDigitsDataModule(test_size=test_size, shortcut_class=TARGET, shortcut_strength=1.0)
    out: dict[str, float] = {}
    with torch.no_grad():
        for split in ("test", "test_shortcut"):
            data = dm.dataset(split)
            pred = torch.cat([model(data.images[i : i + 500]).argmax(-1) for i in range(0, len(data), 500)])
            out[f"accuracy_{split}"] = float((pred == data.labels).float().mean())
        data = dm.dataset("test")
        mark = list(FACTOR_NAMES).index(SHORTCUT)
        keep = (data.labels != TARGET) & (data.factors[:, mark] < 0.5)  # non-7 digits without the mark
        factors = data.factors[keep].clone()
        factors[:, mark] = 1.0
        stamped = render_digits(data.labels[keep], factors)
        p_before = model(data.images[keep]).softmax(-1)
        p_after = model(stamped).softmax(-1)
    out["mark_makes_7_rate"] = float((p_after.argmax(-1) == TARGET).float().mean())
    out["p7_without_mark"] = float(p_before[:, TARGET].mean())
    out["p7_with_mark"] = float(p_after[:, TARGET].mean())
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


def mark_path(ae: Any, latent_pred: Any, shortcut: Path, test_size: int, n: int = 64) -> dict[str, Any]:
    """How the generator draws the mark along its latent mark direction.

    From the codes ``z0`` of ``n`` non-7 test digits, step ``alpha`` along the unit direction of
    the latent mark predictor and record the mean corner brightness of ``decode(z0 + alpha m)``
    and the shortcut classifier's mean p(7) on it, next to ``|z0|`` and the latent distance
    between a digit's code and the code of the same digit with the mark stamped on. A mark that
    appears only after a long step with p(7) flat or falling on the way cannot be found by a
    local (gradient) attack on this generator.
    """
    import torch

    from lit_cf.data.rendered import MARK_SIZE, RenderedDigits
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    clf = load_module(shortcut, ImageClassifier).eval()
    data = RenderedDigits(test_size, split="test")
    x = data.images[torch.tensor(non_target_indices(test_size, n))]  # a copy (advanced indexing)
    x[..., :MARK_SIZE, :MARK_SIZE] = 0.0  # (test digits carry the mark at the clean rate) start without it
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
        out["p7"].append(float(clf(xa).softmax(-1)[:, TARGET].mean()))
    return out


def non_target_indices(test_size: int, n: int) -> list[int]:
    from lit_cf.data.rendered import RenderedDigitsDataModule

    labels = RenderedDigitsDataModule(test_size=test_size).dataset("test").labels
    idx = (labels != TARGET).nonzero().flatten().tolist()
    if len(idx) < n:
        sys.exit(f"ground_truth: only {len(idx)} non-{TARGET} digits among {test_size} test images; raise --test-size")
    return idx[:n]


# ----------------------------------------------------------------------------- attribution
def rankings_of(
    run: Any, regressor: Any, ae: Any, latent_pred: Any, n_boot: int, seed: int, start_image: str | None = None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """``({source: ranking}, reconstruction shift)`` for one run; ranking rows ``(name, score, lo, hi)``.

    ``ae`` (and ``latent_pred``) only for runs of a latent method on that autoencoder;
    ``start_image``: the saved tensor a method without a latent starts from (DISC's
    ``prior_image``), its ``recon`` source. The reconstruction shift is the mean over the
    attributed counterfactuals of ``R(start) - R(query)`` per factor (``R``: the factor
    regressor; start: ``decode(z0)`` or the fitted prior's image): the part of the ``image``
    score that the reconstruction error contributes, before any step of the method
    (``image`` = shift + ``recon``).
    """
    from lit_cf.attribution import attribute_run
    from lit_cf.errors import UserError

    def ranked(res: dict[str, Any]) -> Any:
        return res["per_class"].get(TARGET, res["global"])

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

        def recon_fn(z):
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


def verdict(shortcut: Any, clean: Any) -> dict[str, Any]:
    if isinstance(shortcut, str) or isinstance(clean, str):
        return {"pass": False, "why": "no ranking (no successful counterfactuals)"}
    first_s, first_c = shortcut[0], clean[0]
    ok_s = first_s[0] == SHORTCUT and first_s[1] > 0
    ok_c = first_c[0] != SHORTCUT
    why = []
    if not ok_s:
        why.append(f"shortcut classifier: {first_s[0]} ({first_s[1]:+.3f}) ranks first, not +{SHORTCUT}")
    if not ok_c:
        why.append(f"clean classifier: {SHORTCUT} ranks first ({first_c[1]:+.3f})")
    mark_s = next(r for r in shortcut if r[0] == SHORTCUT)
    return {
        "pass": ok_s and ok_c,
        "shortcut_ok": ok_s,
        "clean_ok": ok_c,
        # the interval of the mark's score lies above every other factor's |score|
        "ci_separated": ok_s and len(shortcut) > 1 and mark_s[2] > abs(shortcut[1][1]),
        "why": "; ".join(why),
    }


def fmt_rank(ranking: Any, k: int = 3) -> str:
    if isinstance(ranking, str):
        return ranking
    return " | ".join(f"{n} {s:+.3f} [{lo:+.3f},{hi:+.3f}]" for n, s, lo, hi in ranking[:k])


def mark_rank(ranking: Any) -> tuple[int, float] | tuple[None, None]:
    if isinstance(ranking, str):
        return None, None
    for i, (n, s, *_) in enumerate(ranking):
        if n == SHORTCUT:
            return i + 1, s
    return None, None


# ----------------------------------------------------------------------------- main
def main() -> int:
    global TARGET  # --shortcut-class sets it for the whole script
    parser = argparse.ArgumentParser(
        description="Ground truth: does a counterfactual explanation find the planted shortcut (mark <=> 7)?",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default=None, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace this script's earlier output in --out")
    parser.add_argument("--train-size", type=int, default=20000, help="training images of every model")
    parser.add_argument("--test-size", type=int, default=2000, help="test split size (queries come from it)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the classifiers")
    parser.add_argument("--ae-epochs", type=int, default=None, help="epochs of the autoencoder (default: --epochs)")
    parser.add_argument("--regressor-epochs", type=int, default=None, help="epochs of the factor regressor (default: --epochs)")
    parser.add_argument("--num-queries", type=int, default=200, help="non-7 test digits explained per method and classifier")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"methods among {list(KNOWN_METHODS)}",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every model and explain run")
    parser.add_argument(
        "--shortcut-class",
        type=int,
        default=7,
        choices=range(10),
        metavar="0..9",
        help="class that carries the mark in the shortcut training data, and the explanation target",
    )
    parser.add_argument("--aux-mark-rate", type=float, default=0.5, help="mark rate of the regressor's and autoencoder's data")
    parser.add_argument("--pixel-steps", type=int, default=300)
    parser.add_argument("--pixel-lr", type=float, default=0.01)
    parser.add_argument("--pixel-l1", type=float, default=0.4, help="L1 weight of the pixel method (sparse edits)")
    parser.add_argument("--pixel-stop", type=float, default=0.5, help="stop probability of the pixel method")
    parser.add_argument("--latent-steps", type=int, default=1000, help="LatentAttack steps (paper, MNIST: 1,000)")
    parser.add_argument("--latent-lr", type=float, default=0.1, help="LatentAttack Adam lr (paper, MNIST: 0.1)")
    parser.add_argument("--latent-threshold", type=float, default=0.75, help="LatentAttack threshold tau (paper: 0.75)")
    parser.add_argument(
        "--latent-loss",
        choices=["prob", "log_prob"],
        default="log_prob",
        help="LatentAttack loss: -log p (default here: no vanishing gradient on these confident "
        "classifiers), or the paper's -p (the method's default)",
    )
    parser.add_argument(
        "--latent-pixel-weight",
        type=float,
        default=1.5,
        help="LatentAttack's pixel proximity weight ||x' - x_ref||^2 (0: off, as in the paper)",
    )
    parser.add_argument(
        "--latent-original",
        choices=["query", "reconstruction"],
        default="reconstruction",
        help="LatentAttack's original_prediction (and x_ref of the pixel term); the paper: reconstruction",
    )
    parser.add_argument(
        "--latent-source",
        choices=list(LATENT_SOURCES),
        default="recon",
        help="the attribution LatentAttack's verdict reads (all three are printed)",
    )
    parser.add_argument(
        "--disc-source",
        choices=["recon", "image"],
        default="recon",
        help="the attribution DISC's verdict reads: the edit from its fitted prior's image, or from the query",
    )
    parser.add_argument(
        "--generator",
        choices=["autoencoder", "vae"],
        default="autoencoder",
        help="LatentAttack's generator: configs/model/autoencoder.yaml (64-d) or configs/model/vae.yaml (16-d)",
    )
    parser.add_argument(
        "--ae-output",
        default=None,
        help="the autoencoder's output activation, sigmoid | identity (default identity; sigmoid saturates on the empty "
        "corner, see lit_cf.models.AutoEncoder); the VAE is always sigmoid",
    )
    parser.add_argument(
        "--disc-args",
        default="",
        help="extra explain options for disc, added after the script's (duq null, mc_weight 0, prior inr, "
        "steps 50, fit_steps 200, l2_weight 5), e.g. '--model.init_args.prior=dip'",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the intervals")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's choice)")
    args = parser.parse_args()
    try:
        methods = parse_methods(args.methods)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    for name in ("train_size", "test_size", "epochs", "num_queries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    missing = [m for m in methods if not (C / "explain" / f"{m}.yaml").is_file()]
    if missing:
        parser.error(
            f"no config for {missing}: expected {[str(C / 'explain' / f'{m}.yaml') for m in missing]} "
            "(disc needs the DISC method in this checkout)"
        )
    if args.latent_pixel_weight < 0:
        parser.error("--latent-pixel-weight must be >= 0")
    if args.ae_output is None:
        args.ae_output = "identity" if args.generator == "autoencoder" else "sigmoid"
    if args.generator == "vae" and args.ae_output != "sigmoid":
        parser.error(
            f"--ae-output {args.ae_output} needs --generator autoencoder (the VAE's Bernoulli likelihood needs a sigmoid)"
        )
    # imported after the cheap checks: importing lit-cf takes seconds, a usage error should not
    from lit_cf.models.autoencoder import OUTPUT_ACTIVATIONS

    if args.ae_output not in OUTPUT_ACTIVATIONS:
        parser.error(f"--ae-output must be one of {list(OUTPUT_ACTIVATIONS)}, got {args.ae_output!r}")
    TARGET = args.shortcut_class
    out = Path(args.out or f"runs/ground-truth-{time.strftime('%Y%m%d-%H%M%S')}")
    prepare_out(out, args.overwrite, OWNED, "ground_truth")
    set_threads(args.threads)
    t_start = time.time()
    timings: dict[str, float] = {}

    # ------------------------------------------------------------------ train
    common = [
        "--trainer.logger=false",
        f"--trainer.accelerator={args.accelerator}",
        "--sample_grid.num_samples=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--seed_everything={args.seed}",
    ]
    sizes = [
        f"--data.init_args.train_size={args.train_size}",
        f"--data.init_args.test_size={args.test_size}",
        f"--data.init_args.val_size={min(2000, max(100, args.train_size // 10))}",
    ]
    aux = [f"--data.init_args.mark_rate={args.aux_mark_rate}"]
    models = {
        "shortcut": ("data/rendered_shortcut.yaml", "model/cnn.yaml", args.epochs, [f"--data.init_args.shortcut_class={TARGET}"]),
        "clean": ("data/rendered.yaml", "model/cnn.yaml", args.epochs, []),
        "regressor": ("data/rendered.yaml", "model/factor_regressor.yaml", args.regressor_epochs or args.epochs, aux),
    }
    if "latent_attack" in methods:
        # the generator is stored as "autoencoder" whichever model it is (a VAE encodes to its posterior mean)
        gen_extra = [f"--model.init_args.output_activation={args.ae_output}"] if args.generator == "autoencoder" else []
        models["autoencoder"] = (
            "data/rendered.yaml",
            f"model/{args.generator}.yaml",
            args.ae_epochs or args.epochs,
            aux + gen_extra,
        )
    ckpt: dict[str, Path] = {}
    for name, (data_cfg, cfg, epochs, extra) in models.items():
        t0 = time.time()
        folder = out / "models" / name
        lit_cf(
            "fit",
            f"--config={C / data_cfg}",
            f"--config={C / cfg}",
            *common,
            *sizes,
            *extra,
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={folder}",
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={folder}",
            "--trainer.callbacks.filename=last",
        )
        ckpt[name] = folder / "last.ckpt"
        if not ckpt[name].is_file():
            sys.exit(f"ground_truth: fit wrote no checkpoint {ckpt[name]}")
        timings[f"fit_{name}_s"] = round(time.time() - t0, 1)

    import torch

    from lit_cf.explainers import ExplainRun
    from lit_cf.models import DescriptorPredictor
    from lit_cf.utils.checkpoint import load_module

    diagnostics: dict[str, Any] = {c: classifier_diagnostics(ckpt[c], args.test_size) for c in CLASSIFIERS}
    regressor = load_module(ckpt["regressor"], DescriptorPredictor).eval()
    diagnostics["regressor_quality"] = regressor_quality(regressor, args.test_size)
    ae = latent_pred = None
    if "autoencoder" in ckpt:
        import lightning as L

        ae = load_module(ckpt["autoencoder"], L.LightningModule).eval()
        with torch.no_grad():
            latent_pred, quality, ae_stats = fit_latent_predictors(ae, min(args.train_size, 5000), args.aux_mark_rate, args.seed)
        latent_pred.save(out / "models" / "latent_predictors.safetensors")
        diagnostics["latent_predictor_quality"] = quality
        diagnostics["autoencoder"] = ae_stats
        with torch.no_grad():
            diagnostics["mark_path"] = mark_path(ae, latent_pred, ckpt["shortcut"], args.test_size)

    # ------------------------------------------------------------------ explain
    indices = non_target_indices(args.test_size, args.num_queries)
    method_args = {
        "pixel": [
            f"--model.init_args.steps={args.pixel_steps}",
            f"--model.init_args.lr={args.pixel_lr}",
            f"--model.init_args.l1_weight={args.pixel_l1}",
            f"--model.init_args.stop_probability={args.pixel_stop}",
        ],
        "latent_attack": [
            f"--model.init_args.generator={ckpt.get('autoencoder')}",
            f"--model.init_args.steps={args.latent_steps}",
            f"--model.init_args.lr={args.latent_lr}",
            f"--model.init_args.threshold={args.latent_threshold}",
            f"--model.init_args.loss={args.latent_loss}",
            f"--model.init_args.pixel_weight={args.latent_pixel_weight}",
            f"--model.init_args.original_prediction={args.latent_original}",
        ],
        # our classifiers are plain CNNs: DISC's manifold-consistency term (a DUQ model) is off
        # unless --disc-args switches it on (later options override earlier ones); see the docstring
        "disc": [
            "--model.init_args.duq=null",
            "--model.init_args.mc_weight=0",
            "--model.init_args.prior=inr",
            "--model.init_args.steps=50",
            "--model.init_args.fit_steps=200",
            "--model.init_args.l2_weight=5",
            *shlex.split(args.disc_args),
        ],
    }
    runs: dict[str, dict[str, Path]] = {}
    for method in methods:
        for clf in CLASSIFIERS:
            t0 = time.time()
            run = out / "explain" / f"{clf}-{method}"
            lit_cf(
                "explain",
                f"--config={C / 'data/rendered.yaml'}",
                f"--data.init_args.test_size={args.test_size}",
                f"--config={C / f'explain/{method}.yaml'}",
                *method_args[method],
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.accelerator={args.accelerator}",
                f"--trainer.default_root_dir={out}",
                f"--classifier={ckpt[clf]}",
                f"--output_dir={run}",
                "--indices=[" + ",".join(map(str, indices)) + "]",
                f"--target={TARGET}",
                "--on_source_equals_target=skip",
                "--chunk_size=256",
                f"--seed={args.seed}",
                "--overwrite=true",
            )
            runs.setdefault(method, {})[clf] = run
            timings[f"explain_{clf}_{method}_s"] = round(time.time() - t0, 1)

    # ------------------------------------------------------------------ attribute
    results: dict[str, Any] = {}
    for method, by_clf in runs.items():
        per_clf = {}
        for clf, path in by_clf.items():
            run = ExplainRun(path)
            rows = run.manifest
            steps = [r["steps"] for r in rows]
            with torch.no_grad():
                latent = method == "latent_attack"
                start = "prior_image" if method == "disc" else None
                ranks, shift = rankings_of(run, regressor, ae if latent else None, latent_pred, args.n_boot, args.seed, start)
            per_clf[clf] = {
                "run": str(path),
                "n": len(rows),
                "success_rate": sum(bool(r["success"]) for r in rows) / max(len(rows), 1),
                "steps_mean": sum(steps) / max(len(steps), 1),
                "rankings": ranks,
                "reconstruction_shift": shift,
            }
        sources = [s for s in ("image", "recon", "latent") if all(s in per_clf[c]["rankings"] for c in CLASSIFIERS)]
        verdicts = {s: verdict(per_clf["shortcut"]["rankings"][s], per_clf["clean"]["rankings"][s]) for s in sources}
        primary = {"latent_attack": args.latent_source, "disc": args.disc_source}.get(method, "image")
        results[method] = {"classifiers": per_clf, "verdicts": verdicts, "primary_source": primary}

    # ------------------------------------------------------------------ report
    print(f"\nclassifiers (accuracy on the clean / shortcut test split; stamping the mark on non-{TARGET} digits):")
    for c in CLASSIFIERS:
        d = diagnostics[c]
        print(
            f"  {c:9s} acc {d['accuracy_test']:.3f} / {d['accuracy_test_shortcut']:.3f}   "
            f"mark -> predicted {TARGET}: {d['mark_makes_7_rate']:.1%}   p({TARGET}) {d['p7_without_mark']:.3f} -> {d['p7_with_mark']:.3f}"
        )
    print(
        "factor regressor (held-out R^2; mark: accuracy): "
        + ", ".join(f"{k} {v:.2f}" for k, v in diagnostics["regressor_quality"].items())
    )
    if "latent_predictor_quality" in diagnostics:
        print(
            "latent predictors (held-out R^2; mark: accuracy): "
            + ", ".join(f"{k} {v:.2f}" for k, v in diagnostics["latent_predictor_quality"].items())
        )
        print(
            f"autoencoder reconstruction MSE {diagnostics['autoencoder']['recon_mse']:.4f} "
            f"(mark corner {diagnostics['autoencoder']['recon_mse_mark_corner']:.4f})"
        )
        mp = diagnostics["mark_path"]
        print(
            f"generator's mark path (|z0| {mp['code_norm']:.1f}; stamping the mark moves the code by "
            f"{mp['stamp_distance']:.1f}): alpha along the latent mark direction -> corner brightness, shortcut p({TARGET})"
        )
        print("  " + " | ".join(f"{a:.1f}: {c:.2f}, {p:.3f}" for a, c, p in zip(mp["alpha"], mp["corner"], mp["p7"])))
    print(f"\nglobal ranking towards {TARGET} (mean P_j(cf) - P_j(query) over successful counterfactuals, 95% CI), top 3:")
    header = f"{'method':14s} {'source':7s} {'classifier':10s} {'n':>4s} {'success':>7s} {'steps':>6s} {'mark rank':>9s} {'mark':>7s}  top 3"
    print(header)
    print("-" * len(header))
    for method, res in results.items():
        for source in ("image", "recon", "latent"):
            for clf in CLASSIFIERS:
                r = res["classifiers"][clf]
                if source not in r["rankings"]:
                    continue
                rank, score = mark_rank(r["rankings"][source])
                print(
                    f"{method:14s} {source:7s} {clf:10s} {r['n']:4d} {r['success_rate']:7.1%} {r['steps_mean']:6.0f} "
                    f"{rank if rank else '-':>9} {score if score is not None else math.nan:+7.3f}  {fmt_rank(r['rankings'][source])}"
                )
    for method, res in results.items():
        for clf in CLASSIFIERS:
            shift = res["classifiers"][clf]["reconstruction_shift"]
            if shift:
                print(
                    f"{method} {clf}: reconstruction shift R(start) - R(query), part of the image score: "
                    + ", ".join(f"{n} {v:+.3f}" for n, v in shift.items())
                )
    print()
    overall = True
    for method, res in results.items():
        if res["primary_source"] not in res["verdicts"]:
            overall = False
            print(f"FAIL {method}: no {res['primary_source']} attribution for both classifiers")
        for source, v in res["verdicts"].items():
            primary = source == res["primary_source"]
            overall &= v["pass"] or not primary
            tag = "PASS" if v["pass"] else "FAIL"
            note = "" if v["pass"] else f": {v['why']}"
            print(f"{tag} {method} ({source}{'' if primary else ', informative'}){note}")
    print(
        f"\nground_truth: {'PASS' if overall else 'FAIL'} (verdict on each method's own attribution: "
        + ", ".join(f"{m} {r['primary_source']}" for m, r in results.items())
        + ")"
    )
    timings["total_s"] = round(time.time() - t_start, 1)
    summary = {
        "settings": {**vars(args), "methods": methods, "out": str(out)},
        "target": TARGET,
        "shortcut_factor": SHORTCUT,
        "query_indices": indices,
        "checkpoints": {k: str(v) for k, v in ckpt.items()},
        "commands": COMMANDS,
        "diagnostics": diagnostics,
        "results": results,
        "pass": overall,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"ground_truth: summary in {out / 'summary.json'} ({timings['total_s']:.0f} s)")
    return 0 if overall else 1


if __name__ == "__main__":
    sys.exit(main())
