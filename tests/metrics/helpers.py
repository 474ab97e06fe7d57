"""Shared helpers of the metric tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric


def split_args(args: Sequence[Any], lo: int, hi: int) -> list[Any]:
    return [a[lo:hi] if isinstance(a, torch.Tensor) else a for a in args]


def check_merge(make: Callable[[], Metric], args: Sequence[Any], cut: int, atol: float = 1e-6) -> dict:
    """Simulated DDP: two instances updated with the halves and merged equal one with all."""
    full = make()
    full.update(*args)
    n = len(args[0])
    first, second = make(), make()
    first.update(*split_args(args, 0, cut))
    second.update(*split_args(args, cut, n))
    first.merge_state(second)
    expected, merged = full.compute(), first.compute()
    assert expected.keys() == merged.keys()
    for key in expected:
        e, m = float(expected[key]), float(merged[key])
        assert (math.isnan(e) and math.isnan(m)) or math.isclose(e, m, rel_tol=1e-6, abs_tol=atol), key
    return expected


def pop_std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
