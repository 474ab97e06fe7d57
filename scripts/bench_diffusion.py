"""Diffusion counterfactual benchmark: batched vs one image at a time, and FastDiME vs DiME's chain.

All rows in one run, same classifier, same DDPM, same (query, target) records; targets are each
image's runner-up class, so a batch mixes many targets:

1. ``batched``: DVCE, FastDiME and ACE at their default settings on one chunk of ``--batch``
   records (``method.optimise``, what ``lit-cf explain`` runs per chunk; no file I/O).
2. ``one_at_a_time``: the same methods on the first ``--single`` records, one record per call
   (how the authors' code runs), reported per counterfactual, with the largest difference to
   the batched result (per-image independence: it should be float noise).
3. ``x0 vs chain``: FastDiME's one-call clean estimate vs DiME's full unguided chain per step,
   one attempt (scale 8) on ``--chain_images`` records: seconds and denoiser calls, and their
   ratios.

Every row reports seconds per counterfactual; on a GPU also counterfactuals per second, for each
``--precision`` (``32``, ``bf16-mixed``, and ``64``: models and records in float64, which tells
float rounding from a real dependence on chunk-mates in the batched vs one-at-a-time difference).

The DDPM has the architecture of ``configs/model/ddpm_mnist.yaml`` (about 1.06 M parameters, 32 px);
by default it is *untrained* (two optimiser steps, to write a checkpoint): the cost does not depend
on the weights, only the flip rate and so FastDiME's retries and ACE's PGD iterations do (they are
reported: ``attempts``, ``steps``). Pass ``--ddpm``/``--classifier`` to time trained models.

Usage::

    python scripts/bench_diffusion.py                                    # CPU, batch 64
    python scripts/bench_diffusion.py --batch 16 --single 4 --chain_images 4 --fastdime_steps 20
    python scripts/bench_diffusion.py --device cuda --precision 32,bf16-mixed --batch 256
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lit_cf.cli import main as cli_main
from lit_cf.data import RenderedDigitsDataModule
from lit_cf.explainers import ACE, DVCE, FastDiME
from lit_cf.models import ImageClassifier
from lit_cf.utils.checkpoint import load_module

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32", "bf16-mixed", "64")


def fit(workdir: Path, model_config: str, *extra: str) -> Path:
    cli_main(
        [
            "fit",
            f"--config={ROOT / 'configs/data/rendered.yaml'}",
            f"--config={ROOT / model_config}",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--sample_grid.num_samples=0",
            f"--trainer.default_root_dir={workdir}",
            *extra,
        ]
    )
    return sorted(workdir.rglob("*.ckpt"))[-1]


def make_models(workdir: Path, ddpm: str | None, classifier: str | None) -> tuple[str, str]:
    if classifier is None:
        classifier = str(
            fit(workdir / "cnn", "configs/model/cnn.yaml", "--data.init_args.train_size=2000", "--trainer.max_epochs=1")
        )
    if ddpm is None:  # untrained: cost does not depend on the weights
        ddpm = str(
            fit(
                workdir / "ddpm",
                "configs/model/ddpm_mnist.yaml",
                "--data.init_args.train_size=64",
                "--data.init_args.batch_size=32",
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
            )
        )
    return ddpm, classifier


def records(classifier: ImageClassifier, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    data = RenderedDigitsDataModule(test_size=max(n, 10), train_size=10, val_size=10).dataset("test")
    images = torch.stack([data[i]["image"] for i in range(n)]).to(device)
    with torch.no_grad():
        target = classifier(images).argsort(-1, descending=True)[:, 1]  # runner-up: mixed targets
    return {"image": images, "target": target, "seed": torch.arange(n, device=device) + 1000}


def subset(batch: dict[str, torch.Tensor], rows: slice | list[int]) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def in_precision(batch: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """The records with images in float64 for ``--precision 64`` (as they are otherwise)."""
    if precision != "64":
        return batch
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def timed(method: Any, batch: dict[str, torch.Tensor], device: torch.device, precision: str) -> tuple[float, dict]:
    batch = in_precision(batch, precision)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast:
        out = method.optimise(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def build(name: str, ddpm: str, classifier: ImageClassifier, device: torch.device, precision: str = "32", **kw: Any) -> Any:
    cls = {"dvce": DVCE, "fastdime": FastDiME, "ace": ACE}[name]
    method = cls(diffusion=ddpm, log_every=0, **kw)
    method.attach(copy.deepcopy(classifier) if precision == "64" else classifier)  # .double() would convert it in place
    method = method.to(device).eval()
    return method.double() if precision == "64" else method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", help="comma-separated: 32, bf16-mixed, 64 (float64)")
    p.add_argument("--batch", type=int, default=64, help="records in the batched chunk")
    p.add_argument("--single", type=int, default=8, help="records run one at a time (subset of the batch)")
    p.add_argument("--chain_images", type=int, default=4, help="records of the x0 vs chain comparison")
    p.add_argument("--methods", default="dvce,fastdime,ace")
    p.add_argument("--dvce_steps", type=int, default=100)
    p.add_argument("--fastdime_steps", type=int, default=60)
    p.add_argument("--ace_iterations", type=int, default=50)
    p.add_argument("--ddpm", default=None, help="DDPM .ckpt (default: an untrained ddpm_mnist.yaml model)")
    p.add_argument("--classifier", default=None, help="classifier .ckpt (default: a CNN trained 1 epoch on rendered digits)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    precisions = [s.strip() for s in args.precision.split(",")]
    bad = [s for s in precisions if s not in PRECISIONS]
    if bad:
        p.error(f"unknown precision {bad}; choose from {list(PRECISIONS)}")
    device = torch.device(args.device)
    settings = {
        "dvce": {"num_steps": args.dvce_steps},
        "fastdime": {"num_steps": args.fastdime_steps},
        "ace": {"iterations": args.ace_iterations},
    }
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        ddpm, ckpt = make_models(Path(tmp), args.ddpm, args.classifier)
        classifier = load_module(ckpt, ImageClassifier).to(device).eval()
        batch = records(classifier, args.batch, device)
        print(
            f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch} records with "
            f"{len(set(batch['target'].tolist()))} distinct targets, DDPM {ddpm}"
        )
        rows = []
        for precision in precisions:
            for name in methods:
                method = build(name, ddpm, classifier, device, precision, **settings[name])
                seconds, out = timed(method, batch, device, precision)
                extra = {k: float(out[k].float().mean()) for k in ("attempt", "steps") if k in out}
                rows.append(
                    dict(
                        method=name,
                        mode="batched",
                        precision=precision,
                        n=args.batch,
                        s_per_cf=seconds / args.batch,
                        cf_per_s=args.batch / seconds,
                        **extra,
                    )
                )
                print(rows[-1], flush=True)
                single_s, diffs = 0.0, []
                sub = {k: float(out[k][: args.single].float().mean()) for k in ("attempt", "steps") if k in out}
                for i in range(args.single):
                    s, o = timed(method, subset(batch, slice(i, i + 1)), device, precision)
                    single_s += s
                    diffs.append(float((o["counterfactual"][0] - out["counterfactual"][i]).abs().max()))
                rows.append(
                    dict(
                        method=name,
                        mode="one_at_a_time",
                        precision=precision,
                        n=args.single,
                        s_per_cf=single_s / args.single,
                        cf_per_s=args.single / single_s,
                        max_abs_diff_to_batched=max(diffs),
                        **sub,
                    )
                )
                print(rows[-1], flush=True)
            if "fastdime" in methods and args.chain_images:
                chunk = subset(batch, slice(0, args.chain_images))
                costs = {}
                for estimate in ("x0", "chain"):
                    method = build(
                        "fastdime",
                        ddpm,
                        classifier,
                        device,
                        precision,
                        num_steps=args.fastdime_steps,
                        clean_estimate=estimate,
                        class_scales=[8.0],
                    )
                    seconds, out = timed(method, chunk, device, precision)
                    costs[estimate] = (seconds, float(out["denoiser_calls"].float().mean()))
                    rows.append(
                        dict(
                            method=f"fastdime[{estimate}]",
                            mode="one attempt",
                            precision=precision,
                            n=args.chain_images,
                            s_per_cf=seconds / args.chain_images,
                            cf_per_s=args.chain_images / seconds,
                            denoiser_calls_per_cf=costs[estimate][1],
                        )
                    )
                    print(rows[-1], flush=True)
                rows.append(
                    dict(
                        method="chain / x0",
                        mode="ratio",
                        precision=precision,
                        seconds_ratio=costs["chain"][0] / costs["x0"][0],
                        denoiser_calls_ratio=costs["chain"][1] / costs["x0"][1],
                    )
                )
                print(rows[-1], flush=True)
    print()
    print(f"{'method':<18}{'mode':<15}{'precision':<11}{'n':>5}{'s/cf':>10}{'cf/s':>10}  other")
    for r in rows:
        other = {
            k: float(f"{v:.4g}") if isinstance(v, float) else v
            for k, v in r.items()
            if k not in ("method", "mode", "precision", "n", "s_per_cf", "cf_per_s")
        }
        s = f"{r['s_per_cf']:.4f}" if "s_per_cf" in r else "-"
        c = f"{r['cf_per_s']:.2f}" if "cf_per_s" in r else "-"
        print(f"{r['method']:<18}{r['mode']:<15}{r['precision']:<11}{r.get('n', ''):>5}{s:>10}{c:>10}  {other}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
