"""Seconds per training epoch of DUQ vs a plain softmax CNN on the same data, side by side.

Both models use the DUQ paper's Fashion-MNIST feature extractor (conv64-BN-pool,
conv128-BN-pool, conv128-BN-pool, FC256), batch 128 and SGD, so the ratio measures what DUQ
adds: the RBF head, the gradient penalty (double backward) and the centroid update. The small
CNN of ``configs/model/cnn.yaml`` is timed too, for reference. Epochs alternate between models
so that machine load affects all alike; the median epoch time is reported.

Usage::

    python scripts/bench_fit.py                                   # built-in rendered digits
    python scripts/bench_fit.py --data fashion_mnist --root data  # staged Fashion-MNIST copy
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from lit_cf.data import FashionMNISTDataModule, MNISTDataModule, RenderedDigitsDataModule
from lit_cf.models import Classifier, ConvNet, DUQClassifier


def duq_backbone() -> ConvNet:
    return ConvNet(1, (64, 128, 128), 256, batch_norm=True)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def make_models() -> dict[str, L.LightningModule]:
    return {
        "cnn_same_backbone": Classifier(duq_backbone(), 10, optimizer=sgd),
        "duq": DUQClassifier(duq_backbone(), 10, embedding_size=256, length_scale=0.1, gp_weight=0.05, optimizer=sgd),
        "duq_reuse_features": DUQClassifier(
            duq_backbone(), 10, embedding_size=256, length_scale=0.1, gp_weight=0.05, centroid_features="reuse", optimizer=sgd
        ),
        "small_cnn": Classifier(ConvNet(1, (32, 64), 128), 10, optimizer=sgd),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["rendered", "mnist", "fashion_mnist"], default="rendered")
    parser.add_argument("--root", default="data", help="data root for mnist / fashion_mnist")
    parser.add_argument("--train-size", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model (after one warm-up epoch)")
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()

    if args.data == "rendered":
        dm = RenderedDigitsDataModule(train_size=args.train_size, val_size=10, test_size=10, batch_size=128)
    else:
        cls = MNISTDataModule if args.data == "mnist" else FashionMNISTDataModule
        dm = cls(root=args.root, batch_size=128, limit=args.train_size)
    loader = dm.loader("train", shuffle=True)
    # decode once so every model times the same tensors, not the loader
    batches = torch.utils.data.DataLoader(list(loader), batch_size=None)
    models = make_models()
    times: dict[str, list[float]] = {k: [] for k in models}
    trainers = {}
    for name, model in models.items():
        trainers[name] = L.Trainer(
            accelerator=args.accelerator, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )
        trainers[name].fit(model, train_dataloaders=batches)  # warm-up epoch
    device = trainers["duq"].strategy.root_device
    for epoch in range(args.epochs):
        for name, model in models.items():
            trainers[name].fit_loop.max_epochs += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainers[name].fit(model, train_dataloaders=batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["cnn_same_backbone"])
    print(f"\nbench_fit: {args.data}, {len(batches)} batches of 128 per epoch, device {device}, "
          f"torch threads {torch.get_num_threads()}, median of {args.epochs} epochs")
    print(f"{'model':<22}{'s/epoch':>10}{'ratio vs cnn_same_backbone':>30}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22}{med:>10.2f}{med / base:>30.2f}x")
    ratio = statistics.median(times["duq"]) / base
    print(f"\nDUQ / plain CNN (same backbone, reference centroid update): {ratio:.2f}x (goal <= 2.5x)")


if __name__ == "__main__":
    main()
