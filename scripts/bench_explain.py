"""Explain-engine benchmark: PixelCounterfactual on the built-in digits, all in one run.

Rows (same classifier, same steps and settings, no early stopping so every image runs all
steps):

1. ``engine``: ``lit-cf explain``'s engine (Trainer.predict, chunked, writing shards).
2. ``hand_batched``: a minimal hand-written batched PyTorch loop of the same steps
   (``torch.optim.Adam`` over the whole chunk, same loss).
3. ``per_image``: one image per optimisation, as peer libraries run (timed on a subset and
   reported per image).

Then: counted FLOPs of forward + backward per step (``torch.utils.flop_counter``) over the
engine's time, as a fraction of this machine's measured float32 matmul rate; and the peak RSS of
explaining 10k vs 1k images, each in a fresh process.

Usage::

    python scripts/bench_explain.py                 # CPU defaults (1,024 images, 50 steps)
    python scripts/bench_explain.py --accelerator gpu --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lit_cf.cli import main as cli_main
from lit_cf.data import RenderedDigitsDataModule
from lit_cf.explainers import PixelCounterfactual
from lit_cf.explainers.engine import run_explain
from lit_cf.models import ImageClassifier
from lit_cf.trainer import LitCFTrainer
from lit_cf.utils.checkpoint import load_module

ROOT = Path(__file__).resolve().parents[1]
LR, L2 = 0.01, 0.01


def train_classifier(workdir: Path, train_size: int = 4000, accelerator: str = "auto") -> Path:
    cli_main(
        [
            "fit",
            f"--config={ROOT / 'configs/data/rendered.yaml'}",
            f"--config={ROOT / 'configs/model/cnn.yaml'}",
            f"--data.init_args.train_size={train_size}",
            f"--trainer.accelerator={accelerator}",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--sample_grid.num_samples=0",
            f"--trainer.default_root_dir={workdir}",
        ]
    )
    return sorted(workdir.rglob("*.ckpt"))[-1]


def engine_run(ckpt: Path, out: Path, n: int, steps: int, chunk: int, accelerator: str, precision: str) -> float:
    dm = RenderedDigitsDataModule(test_size=max(n, 10), train_size=10, val_size=10)
    method = PixelCounterfactual(steps=steps, lr=LR, l2_weight=L2, stop_probability=None, log_every=0)
    trainer = LitCFTrainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    run_explain(
        trainer, method, dm, classifier=str(ckpt), output_dir=str(out), num_queries=n, chunk_size=chunk, num_grid_images=0
    )
    return time.perf_counter() - start


def autocast(device: torch.device, precision: str):
    """The hand-written loops run under the same mixed precision as the engine's Trainer."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def hand_batched(
    model: ImageClassifier, images: torch.Tensor, targets: torch.Tensor, steps: int, chunk: int, precision: str = "32-true"
) -> float:
    device = images.device
    start = time.perf_counter()
    for s in range(0, len(images), chunk):
        x0, t = images[s : s + chunk], targets[s : s + chunk]
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=LR)
        for _ in range(steps):
            with autocast(device, precision):
                logits = model(x)
            loss = (F.cross_entropy(logits.float(), t, reduction="none") + L2 * ((x - x0) ** 2).flatten(1).sum(1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def per_image(
    model: ImageClassifier, images: torch.Tensor, targets: torch.Tensor, steps: int, precision: str = "32-true"
) -> float:
    return hand_batched(model, images, targets, steps, chunk=1, precision=precision)


def step_flops(model: ImageClassifier, images: torch.Tensor, targets: torch.Tensor) -> int:
    x = images.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        loss = (F.cross_entropy(model(x), targets, reduction="none") + L2 * ((x - images) ** 2).flatten(1).sum(1)).sum()
        loss.backward()  # gradient w.r.t. the pixels (the model's weights are frozen)
    return counter.get_total_flops()


def matmul_rate(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def rss_child(args: argparse.Namespace) -> None:
    """Explain ``--rss-child`` images in this fresh process and print the peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        engine_run(Path(args.ckpt), Path(tmp) / "run", args.rss_child, 5, args.chunk, "cpu", "32-true")
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description="lit-cf explain engine benchmark")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--per-image-subset", type=int, default=64, help="images timed one by one")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--train-size", type=int, default=4000, help="rendered images the benchmarked classifier is trained on")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul that measures peak FLOP/s")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return

    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = train_classifier(tmp / "fit", args.train_size, args.accelerator)
        engine_s = engine_run(ckpt, tmp / "engine", args.images, args.steps, args.chunk, args.accelerator, args.precision)
        device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
        model = load_module(ckpt, ImageClassifier).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        dm = RenderedDigitsDataModule(test_size=args.images, train_size=10, val_size=10)
        test = dm.dataset("test")
        images = torch.stack([test[i]["image"] for i in range(args.images)]).to(device)
        with torch.no_grad():
            targets = model(images).argsort(-1, descending=True)[:, 1]
        hand_s = hand_batched(model, images, targets, args.steps, args.chunk, args.precision)
        k = min(args.per_image_subset, args.images)
        per_image_s = per_image(model, images[:k], targets[:k], args.steps, args.precision) / k * args.images
        flops = step_flops(model, images[: args.chunk], targets[: args.chunk]) / args.chunk * args.images * args.steps
        peak = matmul_rate(device, args.matmul_size)
        rss = {}
        if not args.skip_rss:
            for n in (1000, 10000):
                res = subprocess.run(
                    [sys.executable, __file__, "--rss-child", str(n), "--ckpt", str(ckpt), "--chunk", str(args.chunk)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rss[n] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    print(
        f"\nbench_explain: PixelCounterfactual, {args.images} images x {args.steps} steps, chunk {args.chunk}, "
        f"device {device} ({args.precision}), torch threads {torch.get_num_threads()}"
    )
    rows = [
        ("engine (lit-cf explain)", engine_s),
        ("hand-written batched loop", hand_s),
        (f"per-image loop (timed on {k}, scaled)", per_image_s),
    ]
    print(f"{'run':<40}{'seconds':>10}{'CF/s':>10}")
    for name, s in rows:
        print(f"{name:<40}{s:>10.2f}{args.images / s:>10.1f}")
    print()
    print(f"{'ratio':<60}{'value':>10}{'goal':>12}")
    print(f"{'batched engine speed-up over per-image loop':<60}{per_image_s / engine_s:>9.1f}x{'>= 4x CPU':>12}")
    print(f"{'engine time / hand-written batched loop':<60}{engine_s / hand_s:>9.2f}x{'<= 1.10x':>12}")
    print(f"{'achieved FLOP/s (engine) / measured matmul FLOP/s':<60}{flops / engine_s / peak:>10.3f}{'report':>12}")
    print(
        f"  ({flops / engine_s / 1e9:.1f} GFLOP/s achieved; matmul {peak / 1e9:.1f} GFLOP/s; "
        f"{flops / args.images / args.steps / 1e6:.2f} MFLOP per image-step)"
    )
    if rss:
        print(f"{'peak RSS 10k / 1k images':<60}{rss[10000] / rss[1000]:>9.2f}x{'<= 1.2x':>12}")
        print(f"  (1k: {rss[1000]:.0f} MiB, 10k: {rss[10000]:.0f} MiB)")
    if args.json:
        figures = {
            "images": args.images,
            "steps": args.steps,
            "chunk": args.chunk,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": args.precision,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "seconds": {"engine": engine_s, "hand_batched": hand_s, "per_image_scaled": per_image_s},
            "cf_per_second": {
                "engine": args.images / engine_s,
                "hand_batched": args.images / hand_s,
                "per_image": args.images / per_image_s,
            },
            "batched_over_per_image": per_image_s / engine_s,
            "engine_over_hand": engine_s / hand_s,
            "achieved_over_matmul_flops": flops / engine_s / peak,
            "per_image_subset": k,
            "peak_rss_mib": rss or None,
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
