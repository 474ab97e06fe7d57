"""Generative factors of the rendered digits and their counter-based sampling.

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
``mark_rate`` (default 0.1) in clean data.

Randomness is counter based: each number is a hash of ``(seed, split, index, draw)``, so any
sample can be regenerated on its own and equals the cached one bit for bit. Labels are
balanced: each block of 10 consecutive indices holds every class once, in a seeded random
order.

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

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FACTOR_NAMES",
    "FACTOR_RANGES",
    "INTENSITY_HIGH",
    "SHORTCUT_FACTORS",
    "check_shortcut",
    "factor_column",
    "normalize_factors",
    "sample_factors",
]

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
#: factors that can carry the planted shortcut
SHORTCUT_FACTORS = ("mark", "intensity")


def factor_column(name: str) -> int:
    """Column of factor ``name`` in a ``[..., 7]`` factor tensor."""
    return FACTOR_NAMES.index(name)


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


def check_shortcut(shortcut_class: int | None, shortcut_strength: float, shortcut_factor: str) -> None:
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
    check_shortcut(shortcut_class, shortcut_strength, shortcut_factor)
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
