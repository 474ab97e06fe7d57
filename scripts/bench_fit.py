"""Seconds per training epoch of DUQ vs a plain softmax CNN on the same data, side by side.

The DUQ rows are built from ``configs/model/duq_cnn.yaml`` (the authors' Fashion-MNIST network:
conv64-BN-pool, conv128-BN-pool, unpadded conv128-BN-pool, FC 512 -> 256; W N(0, 0.05),
centroids N(0, 1), the incomplete last batch dropped) and compared with a softmax classifier on
the same extractor, batch 128 and SGD, so the ratio measures what DUQ adds: the RBF head, the
gradient penalty (double backward) and the centroid update. Rows:

* ``cnn_same_backbone`` / ``duq``: the reference network (the ratio the issue tracks);
* ``duq_reuse_features``: the centroid update reuses the training pass's features (no second
  forward pass; not the reference);
* ``duq_channels_last``: the same DUQ with model and images in channels-last memory format;
* ``cnn_padded`` / ``duq_padded``: the network lit-cf shipped before it matched the reference
  (every conv padded, FC 1152 -> 256, Kaiming W, centroids of std 0.05): the "before" ratio;
* ``small_cnn``: ``configs/model/cnn.yaml``'s small CNN, for reference.

Epochs alternate between models so that machine load affects all alike; the median epoch time
is reported. ``--profile N`` adds a torch.profiler table of N DUQ training steps (where the
double backward goes).

Usage::

    python scripts/bench_fit.py                                   # built-in rendered digits
    python scripts/bench_fit.py --data fashion_mnist --root data  # staged Fashion-MNIST copy
    python scripts/bench_fit.py --accelerator gpu --json out/bench_fit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import instantiate_module

from lit_cf.data import FashionMNISTDataModule, MNISTDataModule, RenderedDigitsDataModule
from lit_cf.models import Classifier, ConvNet, DUQClassifier

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PADDING = (1, 1, 0)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def paper_duq(**overrides: Any) -> DUQClassifier:
    """DUQ exactly as ``configs/model/duq_cnn.yaml`` (without its LR schedule)."""
    init_args = yaml.safe_load((ROOT / "configs/model/duq_cnn.yaml").read_text())["model"]["init_args"]
    init_args.pop("scheduler", None)
    model = instantiate_module(DUQClassifier, {**init_args, **overrides})
    model.optimizer_factory = sgd
    return model


def make_models() -> dict[str, L.LightningModule]:
    padded = dict(in_channels=1, channels=(64, 128, 128), hidden=256, batch_norm=True)
    return {
        "cnn_same_backbone": Classifier(ConvNet(**padded, padding=REFERENCE_PADDING), 10, optimizer=sgd),
        "duq": paper_duq(),
        "duq_reuse_features": paper_duq(centroid_features="reuse"),
        "duq_channels_last": paper_duq().to(memory_format=torch.channels_last),
        "cnn_padded": Classifier(ConvNet(**padded), 10, optimizer=sgd),
        "duq_padded": DUQClassifier(ConvNet(**padded), 10, embedding_size=256, length_scale=0.1, gp_weight=0.05, optimizer=sgd),
        "small_cnn": Classifier(ConvNet(1, (32, 64), 128), 10, optimizer=sgd),
    }


def profile_duq(batch: dict[str, torch.Tensor], steps: int, device: torch.device) -> list[dict[str, Any]]:
    """torch.profiler over ``steps`` DUQ training steps (forward, penalty, backward, SGD, centroids)."""
    from torch.profiler import ProfilerActivity, profile

    model = paper_duq().to(device)
    model.log = lambda *a, **k: None  # no trainer attached
    opt = sgd(model.parameters())
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> None:
        loss = model.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.on_train_batch_end(None, batch, 0)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20))
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in rows) or 1
    return [{"op": e.key, "share": getattr(e, key) / total, "calls": e.count} for e in rows[:20]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["rendered", "mnist", "fashion_mnist"], default="rendered")
    parser.add_argument("--root", default="data", help="data root for mnist / fashion_mnist")
    parser.add_argument("--train-size", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model (after one warm-up epoch)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--models", default=None, help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--profile", type=int, default=0, help="also profile this many DUQ steps (torch.profiler)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    if args.data == "rendered":
        dm = RenderedDigitsDataModule(train_size=args.train_size, val_size=10, test_size=10, batch_size=128)
    else:
        cls = MNISTDataModule if args.data == "mnist" else FashionMNISTDataModule
        dm = cls(root=args.root, batch_size=128, limit=args.train_size)
    loader = dm.loader("train", shuffle=True)
    # decode once so every model times the same tensors, not the loader
    batches = list(loader)
    channels_last = [{**b, "image": b["image"].contiguous(memory_format=torch.channels_last)} for b in batches]
    models = make_models()
    if args.models:
        keep = args.models.split(",")
        unknown = set(keep) - set(models) - {"cnn_same_backbone", "duq"}
        if unknown:
            parser.error(f"unknown --models {sorted(unknown)}; choose from {list(models)}")
        models = {k: v for k, v in models.items() if k in keep or k in ("cnn_same_backbone", "duq")}
    times: dict[str, list[float]] = {k: [] for k in models}
    trainers, data = {}, {}
    for name, model in models.items():
        data[name] = torch.utils.data.DataLoader(channels_last if name.endswith("channels_last") else batches, batch_size=None)
        trainers[name] = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainers[name].fit(model, train_dataloaders=data[name])  # warm-up epoch
    device = trainers["duq"].strategy.root_device
    for _ in range(args.epochs):
        for name, model in models.items():
            trainers[name].fit_loop.max_epochs += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainers[name].fit(model, train_dataloaders=data[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["cnn_same_backbone"]
    print(
        f"\nbench_fit: {args.data}, {len(batches)} batches of up to 128 per epoch, device {device}, "
        f"torch threads {torch.get_num_threads()}, median of {args.epochs} epochs"
    )
    print(f"{'model':<22}{'s/epoch':>10}{'ratio vs cnn_same_backbone':>30}")
    for name in models:
        print(f"{name:<22}{med[name]:>10.2f}{med[name] / base:>30.2f}x")
    ratio = med["duq"] / base
    print(f"\nDUQ / plain CNN (reference network, reference centroid update): {ratio:.2f}x (goal <= 2.5x)")
    figures: dict[str, Any] = {
        "data": args.data,
        "batches_per_epoch": len(batches),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timed_epochs": args.epochs,
        "seconds_per_epoch": med,
        "epoch_times": times,
        "duq_over_cnn": ratio,
    }
    if "duq_padded" in med and "cnn_padded" in med:
        figures["duq_over_cnn_padded_before"] = med["duq_padded"] / med["cnn_padded"]
        print(f"before the reference fix (padded network, each vs its own CNN): {figures['duq_over_cnn_padded_before']:.2f}x")
    if args.profile:
        figures["profile_top_ops"] = profile_duq(batches[0], args.profile, device)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
