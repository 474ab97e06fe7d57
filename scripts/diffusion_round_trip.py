"""Round-trip table of a DDPM for a classifier: C(F_tau(x)) = C(x) for several tau, plus a sample grid.

``F_tau`` noises an image to ``tau`` and denoises it unguided (DDIM); the share of images whose
prediction survives is ACE's criterion for choosing ``tau`` (:func:`lit_cf.models.diffusion.round_trip_scores`).

Usage::

    python scripts/diffusion_round_trip.py --diffusion DDPM.ckpt --classifier CNN.ckpt \\
        --data mnist --root /work/data --num-images 500 --taus 0.2 0.3 0.4 0.5 0.6 --out rt.json
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
from lit_cf.models import ImageClassifier, freeze
from lit_cf.models.diffusion import round_trip_scores
from lit_cf.utils.checkpoint import load_module

DATA = {"mnist": MNISTDataModule, "fashion_mnist": FashionMNISTDataModule}


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
    args = parser.parse_args()

    model = load_diffusion(args.diffusion)
    classifier = freeze(load_module(args.classifier, ImageClassifier))
    data = DATA[args.data](root=args.root, download=False).dataset(args.split)
    n = min(args.num_images, len(data))
    images = torch.stack([data[i]["image"] for i in range(n)])
    start = time.perf_counter()
    scores = round_trip_scores(model, classifier, images, args.taus, args.num_steps, args.seed)
    seconds = time.perf_counter() - start
    print(f"round trip C(F_tau(x)) = C(x) on {n} {args.data} {args.split} images, {args.num_steps} DDIM steps:")
    print("| tau | kept |\n|---|---|")
    for tau, score in scores.items():
        print(f"| {tau:.1f} | {score:.3f} |")
    print(f"({seconds:.0f} s)")
    if args.samples is not None:
        grid = make_grid(model.sample(64, args.num_steps, torch.Generator().manual_seed(args.seed)), nrow=8, pad_value=0.5)
        args.samples.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, args.samples)
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "num_images": n,
                    "scores": {str(k): v for k, v in scores.items()},
                    "seconds": seconds,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
