"""The DUQ paper's protocol from the shipped configs: Fashion-MNIST (vs MNIST) and MNIST (vs Fashion-MNIST).

The model, optimizer and schedule come from the configs, not from this script:
``configs/model/duq_cnn.yaml`` (Fashion-MNIST; the authors' network and initialisation,
normalisation 0.2861 / 0.3530 inside the model) and ``configs/model/duq_cnn_mnist.yaml``
(MNIST, 0.1307 / 0.3081), with ``configs/data/{fashion_mnist,mnist}.yaml`` (5,000 training
images held out, batch 128) and ``configs/trainer/duq_paper.yaml`` (30 epochs). Paper targets:
Fashion-MNIST accuracy 92.4%, AUROC vs MNIST 0.955; MNIST accuracy >= 99.3% (our goal).

After every ``--eval-every`` epochs the test accuracy (10,000 images) and the AUROC against the
other dataset's test split (OOD positive, score ``-max_c K_c``; the OOD images go through the
model's own normalisation) are added to the curve, which lives in the checkpoint (so a resumed
run keeps it) and in ``<out>/<dataset>/curve.json``.

Resuming: every epoch writes ``<out>/<dataset>/checkpoints/last.ckpt``; run the same command
with ``--ckpt_path last`` to continue an interrupted run (or one stopped by ``--stop-after`` or
``--time-budget``) where it stopped. Without it, a dataset folder that already holds a checkpoint
is refused.

``--epochs`` shortens the schedule for a quick check (milestones at 1/3 and 2/3); the output
says which schedule ran. Arguments this script does not know are passed to the lit-cf config
parser, e.g. ``--model.init_args.backbone.init_args.channels=[8,16,16]``.

Usage::

    python scripts/repro_duq.py --root data                          # both datasets, 30 epochs each
    python scripts/repro_duq.py --root data --only fashion_mnist --stop-after 1   # one epoch, then
    python scripts/repro_duq.py --root data --only fashion_mnist --ckpt_path last  # ... resume
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torchmetrics.classification import BinaryAUROC

from lit_cf.cli import build_cli
from lit_cf.data import CORRUPTIONS, FashionMNISTDataModule, MNISTDataModule, RenderedDigitsDataModule
from lit_cf.data.base import ImageDataModule
from lit_cf.explainers.rundir import atomic_write_text
from lit_cf.models import DUQClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DATASETS = {
    # dataset: (data config, model config, OOD datamodule class, paper/goal figures)
    "fashion_mnist": ("data/fashion_mnist.yaml", "model/duq_cnn.yaml", MNISTDataModule, "accuracy 0.924, AUROC 0.955"),
    "mnist": ("data/mnist.yaml", "model/duq_cnn_mnist.yaml", FashionMNISTDataModule, "accuracy >= 0.993"),
}
PAPER_EPOCHS = 30


@torch.no_grad()
def certainties(
    model: DUQClassifier, dm: ImageDataModule, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(certainty ``max_c K_c``, prediction, label) over a split; images normalised by the model."""
    was_training = model.training
    model.eval()
    cert, pred, label = [], [], []
    for batch in dm.loader(split):
        k = model.kernel(batch["image"].to(model.device))
        cert.append(k.amax(-1).cpu())
        pred.append(k.argmax(-1).cpu())
        label.append(batch["label"])
    model.train(was_training)
    return torch.cat(cert), torch.cat(pred), torch.cat(label)


def auroc(in_cert: torch.Tensor, ood_cert: torch.Tensor) -> float:
    """AUROC with OOD as the positive class and ``-certainty`` as the score."""
    scores = torch.cat([-in_cert, -ood_cert])
    labels = torch.cat([torch.zeros(len(in_cert)), torch.ones(len(ood_cert))]).long()
    return float(BinaryAUROC()(scores, labels))


