"""The manifest row: one (query, target) record of an explain run and what became of it.

Rows are JSON objects, one per line, in ``manifest.jsonl`` (record order) and in each chunk's
``shards/chunk-NNNNNN.jsonl``. :class:`ManifestRow` names the fields every row has; a method
may add per-record scalars of its own (e.g. a final loss), which readers keep as they are.
:func:`parse_row` checks a row read from a file, so a damaged one is refused with the file
and line named instead of surfacing later as a ``KeyError`` or a wrong number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from lit_cf.errors import UserError

__all__ = ["ManifestRow", "RunIntegrityError", "parse_row", "parse_rows", "PLAN_KEYS"]


class RunIntegrityError(UserError):
    """A file of an explain run is missing, truncated or altered (its checksum does not match)."""


class _RowBase(TypedDict):
    record: int
    index: int
    source_label: int
    orig_pred: int
    orig_prob: float
    target: int
    orig_target_prob: float
    seed: int
    final_pred: int
    final_target_prob: float
    success: bool
    steps: int
    seconds: float
    chunk: int
    chunk_seconds: float
    shard: str
    row: int


class ManifestRow(_RowBase, total=False):
    """One record of an explain run (``manifest.jsonl``); methods may add scalar fields.

    The plan (``record`` ... ``seed``) is fixed before any optimisation; the outcome
    (``final_pred`` ... ``chunk_seconds``) is written when the record's chunk is committed;
    ``shard`` and ``row`` locate its tensors (``shards/<shard>``, row ``row``).
    """

    peak_memory_mb: float


#: the fields that define a record (what a resumed run must plan identically)
PLAN_KEYS = ("record", "index", "source_label", "orig_pred", "target", "seed")

_INT_FIELDS = ("record", "index", "source_label", "orig_pred", "target", "seed", "final_pred", "steps", "chunk", "row")
#: ``source_label`` is -1 for unlabelled queries (a flat image folder, a tensor batch)
_LOWEST = {"source_label": -1}
_FLOAT_FIELDS = ("orig_prob", "orig_target_prob", "final_target_prob", "seconds", "chunk_seconds")


def parse_row(obj: Any, where: str) -> ManifestRow:
    """Check that ``obj`` is a manifest row (fields present, of the right type); ``where`` names it."""
    if not isinstance(obj, dict):
        raise RunIntegrityError(f"{where}: not a manifest row (a JSON object)")
    missing = [k for k in _RowBase.__annotations__ if k not in obj]
    if missing:
        raise RunIntegrityError(f"{where}: manifest row lacks {missing[:4]}")
    bad = [k for k in _INT_FIELDS if isinstance(obj[k], bool) or not isinstance(obj[k], int) or obj[k] < _LOWEST.get(k, 0)]
    bad += [k for k in _FLOAT_FIELDS if isinstance(obj[k], bool) or not isinstance(obj[k], (int, float))]
    if not isinstance(obj["success"], bool):
        bad.append("success")
    if not isinstance(obj["shard"], str) or "/" in obj["shard"] or not obj["shard"].startswith("chunk-"):
        bad.append("shard")
    if bad:
        raise RunIntegrityError(f"{where}: manifest row has invalid {bad[:4]}")
    return obj  # type: ignore[return-value]


def parse_rows(text: str, path: Path) -> list[ManifestRow]:
    """Rows of a JSON-lines file; a line that is not a valid row names ``path`` and the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunIntegrityError(f"{path} line {n} is not valid JSON ({err.msg}): the file is damaged") from err
        rows.append(parse_row(obj, f"{path} line {n}"))
    return rows
