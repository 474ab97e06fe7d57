"""Round-trip table of a DDPM for a classifier: C(F_tau(x)) = C(x) for several tau, plus a sample grid.

``F_tau`` noises an image to ``tau`` and denoises it unguided (DDIM); the share of images whose
prediction survives is ACE's criterion for choosing ``tau`` (:func:`lit_cf.models.diffusion.round_trip_scores`).

``--ceiling-epochs N`` adds a column that separates the denoiser's failures from what the noise
itself destroys: DDIM is deterministic, so ``C(F_tau(x))`` is a function of the noisy image
``x_tau``, and the round trip can keep no larger a share than the best possible prediction of
``C(x)`` from ``x_tau``. A fresh CNN (the standard CNN's architecture, with batch norm) trained for
``N`` epochs on the ``train`` split noised to ``tau`` (new noise every batch) to predict ``C(x)``
estimates that prediction from below, on the same test images and noise as the round trip: a
round trip far under it is the denoiser's shortfall, a ceiling near the round trip means the
noise level itself leaves too little of the class.

Usage::

    python scripts/diffusion_round_trip.py --diffusion DDPM.ckpt --classifier CNN.ckpt \\
        --data mnist --root /work/data --num-images 500 --taus 0.2 0.3 0.4 0.5 0.6 --out rt.json \\
        [--ceiling-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from lit_cf.data import FashionMNISTDataModule, MNISTDataModule
from lit_cf.explainers.diffusion_sampler import load_diffusion
from lit_cf.metrics.model_scores import predict
from lit_cf.models import ConvNet, ImageClassifier, freeze
from lit_cf.models.diffusion import DiffusionModel, q_sample, round_trip_noise, round_trip_scores
from lit_cf.utils.checkpoint import load_module

DATA = {"mnist": MNISTDataModule, "fashion_mnist": FashionMNISTDataModule}


def ceiling(
    model: DiffusionModel,
    classifier: torch.nn.Module,
    train: torch.Tensor,
    test: torch.Tensor,
    taus: list[float],
    epochs: int,
    seed: int,
    batch_size: int = 128,
) -> dict[float, float]:
    """Per tau: accuracy on ``test`` (noised as in the round trip) of a CNN trained to predict ``C(x)`` from ``x_tau``."""
    T, acp = model.num_train_timesteps, model.alphas_cumprod.cpu()
    train_y, test_y = predict(classifier, train), predict(classifier, test)
    num_classes = int(classifier(test[:1]).shape[-1])
    test_noise = round_trip_noise(model, len(test), seed)  # the same noise as round_trip_scores
    c, s, _ = model.model_shape
    out = {}
    for tau in taus:
        t = round(tau * T) - 1
        torch.manual_seed(seed)
        backbone = ConvNet(in_channels=c, image_size=s, batch_norm=True)
        net = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, num_classes))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed + 1)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(train), generator=g).split(batch_size):
                x0 = model.to_model(train[idx])
                noise = torch.randn(x0.shape, generator=g)
                x_t = q_sample(x0, torch.full((len(idx),), t), noise, acp)
                loss = torch.nn.functional.cross_entropy(net(x_t), train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            x_t = q_sample(model.to_model(test), torch.full((len(test),), t), test_noise, acp)
            out[float(tau)] = float((predict(net, x_t) == test_y).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusion", required=True, help="DDPM checkpoint (lit-cf fit)")
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (lit-cf fit)")
    parser.add_argument("--data", choices=sorted(DATA), default="mnist")
    parser.add_argument("--root", default="data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-images", type=int, default=1000, help="the first N images of the split")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--num-steps", type=int, default=20, help="DDIM steps of the denoising")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, default=None, help="also write a 64-image DDIM sample grid here (PNG)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument(
        "--ceiling-epochs",
        type=int,
        default=0,
        help="also train a CNN per tau for N epochs on the noised train split: how much of C(x) x_tau still holds",
    )
    parser.add_argument("--ceiling-train", type=int, default=60000, help="the first N train images for the ceiling CNNs")
    args = parser.parse_args()

    model = load_diffusion(args.diffusion)
    classifier = freeze(load_module(args.classifier, ImageClassifier))
    data = DATA[args.data](root=args.root, download=False).dataset(args.split)
    n = min(args.num_images, len(data))
    images = torch.stack([data[i]["image"] for i in range(n)])
    start = time.perf_counter()
    scores = round_trip_scores(model, classifier, images, args.taus, args.num_steps, args.seed)
    seconds = time.perf_counter() - start

    def report(bound: dict[float, float]) -> None:
        """Print the table and write the JSON (once after the round trip, again with the ceiling)."""
        print(f"round trip C(F_tau(x)) = C(x) on {n} {args.data} {args.split} images, {args.num_steps} DDIM steps:")
        print("| tau | kept |" + (" C(x) from x_tau (CNN) |" if bound else "") + "\n|---|---|" + ("---|" if bound else ""))
        for tau, score in scores.items():
            print(f"| {tau:.1f} | {score:.3f} |" + (f" {bound[tau]:.3f} |" if bound else ""), flush=True)
        if args.out is not None:
            record = {
                "args": {k: str(v) for k, v in vars(args).items()},
                "num_images": n,
                "scores": {str(k): v for k, v in scores.items()},
                "ceiling": {str(k): v for k, v in bound.items()},
                "seconds": seconds,
            }
            args.out.write_text(json.dumps(record, indent=1))

    print(f"(round trip {seconds:.0f} s)")
    report({})
    if args.samples is not None:
        grid = make_grid(model.sample(64, args.num_steps, torch.Generator().manual_seed(args.seed)), nrow=8, pad_value=0.5)
        args.samples.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, args.samples)
    if args.ceiling_epochs > 0:
        t0 = time.perf_counter()
        train_set = DATA[args.data](root=args.root, download=False).dataset("train")
        m = min(args.ceiling_train, len(train_set))  # type: ignore[arg-type]
        train = torch.stack([train_set[i]["image"] for i in range(m)])
        bound = ceiling(model.cpu(), classifier.cpu(), train, images, args.taus, args.ceiling_epochs, args.seed)
        print(f"(ceiling: {m} train images, {args.ceiling_epochs} epochs per tau, {time.perf_counter() - t0:.0f} s)")
        report(bound)


if __name__ == "__main__":
    main()
