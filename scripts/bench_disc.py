"""DISC prior benchmark: seconds per counterfactual of the DIP and INR priors, profiled.

Part 1 (per step): for a chunk of ``--chunk`` 28x28 images, times one optimisation step of
DISC's counterfactual loop split into its parts: the prior's forward (render), the classifier's
forward and the backward through both, with ``torch.profiler`` naming the top operators. The
priors are initialised as explain does (per-record seeds); the classifier is a fresh CNN of the
shipped architecture (the cost does not depend on its weights).

Part 2 (end to end, ``--e2e-chunk`` images, 0 skips it): DISC as shipped
(``configs/explain/disc.yaml``: prior fit to 30 dB, four stages of 50 steps, feature term; no
DUQ term, which needs a trained DUQ model) on rendered digits, seconds per counterfactual, with
the DIP prior's per-image convolutions as one grouped convolution (the default) and as im2col
products (the earlier CPU path), side by side in this run, and the INR prior (SIREN, shipped).

Usage::

    python scripts/bench_disc.py --chunk 64 --steps 10 --e2e-chunk 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from lit_cf.data.rendered import RenderedDigits
from lit_cf.explainers import DISCCounterfactual
from lit_cf.explainers.priors import CONV_IMPLS, DIPPrior, INRPrior, fixed_entries
from lit_cf.models import Classifier, ConvNet

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "explain" / "disc.yaml"


def bench(prior, classifier, chunk: int, steps: int) -> dict[str, float]:
    query = torch.rand(chunk, 1, 28, 28)
    params = prior.init(query, torch.arange(chunk))
    fixed = fixed_entries(params)
    latents = {k: v.requires_grad_(True) for k, v in params.items() if k not in fixed}
    target = torch.randint(0, 10, (chunk,))
    times = {"render": 0.0, "classifier": 0.0, "backward": 0.0}
    for _ in range(steps):
        t0 = time.perf_counter()
        x = prior.render({**{k: params[k] for k in fixed}, **latents})
        t1 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(classifier(x), target)
        t2 = time.perf_counter()
        torch.autograd.grad(loss, list(latents.values()))
        t3 = time.perf_counter()
        times["render"] += t1 - t0
        times["classifier"] += t2 - t1
        times["backward"] += t3 - t2
    per = {k: v / steps / chunk * 1e3 for k, v in times.items()}  # ms per image per step
    per["total"] = sum(per.values())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x = prior.render({**{k: params[k] for k in fixed}, **latents})
        torch.autograd.grad(torch.nn.functional.cross_entropy(classifier(x), target), list(latents.values()))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return per


def end_to_end(classifier, chunk: int, prior: str, conv: str) -> dict[str, float]:
    """Seconds per counterfactual of DISC as shipped (prior fit included) on ``chunk`` rendered digits."""
    settings = yaml.safe_load(SHIPPED.read_text())["model"]["init_args"]
    settings.update(prior=prior, duq=None, mc_weight=0.0)
    method = DISCCounterfactual(**settings)
    method.attach(classifier)
    if prior == "dip":
        method.prior.conv = conv
    ds = RenderedDigits(chunk, split="test", seed=1)
    query = torch.stack([ds[i]["image"] for i in range(chunk)])
    batch = {"image": query, "target": torch.arange(chunk) % 10, "seed": torch.arange(chunk) * 17 + 5}
    start = time.perf_counter()
    out = method.optimise(batch)
    seconds = time.perf_counter() - start
    return {
        "s_per_cf": seconds / chunk,
        "fit_steps": float(out["prior_fit_steps"].float().mean()),
        "steps": float(out["steps"].float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--e2e-chunk", type=int, default=32, help="images of the end-to-end part (0: skip it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier = Classifier(ConvNet(channels=(32, 64), hidden=128), num_classes=10).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    per_step = {f"dip ({conv})": DIPPrior(conv=conv) for conv in CONV_IMPLS}
    per_step["inr (sine)"] = INRPrior(activation="sine")
    totals = {}
    for name, prior in per_step.items():
        per = bench(prior, classifier, args.chunk, args.steps)
        totals[name] = per["total"]
        print(f"{name}: ms per image per step: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
        print(f"{name}: 200 steps -> {per['total'] * 200 / 1e3:.2f} s per counterfactual (prior fit not included)")
    print(f"per step, dip unfold / grouped: {totals['dip (unfold)'] / totals['dip (grouped)']:.2f}x")
    if args.e2e_chunk:
        print(f"\nend to end, DISC as shipped ({SHIPPED.name}, no DUQ term), {args.e2e_chunk} rendered digits:")
        runs = {f"dip ({conv})": ("dip", conv) for conv in CONV_IMPLS}
        runs["inr (sine)"] = ("inr", "grouped")
        e2e = {}
        for name, (prior, conv) in runs.items():
            e2e[name] = end_to_end(classifier, args.e2e_chunk, prior, conv)
            r = e2e[name]
            print(
                f"{name}: {r['s_per_cf']:.3f} s per counterfactual (prior fit {r['fit_steps']:.0f} steps, {r['steps']:.0f} steps)"
            )
        print(f"end to end, dip unfold / grouped: {e2e['dip (unfold)']['s_per_cf'] / e2e['dip (grouped)']['s_per_cf']:.2f}x")


if __name__ == "__main__":
    main()
