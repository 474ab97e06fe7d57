"""Deprecated import path, kept for one release: the run grids live in :mod:`lit_cf.report.grids`.

``lit_cf.report`` draws every picture (grids, difference maps, progression strips); import
``write_grids`` and ``save_png`` from :mod:`lit_cf.report.grids` and the image panels from
:mod:`lit_cf.report.images`.
"""

from __future__ import annotations

from lit_cf.report.grids import save_png, write_grids
from lit_cf.report.images import comparison_rows, signed_difference

__all__ = ["comparison_rows", "save_png", "signed_difference", "write_grids"]
