"""Image panels shared by the explain grids, the evaluate logging and the report."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["comparison_rows", "signed_difference"]


def signed_difference(query: Tensor, counterfactual: Tensor) -> Tensor:
    """RGB map of ``cf - query`` summed over channels: red where the CF adds, blue where it removes.

    Each image is scaled by its own largest absolute change so small edits stay visible.
    """
    diff = (counterfactual - query).sum(1, keepdim=True)
    scale = diff.flatten(1).abs().amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    d = diff / scale
    pos, neg = d.clamp(min=0), (-d).clamp(min=0)
    return torch.cat([1 - neg, 1 - pos - neg, 1 - pos], dim=1).clamp(0, 1)


def comparison_rows(query: Tensor, counterfactual: Tensor) -> Tensor:
    """Interleave query, counterfactual and difference map: ``[3B, 3, H, W]`` for a 3-column grid."""
    to_rgb = (lambda x: x.expand(-1, 3, -1, -1)) if query.shape[1] == 1 else (lambda x: x)
    triples = torch.stack([to_rgb(query), to_rgb(counterfactual), signed_difference(query, counterfactual)], 1)
    return triples.flatten(0, 1)
