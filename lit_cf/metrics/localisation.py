"""Localisation of a counterfactual edit: how much of the change lies inside a relevant region.

``localisation`` is the share of the difference-map mass ``|x' - x|`` (summed over channels)
that falls inside a boolean region mask, per query. Two region rules are provided:

* :func:`box_mask`: a fixed box given as fractions of the image height and width, the same for
  every query (e.g. the mouth of an aligned face crop for CelebA Smiling/Young);
* :func:`stroke_mask`: the pixels near a query's own strokes (ink above a threshold, dilated by
  a few pixels), i.e. edits of a digit rather than of its background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MOUTH_BOX", "box_mask", "localisation", "stroke_mask"]

#: rows and columns (fractions of the image) of the mouth in CelebA's aligned faces after the
#: 178x178 centre crop: the official landmarks put the mouth corners near (73, 152) and
#: (108, 152) of 178x218, i.e. rows ~0.74, columns 0.41-0.61; the box leaves a margin around them
MOUTH_BOX = ((0.62, 0.86), (0.28, 0.72))


def box_mask(shape: tuple[int, ...] | torch.Size, rows: tuple[float, float], cols: tuple[float, float]) -> Tensor:
    """``[N, 1, H, W]`` boolean mask, true inside ``rows`` x ``cols`` (fractions, start inclusive,
    end exclusive, rounded down to pixels) for images of ``shape`` ``[N, C, H, W]``."""
    if len(shape) != 4:
        raise ValueError(f"box_mask needs an image batch shape [N, C, H, W], got {tuple(shape)}")
    if not (0 <= rows[0] < rows[1] <= 1 and 0 <= cols[0] < cols[1] <= 1):
        raise ValueError(f"box rows {rows} and columns {cols} must be increasing fractions in [0, 1]")
    n, _, h, w = shape
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    mask[:, :, int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)] = True
    return mask


def stroke_mask(query: Tensor, threshold: float = 0.2, radius: int = 2) -> Tensor:
    """``[N, 1, H, W]`` boolean mask of the pixels within ``radius`` pixels (Chebyshev distance)
    of a query's ink (any channel above ``threshold``)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    ink = (query.amax(1, keepdim=True) > threshold).float()
    return F.max_pool2d(ink, 2 * radius + 1, stride=1, padding=radius) > 0


def localisation(query: Tensor, counterfactual: Tensor, mask: Tensor) -> Tensor:
    """``[N]`` share of the difference mass ``|x' - x|`` (summed over channels) inside ``mask``.

    Args:
        query: Queries ``[N, C, H, W]``.
        counterfactual: Counterfactuals of the same shape.
        mask: Boolean ``[N, 1, H, W]`` (or broadcastable) region per query.

    Returns:
        The share in ``[0, 1]`` per query; 0 for a query left unchanged.
    """
    if query.shape != counterfactual.shape:
        raise ValueError(f"query {tuple(query.shape)} and counterfactual {tuple(counterfactual.shape)} differ in shape")
    diff = (counterfactual.float() - query.float()).abs().sum(1, keepdim=True)
    inside = (diff * mask.to(diff.dtype)).flatten(1).sum(1)
    return inside / diff.flatten(1).sum(1).clamp_min(1e-12)
