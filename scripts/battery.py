"""Benchmark battery: train what is needed with `lit-cf fit`, explain with every method, evaluate.

From a data root (MNIST) or on the built-in rendered digits, this trains a standard CNN, a
robust (L2 PGD) CNN, an oracle suite (a CNN of another seed, a wider BatchNorm CNN, a second
robust CNN), a DUQ model and an autoencoder (the generator of LatentAttack); explains test
images of both explained classifiers with every method available (pixel, DeepInversion,
LatentAttack); evaluates all runs together (oracles, fid_domain on the wide oracle's features,
DUQ certainty) and prints the comparison table.

Expected on MNIST (Vaeth et al. 2023): counterfactuals of the robust classifier transfer to
the oracles (OTA) far better than those of the standard classifier.

Usage::

    bash scripts/prepare_data.sh ../shared/data data
    python scripts/battery.py --data mnist --root data --out runs/battery-mnist
    python scripts/battery.py --data rendered --out runs/battery-rendered
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C = ROOT / "configs"
METHODS = ("pixel", "deepinversion", "latent_attack")


def lit_cf(*args: str) -> None:
    cmd = [sys.executable, "-m", "lit_cf", *args]
    print("$ lit-cf " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="lit-cf benchmark battery")
    parser.add_argument("--data", choices=["mnist", "rendered"], default="rendered")
    parser.add_argument("--root", default="data", help="data root (mnist)")
    parser.add_argument("--out", default=None, help="output folder (new)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the standard models")
    parser.add_argument("--robust-epochs", type=int, default=1)
    parser.add_argument("--duq-epochs", type=int, default=1)
    parser.add_argument("--ae-epochs", type=int, default=5, help="epochs of the autoencoder (LatentAttack's generator)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--train-limit", type=int, default=None, help="train every model on the first N images only")
    args = parser.parse_args()
    out = Path(args.out or f"runs/battery-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        sys.exit(f"battery: {out} exists; choose a new --out")
    data = [f"--config={C / f'data/{args.data}.yaml'}"]
    if args.data == "mnist":
        data.append(f"--data.init_args.root={args.root}")
    common = ["--trainer.logger=false", f"--trainer.accelerator={args.accelerator}", "--sample_grid.num_samples=0"]

    models = {
        "standard": ("model/cnn.yaml", args.epochs, 0),
        "robust": ("model/robust_cnn.yaml", args.robust_epochs, 0),
        "oracle_cnn": ("model/cnn.yaml", args.epochs, 1),
        "oracle_wide": ("model/cnn_wide.yaml", args.epochs, 2),
        "oracle_robust": ("model/robust_cnn.yaml", args.robust_epochs, 3),
        "duq": ("model/duq_cnn.yaml", args.duq_epochs, 0),
        "autoencoder": ("model/autoencoder.yaml", args.ae_epochs, 0),
    }
    ckpt = {}
    for name, (cfg, epochs, seed) in models.items():
        folder = out / "models" / name
        limit = [f"--data.init_args.limit={args.train_limit}"] if args.train_limit else []
        lit_cf(
            "fit",
            *data,
            f"--config={C / cfg}",
            *common,
            *limit,
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={folder}",
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={folder}",
            "--trainer.callbacks.filename=last",
        )
        ckpt[name] = folder / "last.ckpt"

    runs, names = [], []
    for clf in ("standard", "robust"):
        for method in METHODS:
            run = out / "explain" / f"{clf}-{method}"
            # LatentAttack optimises the autoencoder's latent code (the paper's MNIST setting: lr 0.1, tau 0.75)
            generator = [f"--model.init_args.generator={ckpt['autoencoder']}"] if method == "latent_attack" else []
            lit_cf(
                "explain",
                *data,
                f"--config={C / f'explain/{method}.yaml'}",
                *generator,
                "--trainer.logger=false",
                f"--trainer.accelerator={args.accelerator}",
                f"--trainer.default_root_dir={out}",
                f"--classifier={ckpt[clf]}",
                f"--output_dir={run}",
                f"--num_queries={args.queries}",
                f"--model.init_args.steps={args.steps}",
                "--chunk_size=256",
            )
            runs.append(str(run))
            names.append(f"{clf}/{method}")
    oracles = "{" + ", ".join(f"{k}: {ckpt[k]}" for k in ("oracle_cnn", "oracle_wide", "oracle_robust")) + "}"
    lit_cf(
        "evaluate",
        *data,
        "--trainer.logger=false",
        f"--trainer.accelerator={args.accelerator}",
        f"--runs=[{','.join(runs)}]",
        f"--names=[{','.join(names)}]",
        f"--output_dir={out / 'evaluate'}",
        f"--oracles={oracles}",
        f"--feature_network={ckpt['oracle_wide']}",
        f"--duq={ckpt['duq']}",
    )
    print(f"\nbattery: report {out / 'evaluate' / 'report.html'}")


if __name__ == "__main__":
    main()
