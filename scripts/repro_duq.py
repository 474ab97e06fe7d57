"""Reproduce the DUQ paper's Fashion-MNIST experiment, and DUQ on MNIST, from a data root.

Fashion-MNIST (paper: 92.4% test accuracy, AUROC 0.955 against MNIST): the paper's settings
(``configs/model/duq_cnn.yaml``): conv64/128/128 + BN, FC256, n = 256, sigma 0.1,
lambda 0.05, gamma 0.999, SGD lr 0.05 momentum 0.9 wd 1e-4, batch 128, 30 epochs with the
learning rate x0.2 at epochs 10 and 20. Inputs are normalised inside the model with
Fashion-MNIST's mean/std (0.2860, 0.3530), so OOD images go through the same normalisation.
OOD score = -max_c K_c, OOD positive. Also AUROC against every corruption of the Fashion-MNIST
test set (severity 1-5; mean over severities reported per corruption).

MNIST: the same recipe with MNIST's mean/std (0.1307, 0.3081); accuracy (goal >= 99.3%) and
AUROC against Fashion-MNIST and against the built-in rendered digits.

``--epochs`` shortens the schedule for a quick check: the milestones scale to 1/3 and 2/3 of
the epochs. Figures from a shortened run are not the paper's protocol; the printout says which
schedule ran.

Usage::

    bash scripts/prepare_data.sh ../shared/data data
    python scripts/repro_duq.py --root data                 # full protocol (30 epochs each)
    python scripts/repro_duq.py --root data --epochs 3      # quick check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import BinaryAUROC

from lit_cf.data import CORRUPTIONS, FashionMNISTDataModule, MNISTDataModule, RenderedDigitsDataModule
from lit_cf.data.base import ImageDataModule
from lit_cf.models import ConvNet, DUQClassifier

STATS = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}


def make_duq(dataset: str, epochs: int) -> DUQClassifier:
    milestones = [10, 20] if epochs == 30 else [max(1, round(epochs / 3)), max(2, round(2 * epochs / 3))]
    mean, std = STATS[dataset]
    return DUQClassifier(
        ConvNet(1, (64, 128, 128), 256, batch_norm=True),
        num_classes=10,
        embedding_size=256,
        length_scale=0.1,
        gamma=0.999,
        gp_weight=0.05,
        input_mean=mean,
        input_std=std,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
        scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=milestones, gamma=0.2),
    )


@torch.no_grad()
def certainties(model: DUQClassifier, dm: ImageDataModule, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(certainty, prediction, label) over a split."""
    cert, pred, label = [], [], []
    for batch in dm.loader(split):
        k = model.kernel(batch["image"].to(model.device))
        cert.append(k.amax(-1).cpu())
        pred.append(k.argmax(-1).cpu())
        label.append(batch["label"])
    return torch.cat(cert), torch.cat(pred), torch.cat(label)


def auroc(in_cert: torch.Tensor, ood_cert: torch.Tensor) -> float:
    scores = torch.cat([-in_cert, -ood_cert])
    labels = torch.cat([torch.zeros(len(in_cert)), torch.ones(len(ood_cert))]).long()
    return float(BinaryAUROC()(scores, labels))


def train(dataset: str, root: str, epochs: int, accelerator: str, workdir: Path) -> DUQClassifier:
    cls = FashionMNISTDataModule if dataset == "fashion_mnist" else MNISTDataModule
    dm = cls(root=root, batch_size=128, val_size=1000, seed=0)
    model = make_duq(dataset, epochs)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, logger=False, default_root_dir=workdir,
        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=True,
    )
    trainer.fit(model, datamodule=dm)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description="DUQ reproduction (Fashion-MNIST vs MNIST, MNIST vs Fashion-MNIST)")
    parser.add_argument("--root", default="data", help="data root holding FashionMNIST/ and MNIST/ (writable)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--only", choices=["fashion_mnist", "mnist"], default=None)
    parser.add_argument("--out", default="runs/repro_duq", help="folder for results.json (a new file per run)")
    args = parser.parse_args()
    L.seed_everything(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"epochs": args.epochs, "protocol": "paper" if args.epochs == 30 else "shortened"}
    fm_test = FashionMNISTDataModule(root=args.root, batch_size=512)
    mn_test = MNISTDataModule(root=args.root, batch_size=512)

    if args.only in (None, "fashion_mnist"):
        start = time.time()
        model = train("fashion_mnist", args.root, args.epochs, args.accelerator, out)
        cert, pred, label = certainties(model, fm_test)
        res = {"accuracy": float((pred == label).float().mean()), "train_seconds": time.time() - start}
        res["auroc_vs_mnist"] = auroc(cert, certainties(model, mn_test)[0])
        corr = {}
        for name in CORRUPTIONS:
            per_sev = []
            for severity in range(1, 6):
                dm = FashionMNISTDataModule(root=args.root, batch_size=512, test_corruption=name, corruption_severity=severity)
                per_sev.append(auroc(cert, certainties(model, dm)[0]))
            corr[name] = {"mean": sum(per_sev) / 5, "by_severity": per_sev}
        res["auroc_vs_corrupted_fashion_mnist"] = corr
        results["fashion_mnist"] = res

    if args.only in (None, "mnist"):
        start = time.time()
        model = train("mnist", args.root, args.epochs, args.accelerator, out)
        cert, pred, label = certainties(model, mn_test)
        rendered = RenderedDigitsDataModule(test_size=10000, train_size=10, val_size=10, batch_size=512)
        results["mnist"] = {
            "accuracy": float((pred == label).float().mean()),
            "train_seconds": time.time() - start,
            "auroc_vs_fashion_mnist": auroc(cert, certainties(model, fm_test)[0]),
            "auroc_vs_rendered_digits": auroc(cert, certainties(model, rendered)[0]),
        }

    path = out / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nrepro_duq ({results['protocol']} schedule, {args.epochs} epochs); results in {path}")
    if "fashion_mnist" in results:
        r = results["fashion_mnist"]
        print(f"Fashion-MNIST  accuracy {r['accuracy']:.4f} (paper 0.924)   AUROC vs MNIST {r['auroc_vs_mnist']:.4f} (paper 0.955)")
        for name, c in r["auroc_vs_corrupted_fashion_mnist"].items():
            print(f"   AUROC vs {name:<15} mean {c['mean']:.4f}   by severity " + " ".join(f"{v:.3f}" for v in c["by_severity"]))
    if "mnist" in results:
        r = results["mnist"]
        print(f"MNIST          accuracy {r['accuracy']:.4f} (goal >= 0.993)   AUROC vs Fashion-MNIST "
              f"{r['auroc_vs_fashion_mnist']:.4f}   AUROC vs rendered digits {r['auroc_vs_rendered_digits']:.4f}")


if __name__ == "__main__":
    main()
