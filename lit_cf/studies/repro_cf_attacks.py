"""Reproduce Counterfactual Attacks (Goldwasser & Hooker, 2025) on MNIST and CelebA from a data root.

``lit-cf study --config configs/study/repro_cf_attacks.yaml``. Measured figures live in
``docs/results/repro_cf_attacks.md``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from lit_cf.errors import UserError
from lit_cf.metrics.attack_stats import attack_stats, attack_stats_by_pair
from lit_cf.runs.atomic import atomic_write_text
from lit_cf.studies.ablate_disc import check_data_overrides, init_args
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study

__all__ = ["PAIRS", "ReproCFAttacks", "celeba_data_root", "check_mnist", "pair_targets"]

#: the paper's digit pairs (source -> target)
PAIRS = ((4, 9), (8, 9), (1, 7), (9, 7), (5, 6), (0, 8), (3, 2))
PAPER_ACCURACY = 0.9786
GOAL_ACCURACY = 0.979
GOAL_SUCCESS = 0.95
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: evaluate's table columns shown per run (metrics.json ``table`` key -> column)
EVAL_COLUMNS = (
    ("flip_rate", "validity"),
    ("tconf_mean", "target p"),
    ("l1_mean", "L1"),
    ("l2_mean", "L2"),
    ("fid_domain", "fid_domain"),
    ("perceptual_domain_mean", "perceptual"),
    ("ota_mean", "oracle OTA"),
    ("os_mean", "oracle OS"),
    ("seconds_per_cf_mean", "s/cf"),
)
#: the small CNN of configs/model/cnn.yaml for 64 px RGB and two classes (CelebA on a CPU)
CELEBA_CNN = {
    "model.init_args.num_classes": 2,
    "model.init_args.backbone.init_args.in_channels": 3,
    "model.init_args.backbone.init_args.image_size": 64,
    "model.init_args.input_mean": [0.5, 0.5, 0.5],
    "model.init_args.input_std": [0.5, 0.5, 0.5],
}


def check_mnist(root: Path) -> None:
    """Refuse a root without MNIST's four IDX files (unpacked or ``.gz`` in a writable folder)."""
    raw = root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
    if missing:
        raise UserError(
            f"repro_cf_attacks: MNIST not found: {raw} lacks {missing} (each unpacked or as .gz). Copy the staged data into "
            "a writable root first: bash scripts/prepare_data.sh ../shared/data data (then root: data)"
        )
    if any(not (raw / f).is_file() for f in MNIST_FILES) and not os.access(raw, os.W_OK):
        raise UserError(
            f"repro_cf_attacks: {raw} holds .gz files but is not writable (they are unpacked beside themselves): "
            "copy it into a writable root with bash scripts/prepare_data.sh ../shared/data data"
        )


def celeba_data_root(path: Path) -> Path:
    """The data root holding ``celeba/``; accepts the root itself or the ``celeba`` folder."""
    for root in (path, path.parent):
        folder = root / "celeba"
        if (folder / "img_align_celeba").is_dir():
            missing = [f for f in ("list_attr_celeba.txt", "list_eval_partition.txt") if not (folder / f).is_file()]
            if missing:
                raise UserError(f"repro_cf_attacks: CelebA folder {folder} lacks {missing}")
            if not any((folder / "img_align_celeba").iterdir()):
                raise UserError(f"repro_cf_attacks: CelebA image folder {folder / 'img_align_celeba'} is empty")
            return root
    raise UserError(
        f"repro_cf_attacks: CelebA not found at {path}: expected <root>/celeba/img_align_celeba/*.jpg, list_attr_celeba.txt "
        "and list_eval_partition.txt (bash scripts/prepare_data.sh ../shared/data data, then celeba_root: data); "
        "or leave celeba out of parts"
    )


