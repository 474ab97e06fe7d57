"""Image panels shared by the explain grids, the evaluate logging and the report.

The one signed-difference map of lit-cf lives here: red where the counterfactual adds
intensity, blue where it removes, white where unchanged, each image scaled by its own
largest absolute (channel-summed) change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["comparison_rows", "signed_difference", "signed_difference_with_scale", "to_rgb", "upscale", "upscale_factor"]


def signed_difference_with_scale(query: Tensor, counterfactual: Tensor) -> tuple[Tensor, Tensor]:
    """RGB maps ``[B, 3, H, W]`` of ``cf - query`` summed over channels, and each map's scale ``[B]``.

    The scale is the image's largest absolute channel-summed change (0 for an unchanged image,
    which maps to white).
    """
    diff = (counterfactual - query).sum(1, keepdim=True)
    scale = diff.flatten(1).abs().amax(1) if diff[0].numel() else diff.new_zeros(len(diff))
    d = diff / scale.clamp_min(1e-8).view(-1, 1, 1, 1)
    pos, neg = d.clamp(min=0), (-d).clamp(min=0)
    return torch.cat([1 - neg, 1 - pos - neg, 1 - pos], dim=1).clamp(0, 1), scale


def signed_difference(query: Tensor, counterfactual: Tensor) -> Tensor:
    """RGB map of ``cf - query`` summed over channels: red where the CF adds, blue where it removes.

    Each image is scaled by its own largest absolute change so small edits stay visible.
    """
    return signed_difference_with_scale(query, counterfactual)[0]


def to_rgb(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` as three channels: grey images repeated, RGB(A) cut to RGB, two channels averaged."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] >= 3:
        return images[:, :3]
    return images.mean(1, keepdim=True).expand(-1, 3, -1, -1)


def comparison_rows(query: Tensor, counterfactual: Tensor) -> Tensor:
    """Interleave query, counterfactual and difference map: ``[3B, 3, H, W]`` for a 3-column grid."""
    triples = torch.stack([to_rgb(query), to_rgb(counterfactual), signed_difference(query, counterfactual)], 1)
    return triples.flatten(0, 1)


def upscale_factor(height: int, width: int, min_px: int) -> int:
    """Smallest integer factor that makes the shorter side of an image at least ``min_px``."""
    return max(1, math.ceil(min_px / max(1, min(height, width))))


def upscale(images: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upscaling of ``[..., H, W]`` by an integer factor (pixels stay square blocks)."""
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
