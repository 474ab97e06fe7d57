"""DISC prior benchmark: seconds per counterfactual step of the DIP and INR priors, profiled.

For a chunk of ``--chunk`` 28x28 images, times one optimisation step of DISC's counterfactual
loop split into its parts: the prior's forward (render), the classifier's forward and the
backward through both, with ``torch.profiler`` naming the top operators. The priors are
initialised as explain does (per-record seeds); the classifier is a fresh CNN of the shipped
architecture (the cost does not depend on its weights).

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_disc.py --chunk 100 --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lit_cf.explainers.priors import DIPPrior, INRPrior, fixed_entries
from lit_cf.models import Classifier, ConvNet


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier = Classifier(ConvNet(channels=(32, 64), hidden=128), num_classes=10).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    for name, prior in (("dip", DIPPrior()), ("inr", INRPrior())):
        per = bench(prior, classifier, args.chunk, args.steps)
        print(f"{name}: ms per image per step: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
        print(f"{name}: 200 steps -> {per['total'] * 200 / 1e3:.2f} s per counterfactual (prior fit not included)")


if __name__ == "__main__":
    main()