def pair_targets(labels: list[int], per_pair: int, pairs: tuple[tuple[int, int], ...] = PAIRS) -> dict[int, int]:
    """``{test index: target}``: the first ``per_pair`` images of each pair's source class.

    An image whose class is the source of several pairs keeps the last pair's target (a target
    file holds one target per image); in the paper's pairs every source class is distinct.
    """
    targets: dict[int, int] = {}
    for s, t in pairs:
        targets.update({i: t for i in [i for i, y in enumerate(labels) if y == s][:per_pair]})
    return targets


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


@register_study
class ReproCFAttacks(Study):
    """Counterfactual Attacks (Goldwasser & Hooker, 2025) on MNIST and CelebA.

    **MNIST**, as the authors' code runs it (shared/specs/methods.md): a conv autoencoder
    16/32/64, stride 2, 64-d latent (configs/model/autoencoder.yaml); a classifier
    conv32-conv64-FC128 (configs/model/cnn.yaml; paper: 97.86% test accuracy, goal >= 97.9%);
    LatentAttack with Adam on the latent, threshold tau, a step limit

    (a) on the misclassified test images, towards their true label;
    (b) on the digit pairs 4->9, 8->9, 1->7, 9->7, 5->6, 0->8, 3->2: test images of the source
        class towards the target (images already predicted as the target are skipped). The
        authors' code used tau 0.5 and up to 5,000 steps for digit pairs; the defaults are tau
        0.75 / 1,000 steps for both parts (``pair_threshold`` / ``pair_steps``).

    Reported: success rate (the target probability reached tau; goal >= 95%), steps used (mean
    and median over the successful attacks), and ``lit-cf evaluate`` over the latent runs and
    PixelCounterfactual runs on the same queries (configs/explain/pixel.yaml, stopping at the
    same tau), side by side: validity, target confidence, L1/L2, ``fid_domain`` and
    ``perceptual_domain`` on the features of an independently trained wider CNN
    (configs/model/cnn_wide.yaml), which is also the oracle (OTA: the oracle predicts the
    target; OS: it agrees with the classifier). Expected: latent counterfactuals far more
    realistic (lower fid_domain, higher oracle agreement) at a larger L_p distance.

    **CelebA** (64 px): an autoencoder (configs/model/autoencoder_celeba.yaml, 128-d latent;
    the paper uses StyleGAN3 latents), a Smiling classifier (configs/model/resnet18_celeba.yaml,
    or a small CNN with ``celeba_classifier: cnn`` for a CPU run), linear attribute predictors
    over the 40 attributes fitted on the autoencoder's codes (logistic regression, as the
    paper; held-out accuracy next to the majority-class baseline), LatentAttack runs making
    non-smiling faces smile and smiling faces stop smiling (``decreasing: true``), and the top
    global descriptors for Smiling (mean of sign * (P_j(z_cf) - P_j(z_0)), sign +1 towards
    smiling, -1 away; bootstrap 95% intervals).

    Args:
        root: Data root holding ``MNIST/raw``.
        celeba_root: Data root holding ``celeba/`` (or the ``celeba`` folder itself).
        parts: ``mnist`` and/or ``celeba``.
        train_limit: Train on the first this many images of each split only (``null``: all).
        ae_epochs: Epochs of the autoencoders.
        clf_epochs: Epochs of the classifiers (and the MNIST oracle).
        oracle: MNIST: train the wide CNN (oracle and ``fid_domain`` features).
        num_queries: MNIST: misclassified test images explained (``null``: all).
        pair_queries: MNIST: test images per digit pair.
        steps: LatentAttack steps on the misclassified images.
        lr: LatentAttack's Adam learning rate (MNIST).
        threshold: tau on the misclassified images (and CelebA).
        pair_steps: LatentAttack steps on the digit pairs (paper's code: 5,000).
        pair_threshold: tau on the digit pairs (paper's code: 0.5).
        pixel_steps: PixelCounterfactual steps (``null``: as LatentAttack).
        celeba_classifier: ``resnet18`` or ``cnn`` (CPU runs).
        celeba_train_limit: ``null``: ``train_limit``.
        celeba_ae_epochs: ``null``: ``ae_epochs``.
        celeba_clf_epochs: ``null``: ``clf_epochs``.
        celeba_queries: Queries per direction (make / remove a smile).
        celeba_steps: LatentAttack steps on CelebA (paper, StyleGAN3: 500).
        celeba_lr: LatentAttack learning rate on CelebA (paper, StyleGAN3 latents: 0.01).
        top_k: Global descriptors listed.
        n_boot: Bootstrap resamples of the global intervals.
        seed: Seed of the models and the explain runs (the oracle: ``seed + 2``).
        data_overrides: Dotted ``data.init_args.*`` overrides of MNIST's data (fits, explain
            runs, evaluation; e.g. ``{data.init_args.val_size: 1000}``).
        accelerator: Lightning accelerator.
    """

    name: ClassVar[str] = "repro_cf_attacks"

    def __init__(
        self,
        root: str = "data",
        celeba_root: str = "data",
        parts: list[Literal["mnist", "celeba"]] | None = None,
        train_limit: int | None = None,
        ae_epochs: int = 10,
        clf_epochs: int = 5,
        oracle: bool = True,
        num_queries: int | None = None,
        pair_queries: int = 50,
        steps: int = 1000,
        lr: float = 0.1,
        threshold: float = 0.75,
        pair_steps: int = 1000,
        pair_threshold: float = 0.75,
        pixel_steps: int | None = None,
        celeba_classifier: Literal["resnet18", "cnn"] = "resnet18",
        celeba_train_limit: int | None = None,
        celeba_ae_epochs: int | None = None,
        celeba_clf_epochs: int | None = None,
        celeba_queries: int = 64,
        celeba_steps: int = 500,
        celeba_lr: float = 0.1,
        top_k: int = 10,
        n_boot: int = 1000,
        seed: int = 0,
        data_overrides: dict[str, Any] | None = None,
        accelerator: str = "auto",
    ) -> None:
        self.parts: list[str] = ["mnist", "celeba"] if parts is None else list(parts)
        if not self.parts or len(set(self.parts)) != len(self.parts):
            raise UserError("repro_cf_attacks: parts must name mnist and/or celeba, each once")
        counts = {
            "ae_epochs": ae_epochs,
            "clf_epochs": clf_epochs,
            "pair_queries": pair_queries,
            "steps": steps,
            "pair_steps": pair_steps,
            "celeba_queries": celeba_queries,
            "celeba_steps": celeba_steps,
            "top_k": top_k,
            "n_boot": n_boot,
        }
        optional = {
            "train_limit": train_limit,
            "num_queries": num_queries,
            "pixel_steps": pixel_steps,
            "celeba_train_limit": celeba_train_limit,
            "celeba_ae_epochs": celeba_ae_epochs,
            "celeba_clf_epochs": celeba_clf_epochs,
        }
        bad = [k for k, v in counts.items() if v < 1] + [k for k, v in optional.items() if v is not None and v < 1]
        if bad:
            raise UserError(f"repro_cf_attacks: {', '.join(bad)} must be >= 1")
        bad_tau = [k for k, v in {"threshold": threshold, "pair_threshold": pair_threshold}.items() if not 0 < v < 1]
        if bad_tau:
            raise UserError(f"repro_cf_attacks: {', '.join(bad_tau)} must lie strictly between 0 and 1")
        self.data_overrides = check_data_overrides("repro_cf_attacks", data_overrides)
        # the data, before anything is written
        if "mnist" in self.parts:
            check_mnist(Path(root))
        self.celeba_root = str(celeba_data_root(Path(celeba_root))) if "celeba" in self.parts else celeba_root
        self.root, self.train_limit, self.ae_epochs, self.clf_epochs, self.oracle = (
            root,
            train_limit,
            ae_epochs,
            clf_epochs,
            oracle,
        )
        self.num_queries, self.pair_queries, self.steps, self.lr, self.threshold = num_queries, pair_queries, steps, lr, threshold
        self.pair_steps, self.pair_threshold, self.pixel_steps = pair_steps, pair_threshold, pixel_steps
        self.celeba_classifier, self.celeba_train_limit = celeba_classifier, celeba_train_limit or train_limit
        self.celeba_ae_epochs, self.celeba_clf_epochs = celeba_ae_epochs or ae_epochs, celeba_clf_epochs or clf_epochs
        self.celeba_queries, self.celeba_steps, self.celeba_lr = celeba_queries, celeba_steps, celeba_lr
        self.top_k, self.n_boot, self.seed = top_k, n_boot, seed

    # ------------------------------------------------------------------ MNIST
    def mnist_args(self) -> dict[str, Any]:
        return {"data.init_args.root": self.root, "data.init_args.download": False, **self.data_overrides}

    def mnist_spec(self, name: str, model: str, epochs: int, seed: int) -> ModelSpec:
        limit = {"data.init_args.limit": self.train_limit} if self.train_limit else {}
        args = {**self.mnist_args(), **limit, "trainer.max_epochs": epochs, "seed_everything": seed}
        return ModelSpec(name, ("data/mnist.yaml", model), args)

    def mnist(self, ctx: StudyContext) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
        from lit_cf.data import MNISTDataModule
        from lit_cf.runs import ExplainRun

        ckpt = {
            "autoencoder": ctx.fit(self.mnist_spec("mnist-autoencoder", "model/autoencoder.yaml", self.ae_epochs, self.seed)),
            "classifier": ctx.fit(self.mnist_spec("mnist-classifier", "model/cnn.yaml", self.clf_epochs, self.seed)),
        }
        if self.oracle:
            ckpt["oracle"] = ctx.fit(self.mnist_spec("mnist-oracle", "model/cnn_wide.yaml", self.clf_epochs, self.seed + 2))
        dm = MNISTDataModule(**{**init_args(self.data_overrides), "root": self.root, "download": False, "batch_size": 1000})
        scores = ctx.cached("mnist-model-scores", {k: str(v) for k, v in ckpt.items()}, lambda: _model_scores(ckpt, dm))
        test = dm.dataset("test")
        labels = getattr(test, "labels", None)
        labels = [int(v) for v in (labels if labels is not None else (test[i]["label"] for i in range(len(test))))]  # type: ignore[arg-type]
        targets = pair_targets(labels, self.pair_queries)
        target_file = ctx.out / "cache" / "pair_targets.json"
        target_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target_file, json.dumps({str(k): v for k, v in sorted(targets.items())}))
        selections: dict[str, dict[str, Any]] = {
            "misclassified": {"select": "misclassified", "target": "label"}
            | ({"num_queries": self.num_queries} if self.num_queries else {}),
            "pairs": {"indices": sorted(targets), "target": "file", "target_file": target_file},
        }
        settings = {"misclassified": (self.steps, self.threshold), "pairs": (self.pair_steps, self.pair_threshold)}
        runs: dict[str, Path] = {}
        for part, selection in selections.items():
            steps, tau = settings[part]
            method_args: dict[str, dict[str, Any]] = {
                "latent_attack": {
                    "model.init_args.generator": ckpt["autoencoder"],
                    "model.init_args.steps": steps,
                    "model.init_args.lr": self.lr,
                    "model.init_args.threshold": tau,
                },
                "pixel": {"model.init_args.steps": self.pixel_steps or steps, "model.init_args.stop_probability": tau},
            }
            for method, margs in method_args.items():
                args = {
                    **self.mnist_args(),
                    **margs,
                    **selection,
                    "classifier": ckpt["classifier"],
                    "on_source_equals_target": "skip",
                    "chunk_size": 256,
                    "seed": self.seed,
                }
                runs[f"{part}/{method}"] = ctx.explain(
                    f"mnist-{part}-{method}", ("data/mnist.yaml", f"explain/{method}.yaml"), args
                )
        stats = {}
        for name, path in runs.items():
            manifest = ExplainRun(path).manifest
            tau = settings[name.split("/")[0]][1]
            stats[name] = attack_stats(manifest, tau)
            if name.startswith("pairs"):
                stats[name]["per_pair"] = attack_stats_by_pair(manifest, tau, PAIRS)
        extra: dict[str, Any] = (
            {"oracles": {"oracle": str(ckpt["oracle"])}, "feature_network": ckpt["oracle"]} if self.oracle else {}
        )
        metrics = ctx.evaluate("mnist", runs, {**self.mnist_args(), **extra}, configs=("data/mnist.yaml",))
        table = {row["method"]: row for row in metrics["table"]}
        rows = [_row("mnist", name, stats[name], table.get(name, {})) for name in runs]
        acc = scores["accuracy"]
        notes = [
            f"MNIST classifier test accuracy {acc['classifier']:.2%} (paper {PAPER_ACCURACY:.2%}, goal >= {GOAL_ACCURACY:.1%})"
            + (f"; oracle {acc['oracle']:.2%}" if "oracle" in acc else "")
            + f"; autoencoder test MSE {scores['autoencoder_mse']:.4f}",
            f"MNIST LatentAttack lr {self.lr}; misclassified: tau {self.threshold}, <= {self.steps} steps; "
            f"pairs: tau {self.pair_threshold}, <= {self.pair_steps} steps; success: target probability >= tau, "
            "validity: the classifier predicts the target",
        ]
        for name, st in stats.items():
            for pair, ps in st.get("per_pair", {}).items():
                if ps["n"]:
                    notes.append(
                        f"{name} {pair}: n {ps['n']}, success {ps['success_rate']:.1%}, steps mean "
                        f"{_fmt(ps['steps_mean'], '{:.1f}')} median {_fmt(ps['steps_median'], '{:.0f}')}"
                    )
        goals = {
            "accuracy_goal_met": acc["classifier"] >= GOAL_ACCURACY,
            "success_goal_met": {
                k: v.get("success_rate", 0) >= GOAL_SUCCESS for k, v in stats.items() if k.endswith("latent_attack")
            },
        }
        return rows, notes, {"mnist": {**scores, "attack_stats": stats, "goals": goals}}

    # ------------------------------------------------------------------ CelebA
    def celeba(self, ctx: StudyContext) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
        import torch

        from lit_cf.attribution import attribute_run, global_attribution
        from lit_cf.data.celeba import CelebADataModule
        from lit_cf.runs import ExplainRun

        data_args: dict[str, Any] = {"data.init_args.root": self.celeba_root}
        limit = {"data.init_args.limit": self.celeba_train_limit} if self.celeba_train_limit else {}

        def spec(name: str, model: str, epochs: int, extra: Mapping[str, Any] | None = None) -> ModelSpec:
            args = {**data_args, **limit, **(extra or {}), "trainer.max_epochs": epochs, "seed_everything": self.seed}
            return ModelSpec(name, ("data/celeba.yaml", model), args)

        ae_ckpt = ctx.fit(spec("celeba-autoencoder", "model/autoencoder_celeba.yaml", self.celeba_ae_epochs))
        clf = ("model/resnet18_celeba.yaml", None) if self.celeba_classifier == "resnet18" else ("model/cnn.yaml", CELEBA_CNN)
        clf_ckpt = ctx.fit(spec("celeba-classifier", clf[0], self.celeba_clf_epochs, clf[1]))
        dm = CelebADataModule(root=self.celeba_root, batch_size=256, limit=self.celeba_train_limit)
        key = {"autoencoder": str(ae_ckpt), "classifier": str(clf_ckpt), "limit": self.celeba_train_limit}
        scores = ctx.cached("celeba-model-scores", key, lambda: _celeba_scores(clf_ckpt, ae_ckpt, dm))
        predictors_file = ctx.out / "cache" / "celeba-latent-attribute-predictors.safetensors"
        quality = ctx.cached("celeba-predictors", key, lambda: _fit_predictors(ae_ckpt, dm, predictors_file))
        if not predictors_file.is_file():  # the cached figures outlived the file: fit again
            quality = _fit_predictors(ae_ckpt, dm, predictors_file)
        from lit_cf.attribution import LinearPredictors

        predictors = LinearPredictors.load(predictors_file)
        directions = {
            "make_smile": {"source_class": 0, "select": "correct", "target": 1},
            "remove_smile": {"source_class": 1, "select": "correct", "target": 0, "model.init_args.decreasing": True},
        }
        notes, paths = [], {}
        for name, selection in directions.items():
            args = {
                **data_args,
                "model.init_args.generator": ae_ckpt,
                "model.init_args.steps": self.celeba_steps,
                "model.init_args.lr": self.celeba_lr,
                "model.init_args.threshold": self.threshold,
                **selection,
                "num_queries": self.celeba_queries,
                "on_source_equals_target": "skip",
                "classifier": clf_ckpt,
                "chunk_size": 256,
                "seed": self.seed,
            }
            try:
                paths[name] = ctx.explain(
                    f"celeba-{name}-latent_attack", ("data/celeba.yaml", "explain/latent_attack.yaml"), args
                )
            except UserError as err:  # e.g. no correctly classified face of that class: go on without it
                notes.append(f"CelebA {name}: not explained ({' '.join(str(err).split())})")
        stats, per_run, parts = {}, {}, []
        for name, path in paths.items():
            stats[name] = attack_stats(ExplainRun(path).manifest, self.threshold)
            try:
                res = attribute_run(ExplainRun(path), predictors, k=5, n_boot=self.n_boot, seed=self.seed)
            except (UserError, ValueError) as err:  # no successful counterfactual
                per_run[name] = str(err)
                continue
            per_run[name] = res["global"]
            sign = -1.0 if name == "remove_smile" else 1.0
            parts.append((res["desc_query"], res["desc_cf"], torch.full((len(res["desc_query"]),), sign)))
        combined = None
        if parts:
            combined = global_attribution(
                torch.cat([p[0] for p in parts]),
                torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]),
                predictors.names,
                n_boot=self.n_boot,
                seed=self.seed,
            )
        q, base = quality["quality"], quality["majority"]
        gain = sorted(q, key=lambda n: q[n] - base[n], reverse=True)
        notes += [
            f"CelebA Smiling classifier ({self.celeba_classifier}) test accuracy {scores['accuracy']:.2%} (majority class "
            f"{scores['majority']:.2%}); autoencoder test MSE {scores['autoencoder_mse']:.4f}",
            f"latent attribute predictors ({len(q)} attributes, {quality['codes']} training codes): mean held-out accuracy "
            f"{statistics.fmean(q.values()):.3f} vs majority {statistics.fmean(base.values()):.3f}; largest gains: "
            + ", ".join(f"{n} {q[n]:.2f} (vs {base[n]:.2f})" for n in gain[:6]),
        ]
        if combined is not None:
            assert isinstance(combined, list)  # no `group`: one ranking
            notes.append(
                f"top global descriptors for Smiling (sign +1 towards smiling, -1 away; {sum(len(p[0]) for p in parts)} "
                "successful counterfactuals; 95% bootstrap CI): "
                + "; ".join(
                    f"{i + 1}. {n} {s:+.3f} [{lo:+.3f}, {hi:+.3f}]" for i, (n, s, lo, hi) in enumerate(combined[: self.top_k])
                )
            )
        else:
            notes.append("CelebA: no successful counterfactuals, no global descriptors")
        rows = [_row("celeba", name, stats[name], {}) for name in paths]
        details = {
            "celeba": {
                **scores,
                "predictors": quality,
                "attack_stats": stats,
                "global_per_run": per_run,
                "global_smiling": combined,
            }
        }
        return rows, notes, details

    # ------------------------------------------------------------------ run
    def run(self, ctx: StudyContext) -> StudyResult:
        rows: list[dict[str, Any]] = []
        notes: list[str] = []
        details: dict[str, Any] = {"pairs": [f"{s}->{t}" for s, t in PAIRS]}
        for part in self.parts:
            part_rows, part_notes, part_details = self.mnist(ctx) if part == "mnist" else self.celeba(ctx)
            rows += part_rows
            notes += part_notes
            details.update(part_details)
        report = ctx.out / "evaluate" / "mnist" / "report.html" if "mnist" in self.parts else None
        goals = details.get("mnist", {}).get("goals")
        if goals is not None:
            notes.append(
                f"goals (reported, not judged): classifier accuracy >= {GOAL_ACCURACY:.1%}: "
                f"{'met' if goals['accuracy_goal_met'] else 'not met'}; LatentAttack success >= {GOAL_SUCCESS:.0%}: "
                + ", ".join(f"{k} {'met' if v else 'not met'}" for k, v in goals["success_goal_met"].items())
            )
        return StudyResult(rows=rows, verdict={"goals": goals, "details": details}, report=report, notes=notes)


