"""How the pictures draw the extra outputs a counterfactual method declares.

A method saves extra per-record tensors next to its counterfactuals (``declared_outputs``)
and says, with an :class:`OutputSpec` per tensor, which of them are pictures. The spec is
recorded in the run (``run.json``, ``method.outputs``), so the explain grids and the
evaluate report draw every declared image sequence the same way, whichever method wrote it:
query | frame 1 | ... | frame K | signed difference of the last frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["IMAGE_SEQUENCE", "KINDS", "OutputSpec", "declared_image_sequences"]

#: a per-record image sequence ``[B, K, C, H, W]`` in ``[0, 1]`` (e.g. intermediate counterfactuals)
IMAGE_SEQUENCE = "image_sequence"
KINDS = (IMAGE_SEQUENCE,)


@dataclass(frozen=True)
class OutputSpec:
    """What a declared extra output holds and how the pictures caption it.

    Args:
        kind: One of :data:`KINDS` (``"image_sequence"``: ``[B, K, C, H, W]`` images).
        caption: One line shown above the pictures of this output (e.g. "stages, first to last").
    """

    kind: str
    caption: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown output kind {self.kind!r}; expected one of {KINDS}")

    def to_json(self) -> dict[str, str]:
        """The spec as recorded in ``run.json``."""
        return {"kind": self.kind, "caption": self.caption}


def declared_image_sequences(method_meta: Any) -> dict[str, OutputSpec]:
    """The image-sequence outputs a run's method record (``run.json`` ``method``) declares, in order.

    Entries of other or unknown kinds, and malformed entries, are skipped: a run's file only
    decides what is drawn, never what code runs. Runs written before outputs were declared
    have none.
    """
    outputs = method_meta.get("outputs") if isinstance(method_meta, Mapping) else None
    if not isinstance(outputs, Mapping):
        return {}
    found = {}
    for name, entry in outputs.items():
        if isinstance(name, str) and isinstance(entry, Mapping) and entry.get("kind") == IMAGE_SEQUENCE:
            found[name] = OutputSpec(IMAGE_SEQUENCE, str(entry.get("caption") or ""))
    return found
