"""Helpers shared by the lit-cf metrics (private: import from :mod:`lit_cf.metrics`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: Default degrees-of-freedom correction of every per-sample ``*_std`` output. ``0`` is the
#: population standard deviation (numpy's default, what papers usually report); pass
#: ``std_correction=1`` to a metric for the unbiased sample estimate.
DEFAULT_STD_CORRECTION = 0


def cat_state(state: Tensor | list[Tensor]) -> Tensor:
    """A ``"cat"`` state as one 1-D tensor, also when nothing was accumulated."""
    if isinstance(state, Tensor):
        return state.reshape(-1) if state.dim() == 0 else state
    if len(state) == 0:
        return torch.zeros(0)
    return torch.cat([s.reshape(-1) if s.dim() == 0 else s for s in state])


def mean_std(values: Tensor, correction: int = DEFAULT_STD_CORRECTION) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of a 1-D tensor; ``nan`` where undefined (too few values)."""
    values = values.double()
    if values.numel() == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
        return nan, nan.clone()
    mean = values.mean()
    if values.numel() <= correction:
        return mean, torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    return mean, values.std(correction=correction)


def mean_std_dict(name: str, state: Tensor | list[Tensor], correction: int = DEFAULT_STD_CORRECTION) -> dict[str, Tensor]:
    """``{f"{name}_mean": ..., f"{name}_std": ...}`` of a per-sample ``"cat"`` state (float32)."""
    mean, std = mean_std(cat_state(state), correction)
    return {f"{name}_mean": mean.float(), f"{name}_std": std.float()}


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` as float32, ``nan`` when ``den == 0`` (a metric that saw no samples)."""
    num, den = num.double(), den.double()
    if den == 0:
        return torch.tensor(float("nan"), device=num.device)
    return (num / den).float()


def as_labels(preds: Tensor) -> Tensor:
    """Class indices from ``[B]`` indices or ``[B, C]`` scores (argmax)."""
    if preds.dim() == 2:
        return preds.argmax(-1)
    if preds.dim() != 1:
        raise ValueError(f"expected class indices [B] or scores [B, C], got shape {tuple(preds.shape)}")
    return preds.long()


def class_probabilities(model: Callable[..., Any], x: Tensor) -> Tensor:
    """Class probabilities ``[B, C]`` of ``model``: its ``probabilities`` method when it has one
    (lit-cf classifiers), else the softmax of its output (logits)."""
    probabilities = getattr(model, "probabilities", None)
    if callable(probabilities):
        return probabilities(x)
    return model(x).softmax(-1)


def check_images(x: Tensor, x_cf: Tensor) -> None:
    if x.shape != x_cf.shape:
        raise ValueError(f"queries {tuple(x.shape)} and counterfactuals {tuple(x_cf.shape)} differ in shape")
    if x.dim() < 2:
        raise ValueError(f"expected batched images [B, ...], got shape {tuple(x.shape)}")


class EvalOnly(nn.Module):
    """Holds a network that must stay in eval mode (BatchNorm statistics, dropout off).

    The wrapped module is put in eval mode at construction and ``train()`` on any parent (e.g.
    a LightningModule holding the metric) leaves it there. Calling the wrapper calls the
    module; gradients are not disabled here (the metrics call it under ``torch.no_grad``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.module.eval()

    def train(self, mode: bool = True) -> EvalOnly:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
