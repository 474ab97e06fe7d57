"""Decision-boundary learning (DISC's second claim): students trained on counterfactuals only.

The teacher is a classifier trained with `lit-cf fit` (reused from ``--models``, e.g. the
models folder of scripts/ablate_disc.py, or trained here). Queries come from the *validation*
split (never seen in the teacher's training, disjoint from the test set the students are
scored on). For each method (DISC, ISO, DeepInversion by default) the same queries are
explained towards the same targets (``--targets``: ``most_likely_other`` or ``all`` other
classes); a student with the teacher's architecture is then trained with `lit-cf fit` on
``lit_cf.data.CounterfactualDataModule``: the queries plus their counterfactuals, labelled by
the teacher. One table, one run: student accuracy on the clean test set, agreement with the
teacher (clean), and accuracy under every corruption of lit_cf.data.corruptions at severities
1-5 (mean over all, and per corruption averaged over severities), on the first
``--test-size`` test images.

Usage::

    python scripts/student_disc.py --root data --out runs/student-mnist --models runs/ablate-mnist/models --queries 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C = ROOT / "configs"

METHODS = {
    # name -> explain config and overrides
    "disc": ("explain/disc.yaml", ["--model.init_args.prior=dip", "--model.init_args.progressive=true"]),
    "iso": (
        "explain/disc.yaml",
        [
            "--model.init_args.prior=pixels",
            "--model.init_args.feature_weight=0",
            "--model.init_args.mc_weight=0",
            "--model.init_args.progressive=false",
        ],
    ),
    "deepinversion": ("explain/deepinversion.yaml", ["--model.init_args.stop_probability=0.8"]),
}


def lit_cf(*args: str) -> None:
    print("$ lit-cf " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lit_cf", *args], check=True)


def fit_model(folder: Path, data: list[str], cfg: list[str], epochs: int, seed: int, accelerator: str, extra: list[str]) -> Path:
    if not (folder / "last.ckpt").exists():
        lit_cf(
            "fit",
            *data,
            *cfg,
            *extra,
            "--trainer.logger=false",
            f"--trainer.accelerator={accelerator}",
            "--sample_grid.num_samples=0",
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={folder}",
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={folder}",
            "--trainer.callbacks.filename=last",
            "--trainer.enable_progress_bar=false",
        )
    return folder / "last.ckpt"


def score(student_ckpt: Path, teacher_ckpt: Path, root: str, test_size: int, severities: list[int]) -> dict:
    """Clean accuracy, agreement with the teacher, and accuracy under every corruption x severity."""
    import torch

    from lit_cf.data import CORRUPTIONS, MNISTDataModule, corrupt
    from lit_cf.models.base import ImageClassifier
    from lit_cf.utils.checkpoint import load_module

    student, teacher = load_module(student_ckpt, ImageClassifier).eval(), load_module(teacher_ckpt, ImageClassifier).eval()
    test = MNISTDataModule(root=root, download=True).dataset("test")
    n = min(test_size, len(test))
    images = torch.stack([test[i]["image"] for i in range(n)])
    labels = torch.tensor([int(test[i]["label"]) for i in range(n)])

    @torch.no_grad()
    def predict(model, x):
        return torch.cat([model(x[i : i + 512]).argmax(-1) for i in range(0, len(x), 512)])

    s_clean, t_clean = predict(student, images), predict(teacher, images)
    out = {"clean_acc": float((s_clean == labels).float().mean()), "agreement": float((s_clean == t_clean).float().mean())}
    per = {}
    for name in CORRUPTIONS:
        accs = []
        for sev in severities:
            x = corrupt(images, name, sev, seed=0)  # batched, per-sample seeds: the same images for every student
            accs.append(float((predict(student, x) == labels).float().mean()))
        per[name] = sum(accs) / len(accs)
    out["corrupted_acc"] = sum(per.values()) / len(per)
    out["per_corruption"] = per
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="students trained on counterfactuals (MNIST)")
    parser.add_argument("--root", default="data")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--models", default=None, help="folder with classifier/last.ckpt and duq/last.ckpt (trained when absent)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--queries", type=int, default=256, help="validation images used as queries")
    parser.add_argument("--targets", default="most_likely_other", choices=["most_likely_other", "all"])
    parser.add_argument("--steps", type=int, default=50, help="steps per DISC stage (x4 for the one-stage methods)")
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--dip-channels", type=int, default=16)
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--severities", default="1,2,3,4,5")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"student_disc: {out} exists; choose a new --out")
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        sys.exit(f"student_disc: methods must come from {list(METHODS)}")
    if not (Path(args.root) / "MNIST").is_dir():
        sys.exit(f"student_disc: no MNIST folder under {args.root}; run: bash scripts/prepare_data.sh ../shared/data {args.root}")
    models = Path(args.models or out / "models")
    data = [f"--config={C / 'data/mnist.yaml'}", f"--data.init_args.root={args.root}"]
    teacher = fit_model(
        models / "classifier", data, [f"--config={C / 'model/cnn.yaml'}"], args.teacher_epochs, 0, args.accelerator, []
    )
    small_duq = [
        f"--config={C / 'model/duq_cnn.yaml'}",
        "--model.init_args.backbone.init_args.channels=[32,64,64]",
        "--model.init_args.backbone.init_args.hidden=128",
        "--model.init_args.embedding_size=128",
    ]
    duq = fit_model(models / "duq", data, small_duq, 1, 0, args.accelerator, [])

    results, seconds = {}, {}
    for m in methods:
        cfg, overrides = METHODS[m]
        run = out / "explain" / m
        common = [f"--model.init_args.steps={args.steps * (1 if m == 'disc' else 4)}"]
        if cfg.endswith("disc.yaml"):
            common += [
                f"--model.init_args.duq={duq}",
                f"--model.init_args.fit_steps={args.fit_steps}",
                f"--model.init_args.dip_channels={args.dip_channels}",
            ]
        start = time.perf_counter()
        lit_cf(
            "explain",
            *data,
            f"--config={C / cfg}",
            *common,
            *overrides,
            "--trainer.logger=false",
            f"--trainer.accelerator={args.accelerator}",
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false",
            f"--classifier={teacher}",
            f"--output_dir={run}",
            "--split=val",
            f"--num_queries={args.queries}",
            f"--target={args.targets}",
            f"--chunk_size={args.chunk_size}",
        )
        seconds[m] = time.perf_counter() - start
        student = fit_model(
            out / "students" / m,
            [
                "--data=lit_cf.data.CounterfactualDataModule",
                f"--data.init_args.runs=[{run}]",
                "--data.init_args.num_classes=10",
                "--data.init_args.batch_size=64",
            ],
            [f"--config={C / 'model/cnn.yaml'}"],
            args.student_epochs,
            1,
            args.accelerator,
            [],
        )
        results[m] = score(student, teacher, args.root, args.test_size, [int(s) for s in args.severities.split(",")])
        results[m]["explain_seconds"] = seconds[m]
        results[m]["success"] = sum(json.loads(line)["success"] for line in (run / "manifest.jsonl").read_text().splitlines())
    header = [
        "method",
        "clean acc",
        "agreement",
        "corrupted acc (mean)",
        *list(next(iter(results.values()))["per_corruption"]),
        "explain s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, r in results.items():
        vals = [r["clean_acc"], r["agreement"], r["corrupted_acc"], *r["per_corruption"].values()]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {r['explain_seconds']:.0f} |")
    md = "\n".join(lines)
    (out / "students.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (out / "students.md").write_text(md + "\n")
    print(
        f"\nstudents trained on {args.queries} validation queries + their counterfactuals ({args.targets}); "
        f"scored on {args.test_size} test images\n{md}"
    )


if __name__ == "__main__":
    main()
