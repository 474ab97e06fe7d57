"""Digit glyphs of the rendered digits: class skeletons and the rasteriser.

* each digit class is a fixed *skeleton*: a few polylines (straight strokes and sampled
  elliptic arcs) in a unit box, ``x`` to the right and ``y`` downwards;
* the skeleton is scaled, sheared (slant) and shifted onto a 28x28 canvas, and every pixel
  gets ink from its distance to the nearest stroke segment through a smooth threshold at half
  the stroke thickness (:func:`render_digits`);
* two nuisance factors do not touch the shape: the stroke ``intensity`` and the ``mark``, a
  bright 3x3 square in the top-left corner.

The glyph never inks the reserved corner ``[0:4, 0:4]`` (its ink there is cleared), so the
mark pixels carry the mark alone. The factors themselves are described in
:mod:`lit_cf.data.rendered_factors`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_cf.data.rendered_factors import FACTOR_NAMES, factor_column

__all__ = ["CANVAS", "MARK_SIZE", "RESERVED_CORNER", "digit_skeletons", "render_digits"]

CANVAS = 28
#: side of the mark square in pixels (top-left corner)
MARK_SIZE = 3
#: side of the corner square that the glyph never inks (mark plus one pixel of margin)
RESERVED_CORNER = 4

_GLYPH_HEIGHT = 18.0  # px at scale 1
_GLYPH_ASPECT = 0.62  # width / height of the unit box
_EDGE_SOFTNESS = 0.6  # px: half width of the smooth ink edge
_MAX_PIECE = 4.0  # px: longest stroke piece rasterised as one segment (at scale 1)
_FAR = 1.0e6  # squared distance of pixels that no segment patch covers

# --------------------------------------------------------------------------- skeletons


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int) -> list[tuple[float, float]]:
    """Points on an elliptic arc from angle ``a0`` to ``a1`` (degrees, counter-clockwise on
    screen, 0 = right, 90 = up) in ``n`` segments."""
    pts = []
    for i in range(n + 1):
        a = math.radians(a0 + (a1 - a0) * i / n)
        pts.append((cx + rx * math.cos(a), cy - ry * math.sin(a)))
    return pts


def _skeleton_polylines() -> list[list[list[tuple[float, float]]]]:
    """Per class, the polylines of its skeleton in the unit box (x right, y down)."""
    zero = [_arc(0.5, 0.5, 0.46, 0.5, 90, 450, 16)]
    one = [[(0.24, 0.2), (0.55, 0.0), (0.55, 1.0)]]
    two = [_arc(0.5, 0.29, 0.44, 0.29, 160, -35, 8) + [(0.04, 1.0), (0.98, 1.0)]]
    three = [
        _arc(0.48, 0.26, 0.4, 0.26, 155, -90, 7),
        _arc(0.48, 0.74, 0.48, 0.26, 90, -155, 8),
    ]
    four = [[(0.72, 1.0), (0.72, 0.0), (0.02, 0.7), (0.98, 0.7)]]
    five = [
        [(0.94, 0.0), (0.16, 0.0), (0.1, 0.46)] + _arc(0.48, 0.7, 0.45, 0.3, 145, -150, 9)[1:],
    ]
    six = [
        _arc(1.0, 0.7, 0.94, 0.7, 105, 180, 5),
        _arc(0.52, 0.72, 0.46, 0.28, 180, 540, 12),
    ]
    seven = [[(0.0, 0.0), (1.0, 0.0), (0.62, 0.45), (0.38, 1.0)]]
    eight = [
        _arc(0.5, 0.24, 0.37, 0.24, -90, 270, 12),
        _arc(0.5, 0.73, 0.47, 0.27, 90, 450, 12),
    ]
    nine = [
        _arc(0.48, 0.29, 0.46, 0.29, 0, 360, 12),
        [(0.94, 0.29), (0.9, 0.65), (0.78, 1.0)],
    ]
    return [zero, one, two, three, four, five, six, seven, eight, nine]


def _build_segment_table() -> tuple[Tensor, list[int]]:
    """Stroke segments per class, long strokes cut into pieces of at most ``_MAX_PIECE`` px (at
    scale 1) so that each piece only needs a small pixel patch around it."""
    per_class = []
    for polylines in _skeleton_polylines():
        segs = []
        for line in polylines:
            for p, q in zip(line[:-1], line[1:]):
                length = math.hypot((q[0] - p[0]) * _GLYPH_HEIGHT * _GLYPH_ASPECT, (q[1] - p[1]) * _GLYPH_HEIGHT)
                n = max(1, math.ceil(length / _MAX_PIECE))
                for i in range(n):
                    s0, s1 = i / n, (i + 1) / n
                    segs.append(
                        (
                            p[0] + (q[0] - p[0]) * s0,
                            p[1] + (q[1] - p[1]) * s0,
                            p[0] + (q[0] - p[0]) * s1,
                            p[1] + (q[1] - p[1]) * s1,
                        )
                    )
        per_class.append(segs)
    s_max = max(len(s) for s in per_class)
    table = torch.zeros((10, s_max, 4), dtype=torch.float32)
    for c, segs in enumerate(per_class):
        # pad by repeating the last segment: a duplicate leaves the nearest distance unchanged
        table[c] = torch.tensor(segs + [segs[-1]] * (s_max - len(segs)), dtype=torch.float32)
    return table, [len(s) for s in per_class]


# [10, S, 4] rows (x0, y0, x1, y1) in the unit box; class c has _NUM_SEGMENTS[c] distinct ones
_SEGMENTS, _NUM_SEGMENTS = _build_segment_table()


def digit_skeletons() -> list[Tensor]:
    """The stroke segments of every class as a list of ``[S_c, 4]`` tensors with rows
    ``(x0, y0, x1, y1)`` in the unit box (x right, y down)."""
    return [_SEGMENTS[c, : _NUM_SEGMENTS[c]].clone() for c in range(10)]


# --------------------------------------------------------------------------- rendering


def render_digits(labels: Tensor, factors: Tensor, chunk_size: int = 2048) -> Tensor:
    """Render digits from their labels and raw factors.

    Deterministic and independent per sample: rendering a sample alone gives the same pixels
    as rendering it inside any batch (element-wise arithmetic and an exact min only).

    Args:
        labels: ``[B]`` integer classes in ``0..9``.
        factors: ``[B, 7]`` raw factors in the order of :data:`FACTOR_NAMES`.
        chunk_size: Samples rasterised at once (bounds memory).

    Returns:
        ``[B, 1, 28, 28]`` float32 images in ``[0, 1]`` on the device of ``factors``.
    """
    labels = torch.as_tensor(labels)
    factors = torch.as_tensor(factors)
    if labels.dim() != 1 or factors.dim() != 2 or factors.shape != (labels.shape[0], len(FACTOR_NAMES)):
        raise ValueError(
            f"expected labels [B] and factors [B, {len(FACTOR_NAMES)}], got {tuple(labels.shape)} and {tuple(factors.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError("labels must be in 0..9")
    device = factors.device
    labels = labels.to(device=device, dtype=torch.long)
    factors = factors.to(torch.float32)
    out = torch.empty(labels.shape[0], 1, CANVAS, CANVAS, dtype=torch.float32, device=device)
    corner = torch.zeros(CANVAS, CANVAS, dtype=torch.bool, device=device)
    corner[:RESERVED_CORNER, :RESERVED_CORNER] = True
    mark_px = torch.zeros(CANVAS, CANVAS, dtype=torch.bool, device=device)
    mark_px[:MARK_SIZE, :MARK_SIZE] = True
    segments = _SEGMENTS.to(device)
    # On CPU the chunks run on one intra-op thread: the kernels are small, and on a loaded
    # machine every multi-threaded op waits for a busy core (seconds instead of ~1 s for 20000).
    threads = torch.get_num_threads()
    single = device.type == "cpu" and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        for start in range(0, labels.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            out[rows] = _render_chunk(factors[rows], segments[labels[rows]], corner, mark_px)
    finally:
        if single:
            torch.set_num_threads(threads)
    return out


def _render_chunk(f: Tensor, segments: Tensor, corner: Tensor, mark_px: Tensor) -> Tensor:
    """Rasterise ``b`` samples from their factors ``[b, 7]`` and strokes ``[b, S, 4]``.

    Each segment only reaches pixels within ``thickness / 2 + softness`` of it, so its squared
    distance is computed on a small square patch around it and scattered into the canvas with a
    min; pixels that no patch covers get no ink. The result does not depend on the patch size.
    """
    b = f.shape[0]
    thickness = f[:, factor_column("thickness")].view(b, 1)
    shear = torch.tan(f[:, factor_column("slant")].double()).float().view(b, 1)
    height = (_GLYPH_HEIGHT * f[:, factor_column("scale")]).view(b, 1)
    width = height * _GLYPH_ASPECT
    cx = (CANVAS / 2 + f[:, factor_column("shift_x")]).view(b, 1)
    cy = (CANVAS / 2 + f[:, factor_column("shift_y")]).view(b, 1)
    intensity = f[:, factor_column("intensity")].view(b, 1)
    mark = f[:, factor_column("mark")].view(b, 1) > 0.5

    # segment end points on the canvas, px: [b, S]
    gy0 = (segments[..., 1] - 0.5) * height  # glyph-centred
    gy1 = (segments[..., 3] - 0.5) * height
    ax = (segments[..., 0] - 0.5) * width - shear * gy0 + cx  # top (gy < 0) leans right if slant > 0
    bx = (segments[..., 2] - 0.5) * width - shear * gy1 + cx
    ay, by = gy0 + cy, gy1 + cy
    dx, dy = bx - ax, by - ay
    len2 = (dx * dx + dy * dy).clamp_min(1e-12)
    s = ax.shape[1]

    # a square patch of k x k pixels per segment, covering its end points plus the ink reach
    reach = (thickness / 2 + _EDGE_SOFTNESS).clamp_min(0.0)  # [b, 1]
    x_lo = (torch.minimum(ax, bx) - reach).floor().long()  # [b, S] first column
    y_lo = (torch.minimum(ay, by) - reach).floor().long()
    span = torch.maximum(dx.abs(), dy.abs()) + 2 * reach
    k = int(span.max().ceil().item()) + 2 if b and s else 1
    offs = torch.arange(k, device=f.device)
    col = x_lo.unsqueeze(-1) + offs  # [b, S, k]
    row = y_lo.unsqueeze(-1) + offs
    rx = (col.float() + 0.5) - ax.unsqueeze(-1)  # offsets from the first end point
    ry = (row.float() + 0.5) - ay.unsqueeze(-1)
    # projection parameter t = (r . d) / |d|^2 and |r|^2, each a row term plus a column term
    tx = (rx * (dx / len2).unsqueeze(-1)).unsqueeze(-2)  # [b, S, 1, k]
    ty = (ry * (dy / len2).unsqueeze(-1)).unsqueeze(-1)  # [b, S, k, 1]
    t_raw = tx + ty  # [b, S, k, k]
    r2 = (rx * rx).unsqueeze(-2) + (ry * ry).unsqueeze(-1)
    # squared distance to the clamped projection: |r - t d|^2 = |r|^2 + |d|^2 t (t - 2 t_raw)
    t = t_raw.clamp(0.0, 1.0)
    u = torch.add(t, t_raw, alpha=-2.0).mul_(t)
    d2 = r2.addcmul_(u, len2.view(b, s, 1, 1))
    # scatter into the canvas with a min; patch pixels off the canvas go to a dummy slot
    n_px = CANVAS * CANVAS
    col_ok = (col >= 0) & (col < CANVAS)
    row_ok = (row >= 0) & (row < CANVAS)
    flat = (row * CANVAS).unsqueeze(-1) + col.unsqueeze(-2)
    flat = flat.masked_fill_(~(row_ok.unsqueeze(-1) & col_ok.unsqueeze(-2)), n_px)
    dist2 = torch.full((b, n_px + 1), _FAR, dtype=torch.float32, device=f.device)
    dist2.scatter_reduce_(1, flat.view(b, -1), d2.view(b, -1), reduce="amin")
    dist = dist2[:, :n_px].clamp_min(0.0).sqrt_()
    # smoothstep from full ink (dist <= r - w) to none (dist >= r + w), r = thickness / 2
    edge = ((thickness / 2 + _EDGE_SOFTNESS - dist) / (2 * _EDGE_SOFTNESS)).clamp_(0.0, 1.0)
    ink = edge * edge * (3.0 - 2.0 * edge)
    img = (intensity * ink).masked_fill_(corner.view(1, -1), 0.0)  # glyph never inks the corner
    img = img.masked_fill_(mark_px.view(1, -1) & mark, 1.0)
    return img.clamp_(0.0, 1.0).view(b, 1, CANVAS, CANVAS)