def _row(part: str, name: str, stats: Mapping[str, Any], evaluated: Mapping[str, Any]) -> dict[str, Any]:
    nan = float("nan")
    return {
        "part": part,
        "run": name,
        "n": stats.get("n", 0),
        "success": stats.get("success_rate", nan),
        "steps mean": stats.get("steps_mean", nan),
        "steps median": stats.get("steps_median", nan),
        "recon=query pred": stats.get("recon_pred_equals_query_pred", nan),
        **{col: evaluated.get(key, nan) for key, col in EVAL_COLUMNS},
    }


def _model_scores(ckpt: Mapping[str, Path], dm: Any) -> dict[str, Any]:
    """Test accuracy of the MNIST classifiers and the autoencoder's test reconstruction error."""
    import lightning as L

    from lit_cf.metrics.model_scores import accuracy, reconstruction_mse
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    acc = {k: accuracy(load_module(v, ImageClassifier).eval(), dm.loader("test")) for k, v in ckpt.items() if k != "autoencoder"}
    ae = load_module(ckpt["autoencoder"], L.LightningModule).eval()
    import torch

    with torch.no_grad():
        mse = reconstruction_mse(ae, dm.loader("test"), max_batches=10)
    return {"accuracy": acc, "autoencoder_mse": mse}


