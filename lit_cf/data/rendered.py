"""Procedurally rendered digits with known generative factors (lit-cf's default data).

Every image is drawn from a handful of numbers, so the ground truth of what changes an image
is known exactly:

* each digit class is a fixed *skeleton*: a few polylines (straight strokes and sampled
  elliptic arcs) in a unit box, ``x`` to the right and ``y`` downwards;
* the skeleton is scaled, sheared (slant) and shifted onto a 28x28 canvas, and every pixel
  gets ink from its distance to the nearest stroke segment through a smooth threshold at half
  the stroke thickness (:func:`render_digits`);
* two nuisance factors do not touch the shape: the stroke ``intensity`` and the ``mark``, a
  bright 3x3 square in the top-left corner.

Factors, in the order of :data:`FACTOR_NAMES` (raw values, see :data:`FACTOR_RANGES`):

===============  ==================  ===================================================
name             range               meaning
===============  ==================  ===================================================
``thickness``    [1.4, 2.8] px       full stroke width
``slant``        [-0.25, 0.25] rad   shear angle; positive leans the top to the right
``scale``        [0.85, 1.1]         glyph size relative to an 18 px tall glyph
``shift_x``      [-2, 2] px          horizontal offset of the glyph centre (right > 0)
``shift_y``      [-2, 2] px          vertical offset of the glyph centre (down > 0)
``intensity``    [0.5, 1.0]          stroke brightness (peak pixel value of the ink)
``mark``         {0, 1}              bright square on pixels ``[0:3, 0:3]`` (rows, cols)
===============  ==================  ===================================================

The continuous factors are uniform on their ranges; ``mark`` is on with probability
``mark_rate`` (default 0.1) in clean data. The glyph never inks the reserved corner
``[0:4, 0:4]`` (its ink there is cleared), so the mark pixels carry the mark alone.

Randomness is counter based: each number is a hash of ``(seed, split, index, draw)``, so any
sample can be regenerated on its own (:meth:`RenderedDigits.generate`) and equals the cached
one bit for bit. Labels are balanced: each block of 10 consecutive indices holds every class
once, in a seeded random order.

**Planted shortcut.** With ``shortcut_class = c`` and ``shortcut_strength = s`` the binary
state ``z`` of the shortcut factor is drawn as::

    P(z = 1 | label) = s * [label == c] + (1 - s) * base_rate

i.e. ``s + (1 - s) * base_rate`` for class ``c`` and ``(1 - s) * base_rate`` for the others.
At ``s = 1`` the state is on iff the label is ``c``; at ``s = 0`` it is independent of the
label at the base rate (the clean distribution). For ``shortcut_factor="mark"`` the state is
the mark itself and ``base_rate = mark_rate``. For ``shortcut_factor="intensity"`` the state is
"high intensity": ``z = 1`` draws the intensity uniformly from ``[0.9, 1.0]``, ``z = 0`` from
``[0.5, 0.9)``; its base rate is 0.2, which makes the clean intensity exactly uniform on
``[0.5, 1.0]``. The clean and shortcut versions of one split share their uniforms, so
``val``/``val_shortcut`` hold the same digits and differ only in the shortcut factor.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_cf.data.base import ImageDataModule

__all__ = [
    "CANVAS",
    "CLASS_NAMES",
    "FACTOR_NAMES",
    "FACTOR_RANGES",
    "INTENSITY_HIGH",
    "MARK_SIZE",
    "SHORTCUT_FACTORS",
    "RenderedDigits",
    "RenderedDigitsDataModule",
    "digit_skeletons",
    "normalize_factors",
    "render_digits",
    "sample_factors",
]

CANVAS = 28
CLASS_NAMES = tuple(str(i) for i in range(10))
FACTOR_NAMES = ("thickness", "slant", "scale", "shift_x", "shift_y", "intensity", "mark")
FACTOR_RANGES: dict[str, tuple[float, float]] = {
    "thickness": (1.4, 2.8),
    "slant": (-0.25, 0.25),
    "scale": (0.85, 1.1),
    "shift_x": (-2.0, 2.0),
    "shift_y": (-2.0, 2.0),
    "intensity": (0.5, 1.0),
    "mark": (0.0, 1.0),
}
#: intensities at or above this value are the "high" state of the intensity shortcut
INTENSITY_HIGH = 0.9
#: side of the mark square in pixels (top-left corner)
MARK_SIZE = 3
#: side of the corner square that the glyph never inks (mark plus one pixel of margin)
RESERVED_CORNER = 4
SHORTCUT_FACTORS = ("mark", "intensity")

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


def _factor_column(name: str) -> int:
    return FACTOR_NAMES.index(name)


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
    thickness = f[:, _factor_column("thickness")].view(b, 1)
    shear = torch.tan(f[:, _factor_column("slant")].double()).float().view(b, 1)
    height = (_GLYPH_HEIGHT * f[:, _factor_column("scale")]).view(b, 1)
    width = height * _GLYPH_ASPECT
    cx = (CANVAS / 2 + f[:, _factor_column("shift_x")]).view(b, 1)
    cy = (CANVAS / 2 + f[:, _factor_column("shift_y")]).view(b, 1)
    intensity = f[:, _factor_column("intensity")].view(b, 1)
    mark = f[:, _factor_column("mark")].view(b, 1) > 0.5

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


# --------------------------------------------------------------------------- factor sampling

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}

# draw numbers (the ``k`` of a hashed uniform)
_D_THICKNESS, _D_SLANT, _D_SCALE, _D_SHIFT_X, _D_SHIFT_Y = 0, 1, 2, 3, 4
_D_INTENSITY, _D_INTENSITY_STATE, _D_MARK = 5, 6, 7
_D_LABEL = 100  # + position within the block of 10


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _stream_id(split: str) -> int:
    if split in _SPLIT_STREAMS:
        return _SPLIT_STREAMS[split]
    return 1000 + zlib.crc32(split.encode())


def _uniform(seed: int, split: str, index: np.ndarray, draw: int) -> np.ndarray:
    """Uniform float64 in ``[0, 1)`` hashed from ``(seed, split, index, draw)``."""
    h = _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    h = _mix64(h ^ np.uint64(_stream_id(split)))
    h = _mix64(h ^ index.astype(np.uint64))
    h = _mix64(h ^ np.uint64(draw))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _labels_for(seed: int, split: str, index: np.ndarray) -> np.ndarray:
    """Balanced labels: each block of 10 indices holds a seeded permutation of 0..9."""
    block = index // 10
    keys = np.stack([_uniform(seed, split, block, _D_LABEL + j) for j in range(10)], axis=1)
    perm = np.argsort(keys, axis=1, kind="stable")
    return perm[np.arange(index.shape[0]), index % 10]


def _check_shortcut(shortcut_class: int | None, shortcut_strength: float, shortcut_factor: str) -> None:
    if shortcut_factor not in SHORTCUT_FACTORS:
        raise ValueError(f"unsupported shortcut_factor {shortcut_factor!r}; choose one of {list(SHORTCUT_FACTORS)}")
    if not 0.0 <= float(shortcut_strength) <= 1.0:
        raise ValueError(f"shortcut_strength must be in [0, 1], got {shortcut_strength}")
    if shortcut_class is not None and (
        isinstance(shortcut_class, bool) or not isinstance(shortcut_class, int) or not 0 <= shortcut_class <= 9
    ):
        raise ValueError(f"shortcut_class must be an int in 0..9 or None, got {shortcut_class!r}")
    if shortcut_class is None and shortcut_strength > 0:
        raise ValueError(f"shortcut_strength={shortcut_strength} needs a shortcut_class (0..9); set one or use strength 0")


def _state_probability(labels: np.ndarray, shortcut_class: int | None, strength: float, base_rate: float) -> np.ndarray:
    """``P(z = 1 | label) = s * [label == c] + (1 - s) * base_rate``."""
    p = np.full(labels.shape, (1.0 - strength) * base_rate if shortcut_class is not None else base_rate)
    if shortcut_class is not None:
        p = p + strength * (labels == shortcut_class)
    return p


def sample_factors(
    indices: Sequence[int] | Tensor | np.ndarray,
    split: str = "train",
    seed: int = 0,
    shortcut_class: int | None = None,
    shortcut_strength: float = 0.0,
    shortcut_factor: str = "mark",
    mark_rate: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Labels and raw factors of the samples ``indices`` of a split (no rendering).

    Each sample depends only on ``(seed, split, index)`` and the shortcut settings, so any
    subset can be drawn on its own. See the module docstring for the shortcut rule.

    Returns:
        ``(labels [N] int64, factors [N, 7] float32)`` with factors in :data:`FACTOR_NAMES` order.
    """
    _check_shortcut(shortcut_class, shortcut_strength, shortcut_factor)
    if not 0.0 <= mark_rate <= 1.0:
        raise ValueError(f"mark_rate must be in [0, 1], got {mark_rate}")
    idx = np.asarray(torch.as_tensor(indices, dtype=torch.long).cpu().numpy(), dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError("indices must be non-negative")
    labels = _labels_for(seed, split, idx)

    def uni(draw: int, name: str) -> np.ndarray:
        lo, hi = FACTOR_RANGES[name]
        return lo + (hi - lo) * _uniform(seed, split, idx, draw)

    cols = {
        "thickness": uni(_D_THICKNESS, "thickness"),
        "slant": uni(_D_SLANT, "slant"),
        "scale": uni(_D_SCALE, "scale"),
        "shift_x": uni(_D_SHIFT_X, "shift_x"),
        "shift_y": uni(_D_SHIFT_Y, "shift_y"),
    }
    # intensity: a high/low state, then uniform within the state's band
    lo, hi = FACTOR_RANGES["intensity"]
    high_rate = (hi - INTENSITY_HIGH) / (hi - lo)
    if shortcut_factor == "intensity":
        p_high = _state_probability(labels, shortcut_class, shortcut_strength, high_rate)
    else:
        p_high = np.full(labels.shape, high_rate)
    high = _uniform(seed, split, idx, _D_INTENSITY_STATE) < p_high
    u = _uniform(seed, split, idx, _D_INTENSITY)
    cols["intensity"] = np.where(high, INTENSITY_HIGH + (hi - INTENSITY_HIGH) * u, lo + (INTENSITY_HIGH - lo) * u)
    # mark
    if shortcut_factor == "mark":
        p_mark = _state_probability(labels, shortcut_class, shortcut_strength, mark_rate)
    else:
        p_mark = np.full(labels.shape, mark_rate)
    cols["mark"] = (_uniform(seed, split, idx, _D_MARK) < p_mark).astype(np.float64)

    factors = torch.from_numpy(np.stack([cols[n] for n in FACTOR_NAMES], axis=1).astype(np.float32))
    return torch.from_numpy(labels.astype(np.int64)), factors


def normalize_factors(factors: Tensor) -> Tensor:
    """Map raw factors ``[..., 7]`` to ``[0, 1]`` per factor using :data:`FACTOR_RANGES`."""
    lo = torch.tensor([FACTOR_RANGES[n][0] for n in FACTOR_NAMES], dtype=factors.dtype, device=factors.device)
    hi = torch.tensor([FACTOR_RANGES[n][1] for n in FACTOR_NAMES], dtype=factors.dtype, device=factors.device)
    return (factors - lo) / (hi - lo)


# --------------------------------------------------------------------------- dataset


class RenderedDigits(Dataset):
    """A split of rendered digits, generated in batches and cached in memory.

    Args:
        size: Number of samples.
        split: Name of the random stream (``train``, ``val``, ``test`` or any other string);
            clean and shortcut versions of one split share it.
        seed: Data seed.
        shortcut_class: Class correlated with the shortcut factor, or ``None`` for clean data.
        shortcut_strength: ``s`` in ``[0, 1]`` of the shortcut rule (module docstring).
        shortcut_factor: ``"mark"`` or ``"intensity"``.
        mark_rate: Base rate of the mark.
        chunk_size: Samples rendered at once.
    """

    factor_names = FACTOR_NAMES
    class_names = CLASS_NAMES

    def __init__(
        self,
        size: int,
        split: str = "train",
        seed: int = 0,
        shortcut_class: int | None = None,
        shortcut_strength: float = 0.0,
        shortcut_factor: str = "mark",
        mark_rate: float = 0.1,
        chunk_size: int = 2048,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        _check_shortcut(shortcut_class, shortcut_strength, shortcut_factor)
        self.size = int(size)
        self.split = split
        self.seed = seed
        self.shortcut_class = shortcut_class
        self.shortcut_strength = float(shortcut_strength)
        self.shortcut_factor = shortcut_factor
        self.mark_rate = float(mark_rate)
        self.labels, self.factors = self._factors(torch.arange(self.size))
        self.images = render_digits(self.labels, self.factors, chunk_size=chunk_size)
        self._index = torch.arange(self.size, dtype=torch.long)

    def _factors(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return sample_factors(
            indices,
            split=self.split,
            seed=self.seed,
            shortcut_class=self.shortcut_class,
            shortcut_strength=self.shortcut_strength,
            shortcut_factor=self.shortcut_factor,
            mark_rate=self.mark_rate,
        )

    def generate(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Regenerate samples from scratch (no cache): ``(images, labels, factors)``."""
        labels, factors = self._factors(torch.as_tensor(indices, dtype=torch.long))
        return render_digits(labels, factors), labels, factors

    @property
    def shortcut_state(self) -> Tensor:
        """``[N]`` bool: whether the shortcut factor is in its "on" state for each sample."""
        if self.shortcut_factor == "intensity":
            return self.factors[:, _factor_column("intensity")] >= INTENSITY_HIGH
        return self.factors[:, _factor_column("mark")] > 0.5

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        i = i % self.size if self.size else i
        return {
            "image": self.images[i],
            "label": self.labels[i],
            "index": self._index[i],
            "factors": self.factors[i],
        }


class RenderedDigitsDataModule(ImageDataModule):
    """Digits rendered from known factors, optionally with a planted shortcut.

    Splits: ``train``, ``val`` and ``test`` (clean: the shortcut factor is independent of the
    class) plus ``val_shortcut`` and ``test_shortcut`` (the same digits with the training
    correlation). The shortcut is planted in ``train`` only. Samples carry ``factors`` in the
    order ``thickness, slant, scale, shift_x, shift_y, intensity, mark`` (raw values).

    Shortcut rule: the shortcut factor's binary state (mark present, or intensity >= 0.9) is on
    with probability ``s * [label == shortcut_class] + (1 - s) * base_rate``, where ``s`` is
    ``shortcut_strength`` and ``base_rate`` is ``mark_rate`` for the mark and 0.2 for intensity.

    Args:
        train_size: Number of training samples.
        val_size: Number of validation samples (clean and shortcut versions alike).
        test_size: Number of test samples (clean and shortcut versions alike).
        shortcut_class: Class that the shortcut factor is correlated with (0-9), or None for
            no shortcut.
        shortcut_strength: Strength s in [0, 1] of the correlation: 1 puts the shortcut on
            exactly the images of ``shortcut_class``, 0 makes it independent of the class.
        shortcut_factor: Factor carrying the shortcut: ``mark`` (a bright 3x3 square in the
            top-left corner) or ``intensity`` (bright strokes).
        mark_rate: Probability of the mark in clean data (the base rate of the rule).
        batch_size: Samples per batch for every loader.
        num_workers: DataLoader worker processes.
        seed: Seed of the rendered data (factors and labels of every split).
        predict_split: Split served by ``predict_dataloader``: ``train``, ``val``, ``test``,
            ``val_shortcut`` or ``test_shortcut``.
        test_corruption: Optional corruption applied to every split but ``train``.
        corruption_severity: Severity 1-5 of ``test_corruption``.
        limit: Optional cap on the number of samples per split (first ``limit`` indices).
    """

    num_classes = 10
    image_shape = (1, CANVAS, CANVAS)
    class_names = CLASS_NAMES
    factor_names = FACTOR_NAMES

    def __init__(
        self,
        train_size: int = 20000,
        val_size: int = 2000,
        test_size: int = 2000,
        shortcut_class: int | None = None,
        shortcut_strength: float = 0.0,
        shortcut_factor: str = "mark",
        mark_rate: float = 0.1,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        predict_split: str = "test",
        test_corruption: str | None = None,
        corruption_severity: int = 3,
        limit: int | None = None,
    ) -> None:
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        _check_shortcut(shortcut_class, shortcut_strength, shortcut_factor)
        if not 0.0 <= mark_rate <= 1.0:
            raise ValueError(f"mark_rate must be in [0, 1], got {mark_rate}")
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            predict_split=predict_split,
            test_corruption=test_corruption,
            corruption_severity=corruption_severity,
            limit=limit,
        )
        if predict_split not in self.split_names:
            raise ValueError(f"unknown predict_split {predict_split!r}; choose one of {list(self.split_names)}")
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.shortcut_class = shortcut_class
        self.shortcut_strength = float(shortcut_strength)
        self.shortcut_factor = shortcut_factor
        self.mark_rate = float(mark_rate)

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "val", "test", "val_shortcut", "test_shortcut")

    def build_split(self, split: str) -> RenderedDigits:
        stream = split.removesuffix("_shortcut")
        size = {"train": self.train_size, "val": self.val_size, "test": self.test_size}[stream]
        shortcut = split == "train" or split.endswith("_shortcut")
        return RenderedDigits(
            size=size,
            split=stream,
            seed=self.seed,
            shortcut_class=self.shortcut_class if shortcut else None,
            shortcut_strength=self.shortcut_strength if shortcut else 0.0,
            shortcut_factor=self.shortcut_factor,
            mark_rate=self.mark_rate,
        )

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            {
                "factor_names": list(self.factor_names),
                "shortcut_class": self.shortcut_class,
                "shortcut_strength": self.shortcut_strength,
                "shortcut_factor": self.shortcut_factor,
                "mark_rate": self.mark_rate,
                "seed": self.seed,
            }
        )
        return info