class EpochCurve(Callback):
    """Test accuracy and OOD AUROC after every ``every`` epochs; the curve is saved in checkpoints.

    Args:
        test_data: In-distribution datamodule (its ``test`` split is evaluated).
        ood_data: Out-of-distribution datamodule (its ``test`` split).
        path: JSON file rewritten (atomically) with the curve after every evaluation.
        every: Evaluate every this many epochs (and after the last one).
        stop_after: Stop training once this many epochs are done in total (``None``: never).
        time_budget: Seconds this run may train: stop after an epoch when another epoch (at the
            pace of the last one) would not fit, so only whole epochs are run (``None``: no box).
    """

    def __init__(
        self,
        test_data: ImageDataModule,
        ood_data: ImageDataModule,
        path: Path,
        every: int = 1,
        stop_after: int | None = None,
        time_budget: float | None = None,
    ) -> None:
        self.test_data, self.ood_data, self.path, self.every = test_data, ood_data, path, every
        self.stop_after, self.time_budget = stop_after, time_budget
        self.curve: list[dict[str, float]] = []
        self.epoch_start = self.run_start = 0.0
        self.lr = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.perf_counter()
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs done
        seconds = time.perf_counter() - self.epoch_start
        if epoch % self.every == 0 or epoch == trainer.max_epochs or epoch == self.stop_after:
            start = time.perf_counter()
            cert, pred, label = certainties(pl_module, self.test_data)
            row = {
                "epoch": epoch,
                "accuracy": float((pred == label).float().mean()),
                "auroc_ood": auroc(cert, certainties(pl_module, self.ood_data)[0]),
                "train_seconds": round(seconds, 2),
                "eval_seconds": round(time.perf_counter() - start, 2),
                "lr": self.lr,
            }
            self.curve = [r for r in self.curve if r["epoch"] != epoch] + [row]
            atomic_write_text(self.path, json.dumps(self.curve, indent=1))
            print(
                f"epoch {epoch:>3}  accuracy {row['accuracy']:.4f}  AUROC {row['auroc_ood']:.4f}  "
                f"({seconds:.1f} s training, {row['eval_seconds']:.1f} s evaluation)",
                flush=True,
            )
        if self.stop_after is not None and epoch >= self.stop_after:
            trainer.should_stop = True
        now = time.perf_counter()
        if self.time_budget is not None and (now - self.run_start) + (now - self.epoch_start) > self.time_budget:
            trainer.should_stop = True
            print(f"time budget {self.time_budget:.0f} s: stopping after epoch {epoch}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict["curve"])


def build(dataset: str, root: str, epochs: int, overrides: list[str]) -> tuple[DUQClassifier, ImageDataModule]:
    """The model and datamodule of ``dataset``, instantiated from the shipped configs (seed 0)."""
    data_cfg, model_cfg, _, _ = DATASETS[dataset]
    args = [
        f"--config={CONFIGS / data_cfg}",
        f"--config={CONFIGS / model_cfg}",
        f"--config={CONFIGS / 'trainer/duq_paper.yaml'}",
        f"--data.init_args.root={root}",
        "--trainer.logger=false",
    ]
    if epochs != PAPER_EPOCHS:  # shortened schedule: milestones at 1/3 and 2/3
        args.append(
            f"--model.init_args.scheduler.init_args.milestones=[{max(1, round(epochs / 3))},{max(2, round(2 * epochs / 3))}]"
        )
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI parses `args` only (and warns if sys.argv has more)
    try:
        cli = build_cli(args + overrides, run=False)
    finally:
        sys.argv = argv
    if not isinstance(cli.model, DUQClassifier):
        sys.exit(f"repro_duq: {model_cfg} does not build a DUQClassifier")
    return cli.model, cli.datamodule


def run_dataset(dataset: str, args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    workdir = Path(args.out) / dataset
    ckpt_dir = workdir / "checkpoints"
    if args.ckpt_path is None and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        sys.exit(f"repro_duq: {workdir} already holds a run; resume it with --ckpt_path last or choose a new --out")
    model, dm = build(dataset, args.root, args.epochs, overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    ood_cls = DATASETS[dataset][2]
    ood, test_dm = ood_cls(root=args.root, batch_size=1000), type(dm)(root=args.root, batch_size=1000)
    curve = EpochCurve(test_dm, ood, workdir / "curve.json", args.eval_every, args.stop_after, args.time_budget)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        default_root_dir=workdir,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=args.progress,
        enable_model_summary=False,
        precision=args.precision,
        callbacks=[curve, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_epochs=1)],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=args.ckpt_path)
    epochs_done = trainer.current_epoch
    res: dict[str, Any] = {
        "epochs_done": epochs_done,
        "finished": epochs_done >= args.epochs,
        "seconds_this_run": round(time.perf_counter() - start, 1),
        "curve": curve.curve,
        "config": [DATASETS[dataset][0], DATASETS[dataset][1], "trainer/duq_paper.yaml", *overrides],
        "goal": DATASETS[dataset][3],
    }
    if curve.curve:
        res["accuracy"], res["auroc_ood"] = curve.curve[-1]["accuracy"], curve.curve[-1]["auroc_ood"]
    model.eval()
    if res["finished"] and args.corruptions and dataset == "fashion_mnist":
        cert = certainties(model, test_dm)[0]
        corr = {}
        for name in CORRUPTIONS:
            per_sev = [
                auroc(
                    cert,
                    certainties(
                        model,
                        FashionMNISTDataModule(root=args.root, batch_size=1000, test_corruption=name, corruption_severity=s),
                    )[0],
                )
                for s in range(1, 6)
            ]
            corr[name] = {"mean": sum(per_sev) / 5, "by_severity": per_sev}
        res["auroc_vs_corrupted_fashion_mnist"] = corr
    if res["finished"] and args.corruptions and dataset == "mnist":
        rendered = RenderedDigitsDataModule(test_size=10000, train_size=10, val_size=10, batch_size=1000)
        res["auroc_vs_rendered_digits"] = auroc(certainties(model, test_dm)[0], certainties(model, rendered)[0])
    atomic_write_text(workdir / "result.json", json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="data root holding FashionMNIST/ and MNIST/ (writable)")
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="schedule length (30: the paper's)")
    parser.add_argument("--only", choices=list(DATASETS), default=None)
    parser.add_argument("--out", default="runs/repro_duq", help="folder with one sub-folder per dataset")
    parser.add_argument("--ckpt_path", default=None, help="'last' resumes each dataset's run from its last.ckpt")
    parser.add_argument("--stop-after", type=int, default=None, help="stop once this many epochs are done (resume later)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training per dataset and run; stops after the last whole epoch that fits",
    )
    parser.add_argument("--eval-every", type=int, default=1, help="add a curve point every this many epochs")
    parser.add_argument(
        "--corruptions", action="store_true", help="after a finished run also AUROC vs corrupted Fashion-MNIST / rendered digits"
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    args, overrides = parser.parse_known_args(argv)
    if args.epochs < 1 or args.eval_every < 1 or (args.stop_after is not None and args.stop_after < 1):
        parser.error("--epochs, --eval-every and --stop-after must be >= 1")
    if args.ckpt_path not in (None, "last"):
        parser.error("--ckpt_path takes 'last' (each dataset resumes from its own checkpoints folder)")
    bad = [o for o in overrides if not o.startswith(("--model.", "--data.", "--seed_everything"))]
    if bad:
        parser.error(f"unknown arguments {bad} (only --model.* / --data.* / --seed_everything overrides are passed on)")
    results: dict[str, Any] = {"epochs": args.epochs, "protocol": "paper" if args.epochs == PAPER_EPOCHS else "shortened"}
    for dataset in DATASETS if args.only is None else [args.only]:
        results[dataset] = run_dataset(dataset, args, overrides)
    path = Path(args.out) / "results.json"
    atomic_write_text(path, json.dumps(results, indent=1))
    print(f"\nrepro_duq ({results['protocol']} schedule, {args.epochs} epochs); results in {path}")
    for dataset in DATASETS:
        if dataset in results and "accuracy" in results[dataset]:
            r = results[dataset]
            print(
                f"{dataset:<14} after {r['epochs_done']:>2} epochs: accuracy {r['accuracy']:.4f}  "
                f"AUROC vs {'MNIST' if dataset == 'fashion_mnist' else 'Fashion-MNIST'} {r['auroc_ood']:.4f}  "
                f"(goal: {r['goal']})"
            )
    return results


if __name__ == "__main__":
    main()