def _celeba_scores(clf_ckpt: Path, ae_ckpt: Path, dm: Any) -> dict[str, Any]:
    import lightning as L
    import torch

    from lit_cf.metrics.model_scores import accuracy, reconstruction_mse
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    acc = accuracy(load_module(clf_ckpt, ImageClassifier).eval(), dm.loader("test"))
    p = float(torch.cat([b["label"] for b in dm.loader("test")]).float().mean())
    with torch.no_grad():
        mse = reconstruction_mse(load_module(ae_ckpt, L.LightningModule).eval(), dm.loader("test"), max_batches=10)
    return {"accuracy": acc, "majority": max(p, 1 - p), "autoencoder_mse": mse}


def _fit_predictors(ae_ckpt: Path, dm: Any, path: Path) -> dict[str, Any]:
    """Logistic regression per attribute on the autoencoder's codes, saved at ``path``; held-out
    accuracy per attribute next to the majority-class baseline."""
    import lightning as L
    import torch

    from lit_cf.attribution import descriptor_targets, encode_dataset, fit_linear_predictors
    from lit_cf.utils.checkpoint import load_module

    ae = load_module(ae_ckpt, L.LightningModule).eval()
    train_ds, val_ds = dm.dataset("train"), dm.dataset("val")
    with torch.no_grad():
        codes_train, codes_val = encode_dataset(ae, train_ds), encode_dataset(ae, val_ds)
    y_train, y_val = descriptor_targets(train_ds), descriptor_targets(val_ds)
    predictors = fit_linear_predictors(codes_train, y_train.values, y_train.kinds, y_train.names, l2=1e-2)
    path.parent.mkdir(parents=True, exist_ok=True)
    predictors.save(path)
    quality = predictors.quality(codes_val, y_val.values)
    majority = {n: max(float(y_val.values[:, j].mean()), 1 - float(y_val.values[:, j].mean())) for j, n in enumerate(y_val.names)}
    return {"quality": quality, "majority": majority, "codes": len(codes_train)}
