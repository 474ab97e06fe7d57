"""Cell formatting shared by the HTML and Markdown reports."""

from __future__ import annotations

import math
import numbers
from typing import Any

MISSING = "\u2013"  # en dash, shown for None / NaN


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, NumPy or a one-element tensor), else None.

    Booleans are not numbers here: a flag column is shown as text and never plotted.
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            count = numel() if callable(numel) else numel
            if count == 1:
                v = item()
                if isinstance(v, numbers.Real) and not isinstance(v, bool):
                    return float(v)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def is_missing(value: Any) -> bool:
    """True for None and NaN (of any numeric type)."""
    if value is None:
        return True
    x = as_number(value)
    return x is not None and math.isnan(x)


def format_value(value: Any) -> str:
    """One table cell as text: floats with 4 significant digits, None/NaN as an en dash.

    Integers are printed in full, booleans and strings as they are.
    """
    if is_missing(value):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    x = as_number(value)
    if x is not None:
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x.is_integer() and _is_integer_like(value):
            return str(int(x))
        return f"{x:.4g}"
    return str(value)


def _is_integer_like(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    is_floating = getattr(dtype, "is_floating_point", None)
    if isinstance(is_floating, bool):  # torch dtype
        return not is_floating and not getattr(dtype, "is_complex", False)
    kind = getattr(dtype, "kind", None)  # numpy dtype
    return kind in ("i", "u")


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Union of the rows' keys, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def cell(row: dict[str, Any], column: str) -> Any:
    """``row[column]`` (keys compared as strings), None when absent."""
    if column in row:
        return row[column]
    for key, value in row.items():
        if str(key) == column:
            return value
    return None
