"""Scores of trained models on plain data (not of counterfactuals): accuracy, agreement,
reconstruction error, and accuracy under the corruptions of :mod:`lit_cf.data.corruptions`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lit_cf.data.corruptions import CORRUPTIONS, corrupt

__all__ = ["accuracy", "corruption_accuracy", "predict", "reconstruction_mse"]


@torch.no_grad()
def predict(model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted classes (argmax of ``model``'s output) of ``images``, ``batch_size`` at a time."""
    if not len(images):
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([model(images[i : i + batch_size]).argmax(-1).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy(model: Callable[[Tensor], Tensor], batches: Iterable[Mapping[str, Tensor]]) -> float:
    """Share of ``{"image", "label"}`` batches (e.g. ``datamodule.loader("test")``) whose argmax
    prediction equals the label; 0 for no images."""
    right = total = 0
    for batch in batches:
        right += int((model(batch["image"]).argmax(-1).cpu() == batch["label"].cpu()).sum())
        total += len(batch["label"])
    return right / max(total, 1)


@torch.no_grad()
def reconstruction_mse(autoencoder: Any, batches: Iterable[Mapping[str, Tensor]], max_batches: int | None = None) -> float:
    """Mean squared error per pixel of ``decode(encode(x))`` over (the first ``max_batches``)
    ``batches``; ``autoencoder`` has ``encode`` and ``decode``; 0 for no images."""
    err = n = 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch["image"]
        err += float((autoencoder.decode(autoencoder.encode(x)) - x).square().sum())
        n += x.numel()
    return err / max(n, 1.0)


def corruption_accuracy(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruptions: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Accuracy of ``model`` under every corruption x severity of the same images.

    Each image gets its own seed (from ``seed``), so every model sees the same corrupted images.

    Returns:
        ``corrupted_acc`` (mean over corruptions of the mean over severities) and
        ``per_corruption`` ``{name: mean accuracy over severities}``.
    """
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    if not names or not severities:
        raise ValueError("corruption_accuracy needs at least one corruption and one severity")
    per: dict[str, float] = {}
    for name in names:
        accs = [
            float((predict(model, corrupt(images, name, severity, seed=seed), batch_size) == labels.cpu()).float().mean())
            for severity in severities
        ]
        per[name] = sum(accs) / len(accs)
    return {"corrupted_acc": sum(per.values()) / len(per), "per_corruption": per}
