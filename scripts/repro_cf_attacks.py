"""Reproduce Counterfactual Attacks (Goldwasser & Hooker, 2025) on MNIST and CelebA from a data root.

**MNIST**, as the authors' code runs it (``../shared/specs/methods.md``): a conv autoencoder
16/32/64, stride 2, 64-d latent (``configs/model/autoencoder.yaml``); a classifier
conv32-conv64-FC128 (``configs/model/cnn.yaml``; paper: 97.86% test accuracy, goal >= 97.9%);
LatentAttack with Adam lr 0.1 on the latent, threshold tau 0.75, up to 1,000 steps

(a) on the misclassified test images, towards their true label (``--select misclassified
    --target label``);
(b) on the digit pairs 4->9, 8->9, 1->7, 9->7, 5->6, 0->8, 3->2: test images of the source
    class towards the target (``--target file``; images already predicted as the target are
    skipped). The authors' code used tau 0.5 and up to 5,000 steps for digit pairs; the default
    here is tau 0.75 / 1,000 steps for both parts (``--pair-threshold``/``--pair-steps``).

Reported: success rate (the target probability reached tau; goal >= 95%), steps used (mean and
median over the successful attacks), and ``lit-cf evaluate`` over the latent runs and
PixelCounterfactual runs on the same queries (``configs/explain/pixel.yaml``, stopping at the
same tau), side by side: validity (flip rate), target confidence, L1/L2 distance,
``fid_domain`` and ``perceptual_domain`` on the features of an independently trained wider CNN
(``configs/model/cnn_wide.yaml``), which also serves as the oracle (OTA: the oracle predicts the
target; OS: it agrees with the classifier). Expected: latent counterfactuals far more realistic
(lower fid_domain, higher oracle agreement) at larger L_p distance.

**CelebA** (a subset, 64 px; ``--celeba-root``, skip with ``--skip-celeba``): an autoencoder
(``configs/model/autoencoder_celeba.yaml``, 128-d latent; the paper uses StyleGAN3 latents), a
Smiling classifier (``configs/model/resnet18_celeba.yaml``, or a small CNN with
``--celeba-classifier cnn`` for a CPU run), linear attribute predictors over the 40 attributes
fitted on the autoencoder's codes (logistic regression, as the paper; held-out accuracy
reported next to the majority-class baseline), LatentAttack runs making non-smiling faces smile
(increasing, tau 0.75) and smiling faces stop smiling (``decreasing: true``, p(smiling) <= 0.25),
and the top global descriptors for Smiling (mean of sign * (P_j(z_cf) - P_j(z_0)), sign +1 towards
smiling, -1 away; bootstrap 95% intervals).

Usage::

    bash scripts/prepare_data.sh ../shared/data data
    python scripts/repro_cf_attacks.py --root data --celeba-root data --out runs/repro-cf-attacks
    # reduced (CPU: 11 minutes on a shared 2-core machine)
    python scripts/repro_cf_attacks.py --root data --celeba-root data --out runs/repro-small \\
        --train-limit 30000 --ae-epochs 3 --clf-epochs 2 --num-queries 50 --pair-queries 8 \\
        --celeba-classifier cnn --celeba-train-limit 2000 --celeba-queries 16 --celeba-steps 300 --threads 1

Writes ``<out>/summary.json`` (settings, commands, figures), the models, explain runs and the
evaluate report (``<out>/mnist/evaluate/report.html``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from script_env import ENV, prepare_out, set_threads  # scripts/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
C = ROOT / "configs"
PAIRS = ((4, 9), (8, 9), (1, 7), (9, 7), (5, 6), (0, 8), (3, 2))
PAPER_ACCURACY = 0.9786
GOAL_ACCURACY = 0.979
GOAL_SUCCESS = 0.95
OWNED = ("mnist", "celeba", "summary.json")  # what --overwrite removes from --out
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TABLE = (
    ("n", "n", "{:.0f}"),
    ("flip_rate", "validity", "{:.3f}"),
    ("tconf_mean", "target p", "{:.3f}"),
    ("l1_mean", "L1", "{:.2f}"),
    ("l2_mean", "L2", "{:.2f}"),
    ("fid_domain", "fid_domain", "{:.3f}"),
    ("perceptual_domain_mean", "perceptual", "{:.3f}"),
    ("ota_mean", "oracle OTA", "{:.3f}"),
    ("os_mean", "oracle OS", "{:.3f}"),
    ("steps_mean", "steps", "{:.0f}"),
    ("seconds_per_cf_mean", "s/cf", "{:.3f}"),
)

COMMANDS: list[str] = []


def fail(msg: str) -> None:
    sys.exit(f"repro_cf_attacks: {msg}")


def lit_cf(*args: str, fatal: bool = True) -> bool:
    """Run ``python -m lit_cf ARGS``; a failure ends the script (``fatal``) or returns False."""
    shown = "lit-cf " + " ".join(shlex.quote(a) for a in args)
    COMMANDS.append(shown)
    print(f"$ {shown}", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "lit_cf", *args], check=True, env=ENV)
    except subprocess.CalledProcessError as err:
        if fatal:
            fail(f"this command failed (exit status {err.returncode}):\n  {shown}")
        print(f"repro_cf_attacks: this command failed (exit status {err.returncode}); going on without it", flush=True)
        return False
    return True


def check_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
    if missing:
        fail(
            f"MNIST not found: {raw} lacks {missing} (each unpacked or as .gz). Copy the staged data into a "
            "writable root first: bash scripts/prepare_data.sh ../shared/data data  (then --root data)"
        )
    if any(not (raw / f).is_file() for f in MNIST_FILES) and not os.access(raw, os.W_OK):
        fail(
            f"{raw} holds .gz files but is not writable (they are unpacked beside themselves): "
            "copy it into a writable root with bash scripts/prepare_data.sh ../shared/data data"
        )


def celeba_root(path: Path) -> Path:
    """The data root holding ``celeba/``; accepts the root itself or the ``celeba`` folder."""
    for root in (path, path.parent):
        folder = root / "celeba"
        if (folder / "img_align_celeba").is_dir():
            missing = [f for f in ("list_attr_celeba.txt", "list_eval_partition.txt") if not (folder / f).is_file()]
            if missing:
                fail(f"CelebA folder {folder} lacks {missing}")
            if not any((folder / "img_align_celeba").iterdir()):
                fail(f"CelebA image folder {folder / 'img_align_celeba'} is empty")
            return root
    fail(
        f"CelebA not found at {path}: expected <root>/celeba/img_align_celeba/*.jpg, list_attr_celeba.txt and "
        "list_eval_partition.txt (bash scripts/prepare_data.sh ../shared/data data, then --celeba-root data); "
        "or pass --skip-celeba"
    )
    raise AssertionError  # unreachable


def fit(folder: Path, data: list[str], cfg: list[str], epochs: int, seed: int, common: list[str]) -> Path:
    lit_cf(
        "fit",
        *data,
        *cfg,
        *common,
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={folder}",
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={folder}",
        "--trainer.callbacks.filename=last",
    )
    ckpt = folder / "last.ckpt"
    if not ckpt.is_file():
        fail(f"fit wrote no checkpoint {ckpt}")
    return ckpt


def accuracy(ckpt: Path, dm: Any, split: str = "test") -> float:
    import torch

    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    model = load_module(ckpt, ImageClassifier).eval()
    right = total = 0
    with torch.no_grad():
        for batch in dm.loader(split):
            right += int((model(batch["image"]).argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    return right / max(total, 1)


def recon_mse(ckpt: Path, dm: Any, split: str = "test", max_batches: int = 10) -> float:
    import lightning as L
    import torch

    from lit_cf.utils.checkpoint import load_module

    ae = load_module(ckpt, L.LightningModule).eval()
    err = n = 0.0
    with torch.no_grad():
        for i, batch in enumerate(dm.loader(split)):
            if i >= max_batches:
                break
            x = batch["image"]
            err += float((ae.decode(ae.encode(x)) - x).square().sum())
            n += x.numel()
    return err / max(n, 1)


def run_stats(path: Path, threshold: float, group_by_pair: bool = False) -> dict[str, Any]:
    """Success (target probability reached tau), steps, reconstruction agreement of one run."""
    from lit_cf.explainers import ExplainRun

    rows = ExplainRun(path).manifest

    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        if not rs:
            return {"n": 0}
        reached = [r for r in rs if r["final_target_prob"] >= threshold]
        steps_ok = [r["steps"] for r in reached]
        out = {
            "n": len(rs),
            "success_rate": len(reached) / len(rs),
            "flip_rate": sum(bool(r["success"]) for r in rs) / len(rs),
            "steps_mean": statistics.fmean(steps_ok) if steps_ok else math.nan,
            "steps_median": statistics.median(steps_ok) if steps_ok else math.nan,
            "steps_mean_all": statistics.fmean(r["steps"] for r in rs),
        }
        if "recon_pred" in rs[0]:
            out["recon_pred_equals_query_pred"] = sum(r["recon_pred"] == r["orig_pred"] for r in rs) / len(rs)
            out["recon_mse_mean"] = statistics.fmean(r["recon_mse"] for r in rs)
        return out

    res = stats(rows)
    if group_by_pair:
        res["per_pair"] = {}
        for s, t in PAIRS:
            res["per_pair"][f"{s}->{t}"] = stats([r for r in rows if r["source_label"] == s and r["target"] == t])
    return res


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return spec.format(v)


# ----------------------------------------------------------------------------- MNIST
def mnist_part(args: argparse.Namespace, out: Path, common: list[str]) -> dict[str, Any]:
    from lit_cf.data import MNISTDataModule

    root = Path(args.root)
    check_mnist(root)
    base = out / "mnist"
    data = [f"--config={C / 'data/mnist.yaml'}", f"--data.init_args.root={root}", "--data.init_args.download=false"]
    limit = [f"--data.init_args.limit={args.train_limit}"] if args.train_limit else []
    t0 = time.time()
    ckpt = {
        "autoencoder": fit(
            base / "models/autoencoder",
            data + limit,
            [f"--config={C / 'model/autoencoder.yaml'}"],
            args.ae_epochs,
            args.seed,
            common,
        ),
        "classifier": fit(
            base / "models/classifier", data + limit, [f"--config={C / 'model/cnn.yaml'}"], args.clf_epochs, args.seed, common
        ),
    }
    if not args.no_oracle:
        ckpt["oracle"] = fit(
            base / "models/oracle_wide",
            data + limit,
            [f"--config={C / 'model/cnn_wide.yaml'}"],
            args.clf_epochs,
            args.seed + 2,
            common,
        )
    fit_s = time.time() - t0
    dm = MNISTDataModule(root=str(root), download=False, batch_size=1000)
    acc = {k: accuracy(v, dm) for k, v in ckpt.items() if k != "autoencoder"}
    ae_mse = recon_mse(ckpt["autoencoder"], dm)
    print(
        f"\nMNIST classifier test accuracy {acc['classifier']:.2%} (paper {PAPER_ACCURACY:.2%}, goal >= {GOAL_ACCURACY:.1%})"
        + (f"; oracle {acc['oracle']:.2%}" if "oracle" in acc else "")
        + f"; autoencoder test MSE {ae_mse:.4f}\n",
        flush=True,
    )

    # queries: (a) misclassified -> true label; (b) digit pairs from a target file
    pair_targets: dict[int, int] = {}
    test = dm.dataset("test")
    labels = getattr(test, "labels", None)
    labels = [int(v) for v in (labels if labels is not None else (test[i]["label"] for i in range(len(test))))]
    for s, t in PAIRS:
        idx = [i for i, y in enumerate(labels) if y == s][: args.pair_queries]
        pair_targets.update({i: t for i in idx})
    target_file = base / "pair_targets.json"
    target_file.write_text(json.dumps({str(k): v for k, v in sorted(pair_targets.items())}))
    selections = {
        "misclassified": ["--select=misclassified", "--target=label"]
        + ([f"--num_queries={args.num_queries}"] if args.num_queries else []),
        "pairs": [
            "--indices=[" + ",".join(map(str, sorted(pair_targets))) + "]",
            "--target=file",
            f"--target_file={target_file}",
        ],
    }
    settings = {"misclassified": (args.steps, args.threshold), "pairs": (args.pair_steps, args.pair_threshold)}
    runs: dict[str, Path] = {}
    t0 = time.time()
    for part, sel in selections.items():
        steps, tau = settings[part]
        method_args = {
            "latent_attack": [
                f"--model.init_args.generator={ckpt['autoencoder']}",
                f"--model.init_args.steps={steps}",
                f"--model.init_args.lr={args.lr}",
                f"--model.init_args.threshold={tau}",
            ],
            "pixel": [f"--model.init_args.steps={args.pixel_steps or steps}", f"--model.init_args.stop_probability={tau}"],
        }
        for method, margs in method_args.items():
            run = base / "explain" / f"{part}-{method}"
            lit_cf(
                "explain",
                *data,
                f"--config={C / f'explain/{method}.yaml'}",
                *margs,
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.accelerator={args.accelerator}",
                f"--trainer.default_root_dir={base}",
                f"--classifier={ckpt['classifier']}",
                f"--output_dir={run}",
                *sel,
                "--on_source_equals_target=skip",
                "--chunk_size=256",
                f"--seed={args.seed}",
            )
            runs[f"{part}/{method}"] = run
    explain_s = time.time() - t0
    stats = {
        name: run_stats(path, settings[name.split("/")[0]][1], group_by_pair=name.startswith("pairs"))
        for name, path in runs.items()
    }

    evaluate_dir = base / "evaluate"
    extra = [f"--oracles={{oracle: {ckpt['oracle']}}}", f"--feature_network={ckpt['oracle']}"] if "oracle" in ckpt else []
    lit_cf(
        "evaluate",
        *data,
        "--trainer.logger=false",
        f"--trainer.accelerator={args.accelerator}",
        "--trainer.enable_progress_bar=false",
        f"--runs=[{','.join(str(p) for p in runs.values())}]",
        f"--names=[{','.join(runs)}]",
        f"--output_dir={evaluate_dir}",
        *extra,
    )
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    table = {row["method"]: row for row in metrics["table"]}

    print(
        f"\nMNIST LatentAttack (lr {args.lr}; misclassified: tau {args.threshold}, <= {args.steps} steps; "
        f"pairs: tau {args.pair_threshold}, <= {args.pair_steps} steps):"
    )
    print(f"{'part':28s} {'n':>4s} {'success':>8s} {'steps mean':>10s} {'median':>7s} {'recon=query pred':>16s}")
    for name, st in stats.items():
        print(
            f"{name:28s} {st['n']:4d} {fmt(st.get('success_rate'), '{:.1%}'):>8s} {fmt(st.get('steps_mean'), '{:.1f}'):>10s} "
            f"{fmt(st.get('steps_median'), '{:.0f}'):>7s} {fmt(st.get('recon_pred_equals_query_pred'), '{:.1%}'):>16s}"
        )
        for pair, ps in st.get("per_pair", {}).items():
            if ps["n"]:
                print(
                    f"  {pair:26s} {ps['n']:4d} {ps['success_rate']:8.1%} {fmt(ps['steps_mean'], '{:.1f}'):>10s} "
                    f"{fmt(ps['steps_median'], '{:.0f}'):>7s}"
                )
    cols = [(k, h, f) for k, h, f in TABLE if any(k in row for row in table.values())]
    print("\nlit-cf evaluate (success: target probability >= tau; validity: classifier predicts the target):")
    print(f"{'run':28s} " + " ".join(f"{h:>11s}" for _, h, _ in cols))
    for name in runs:
        row = table.get(name, {})
        print(f"{name:28s} " + " ".join(f"{fmt(row.get(k), f):>11s}" for k, _, f in cols))
    print(f"report: {evaluate_dir / 'report.html'}")
    return {
        "checkpoints": {k: str(v) for k, v in ckpt.items()},
        "test_accuracy": acc,
        "accuracy_goal_met": acc["classifier"] >= GOAL_ACCURACY,
        "autoencoder_test_mse": ae_mse,
        "runs": {k: str(v) for k, v in runs.items()},
        "attack_stats": stats,
        "success_goal_met": {
            k: v.get("success_rate", 0) >= GOAL_SUCCESS for k, v in stats.items() if k.endswith("latent_attack")
        },
        "evaluate": {name: table.get(name) for name in runs},
        "seconds": {"fit": round(fit_s, 1), "explain": round(explain_s, 1)},
    }


# ----------------------------------------------------------------------------- CelebA
def celeba_part(args: argparse.Namespace, out: Path, common: list[str]) -> dict[str, Any]:
    import lightning as L
    import torch

    from lit_cf.attribution import attribute_run, descriptor_targets, encode_dataset, fit_linear_predictors, global_attribution
    from lit_cf.data.celeba import CelebADataModule
    from lit_cf.utils.checkpoint import load_module

    root = celeba_root(Path(args.celeba_root))
    base = out / "celeba"
    data = [f"--config={C / 'data/celeba.yaml'}", f"--data.init_args.root={root}"]
    limit_n = args.celeba_train_limit or args.train_limit
    limit = [f"--data.init_args.limit={limit_n}"] if limit_n else []
    if args.celeba_classifier == "resnet18":
        clf_cfg = [f"--config={C / 'model/resnet18_celeba.yaml'}"]
    else:  # the small CNN of configs/model/cnn.yaml for 64 px RGB and two classes (CPU runs)
        clf_cfg = [
            f"--config={C / 'model/cnn.yaml'}",
            "--model.init_args.num_classes=2",
            "--model.init_args.backbone.init_args.in_channels=3",
            "--model.init_args.backbone.init_args.image_size=64",
            "--model.init_args.input_mean=[0.5,0.5,0.5]",
            "--model.init_args.input_std=[0.5,0.5,0.5]",
        ]
    t0 = time.time()
    ae_ckpt = fit(
        base / "models/autoencoder",
        data + limit,
        [f"--config={C / 'model/autoencoder_celeba.yaml'}"],
        args.celeba_ae_epochs or args.ae_epochs,
        args.seed,
        common,
    )
    clf_ckpt = fit(
        base / "models/classifier", data + limit, clf_cfg, args.celeba_clf_epochs or args.clf_epochs, args.seed, common
    )
    fit_s = time.time() - t0
    dm = CelebADataModule(root=str(root), batch_size=256, limit=limit_n)
    acc = accuracy(clf_ckpt, dm)
    test_labels = torch.cat([b["label"] for b in dm.loader("test")])
    majority = max(float(test_labels.float().mean()), 1 - float(test_labels.float().mean()))
    ae_mse = recon_mse(ae_ckpt, dm)
    print(
        f"\nCelebA Smiling classifier ({args.celeba_classifier}) test accuracy {acc:.2%} (majority class {majority:.2%}); "
        f"autoencoder test MSE {ae_mse:.4f}",
        flush=True,
    )

    # latent attribute predictors: logistic regression per attribute on the autoencoder's codes
    ae = load_module(ae_ckpt, L.LightningModule).eval()
    with torch.no_grad():
        train_ds, val_ds = dm.dataset("train"), dm.dataset("val")
        codes_train, codes_val = encode_dataset(ae, train_ds), encode_dataset(ae, val_ds)
    y_train, y_val = descriptor_targets(train_ds), descriptor_targets(val_ds)
    predictors = fit_linear_predictors(codes_train, y_train.values, y_train.kinds, y_train.names, l2=1e-2)
    predictors.save(base / "models/latent_attribute_predictors.safetensors")
    quality = predictors.quality(codes_val, y_val.values)
    base_rate = {
        n: max(float(y_val.values[:, j].mean()), 1 - float(y_val.values[:, j].mean())) for j, n in enumerate(y_val.names)
    }
    gain = sorted(quality, key=lambda n: quality[n] - base_rate[n], reverse=True)
    mean_acc = statistics.fmean(quality.values())
    mean_base = statistics.fmean(base_rate.values())
    print(
        f"latent attribute predictors ({len(quality)} attributes, {len(codes_train)} training codes): mean held-out accuracy "
        f"{mean_acc:.3f} vs majority {mean_base:.3f}; largest gains: "
        + ", ".join(f"{n} {quality[n]:.2f} (vs {base_rate[n]:.2f})" for n in gain[:6])
    )

    # correctly classified faces of one class towards the other
    runs = {
        "make_smile": ["--source_class=0", "--select=correct", "--target=1"],
        "remove_smile": ["--source_class=1", "--select=correct", "--target=0", "--model.init_args.decreasing=true"],
    }
    paths: dict[str, Path] = {}
    t0 = time.time()
    for name, sel in runs.items():
        run = base / "explain" / f"{name}-latent_attack"
        ok = lit_cf(
            "explain",
            *data,
            f"--config={C / 'explain/latent_attack.yaml'}",
            f"--model.init_args.generator={ae_ckpt}",
            f"--model.init_args.steps={args.celeba_steps}",
            f"--model.init_args.lr={args.celeba_lr}",
            f"--model.init_args.threshold={args.threshold}",
            *sel,
            f"--num_queries={args.celeba_queries}",
            "--on_source_equals_target=skip",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.accelerator={args.accelerator}",
            f"--trainer.default_root_dir={base}",
            f"--classifier={clf_ckpt}",
            f"--output_dir={run}",
            "--chunk_size=256",
            f"--seed={args.seed}",
            fatal=False,
        )
        if ok:
            paths[name] = run
    explain_s = time.time() - t0
    from lit_cf.explainers import ExplainRun

    stats, per_run, parts = {}, {}, []
    for name, path in paths.items():
        stats[name] = run_stats(path, args.threshold)
        run = ExplainRun(path)
        try:
            res = attribute_run(run, predictors, k=5, n_boot=args.n_boot, seed=args.seed)
        except Exception as err:  # no successful counterfactual
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
            n_boot=args.n_boot,
            seed=args.seed,
        )
    print(f"\nCelebA LatentAttack (lr {args.celeba_lr}, tau {args.threshold}, <= {args.celeba_steps} steps):")
    for name, st in stats.items():
        print(
            f"  {name:13s} n {st['n']:3d}  success {fmt(st.get('success_rate'), '{:.1%}')}  steps mean "
            f"{fmt(st.get('steps_mean'), '{:.1f}')} median {fmt(st.get('steps_median'), '{:.0f}')}"
        )
    if combined is not None:
        print(
            f"top global descriptors for Smiling (sign +1 towards smiling, -1 away; {sum(len(p[0]) for p in parts)} "
            "successful counterfactuals; 95% bootstrap CI):"
        )
        for i, (n, s, lo, hi) in enumerate(combined[: args.top_k]):
            print(f"  {i + 1:2d}. {n:22s} {s:+.3f} [{lo:+.3f}, {hi:+.3f}]  (predictor accuracy {quality[n]:.2f})")
    else:
        print("no successful counterfactuals: no global descriptors")
    return {
        "data_root": str(root),
        "checkpoints": {"autoencoder": str(ae_ckpt), "classifier": str(clf_ckpt)},
        "classifier": args.celeba_classifier,
        "test_accuracy": acc,
        "majority_baseline": majority,
        "autoencoder_test_mse": ae_mse,
        "predictor_quality": quality,
        "predictor_majority_baseline": base_rate,
        "runs": {k: str(v) for k, v in paths.items()},
        "attack_stats": stats,
        "global_per_run": per_run,
        "global_smiling": combined,
        "seconds": {"fit": round(fit_s, 1), "explain": round(explain_s, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Counterfactual Attacks reproduction (MNIST, CelebA)", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", default="data", help="data root holding MNIST/raw")
    parser.add_argument("--celeba-root", default="data", help="data root holding celeba/ (or the celeba folder itself)")
    parser.add_argument("--skip-celeba", action="store_true")
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--out", default=None, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace this script's earlier output in --out")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images of each split only")
    parser.add_argument("--ae-epochs", type=int, default=10)
    parser.add_argument("--clf-epochs", type=int, default=5)
    parser.add_argument("--no-oracle", action="store_true", help="MNIST: skip the wide CNN (oracle and fid_domain features)")
    parser.add_argument("--num-queries", type=int, default=None, help="MNIST: misclassified test images explained (default: all)")
    parser.add_argument("--pair-queries", type=int, default=50, help="MNIST: test images per digit pair")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument("--pair-steps", type=int, default=1000, help="paper's code: 5,000")
    parser.add_argument("--pair-threshold", type=float, default=0.75, help="paper's code: 0.5")
    parser.add_argument("--pixel-steps", type=int, default=None, help="PixelCounterfactual steps (default: as LatentAttack)")
    parser.add_argument("--celeba-classifier", choices=["resnet18", "cnn"], default="resnet18")
    parser.add_argument("--celeba-train-limit", type=int, default=None, help="default: --train-limit")
    parser.add_argument("--celeba-ae-epochs", type=int, default=None, help="default: --ae-epochs")
    parser.add_argument("--celeba-clf-epochs", type=int, default=None, help="default: --clf-epochs")
    parser.add_argument("--celeba-queries", type=int, default=64, help="queries per direction (make / remove a smile)")
    parser.add_argument("--celeba-steps", type=int, default=500, help="paper (StyleGAN3): 500")
    parser.add_argument("--celeba-lr", type=float, default=0.1, help="paper (StyleGAN3 latents): 0.01")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's choice)")
    args = parser.parse_args()
    if args.skip_mnist and args.skip_celeba:
        parser.error("nothing to do: --skip-mnist and --skip-celeba")
    # check the data before anything is written
    if not args.skip_mnist:
        check_mnist(Path(args.root))
    if not args.skip_celeba:
        celeba_root(Path(args.celeba_root))
    out = Path(args.out or f"runs/repro-cf-attacks-{time.strftime('%Y%m%d-%H%M%S')}")
    prepare_out(out, args.overwrite, OWNED, "repro_cf_attacks")
    set_threads(args.threads)
    common = [
        "--trainer.logger=false",
        f"--trainer.accelerator={args.accelerator}",
        "--sample_grid.num_samples=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    t0 = time.time()
    summary: dict[str, Any] = {"settings": {**vars(args), "out": str(out)}, "pairs": [f"{s}->{t}" for s, t in PAIRS]}
    if not args.skip_mnist:
        summary["mnist"] = mnist_part(args, out, common)
    if not args.skip_celeba:
        summary["celeba"] = celeba_part(args, out, common)
    summary["commands"] = COMMANDS
    summary["seconds_total"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nrepro_cf_attacks: summary in {out / 'summary.json'} ({summary['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
