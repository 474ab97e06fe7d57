"""Query selection and target rules for ``lit-cf explain``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lit_cf.errors import UserError

RULES = ("most_likely_other", "most_likely_others:K", "flip", "all", "label", "file")
TOP_K_PREFIX = "most_likely_others:"


def read_target_file(path: str | Path) -> dict[int, list[int]]:
    """Per-image targets from JSON (``{"<index>": t or [t, ...]}``) or CSV (``index,target`` rows)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"target file not found: {path}")
    table: dict[int, list[int]] = {}
    try:
        if path.suffix.lower() == ".json":
            obj = json.loads(path.read_text())
            if not isinstance(obj, dict):
                raise ValueError(f"the file holds a JSON {type(obj).__name__}, not an object")
            for key, value in obj.items():
                values = value if isinstance(value, list) else [value]
                if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                    raise ValueError(f"index {key}: target {json.dumps(value)} is not a class index or a list of them")
                table[int(key)] = list(values)
        else:
            with open(path, newline="") as f:
                for row in csv.reader(f):
                    if not row or not row[0].strip().lstrip("-").isdigit():
                        continue  # header or blank line
                    table.setdefault(int(row[0]), []).append(int(row[1]))
    except (ValueError, IndexError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"cannot parse target file {path}: expected JSON {{index: target}} or CSV index,target ({err})") from err
    return table


def resolve_targets(
    rule: int | Sequence[int] | str,
    probs: Tensor,
    labels: Tensor,
    indices: Sequence[int],
    num_classes: int,
    target_file: str | None = None,
    on_source_equals_target: str = "error",
) -> list[tuple[int, int]]:
    """Turn a target rule into ``(query position, target)`` pairs, in query order.

    The *source* of a query is the classifier's original prediction. Rules:
    an int (fixed class), a list of ints (several targets per query), ``most_likely_other``
    (the most probable class other than the prediction), ``most_likely_others:K`` (the K most
    probable classes other than the prediction, most probable first), ``flip`` (binary: the other class),
    ``all`` (every class but the prediction), ``label`` (the true label, e.g. for
    misclassified queries) and ``file`` (per-image targets read from ``target_file``).

    For rules that can name the source class itself (fixed, list, label, file),
    ``on_source_equals_target`` decides: ``error`` (default) or ``skip`` the pair.
    """
    if on_source_equals_target not in ("error", "skip"):
        raise UserError(f"on_source_equals_target must be 'error' or 'skip', got {on_source_equals_target!r}")
    preds = probs.argmax(-1)
    n = len(preds)
    per_query: list[list[int]]
    if isinstance(rule, bool):
        raise UserError(f"invalid target rule {rule!r}")
    if isinstance(rule, int) or (isinstance(rule, str) and rule.lstrip("-").isdigit()):
        per_query = [[int(rule)]] * n
    elif isinstance(rule, (list, tuple)):
        if not rule:
            raise UserError("target list is empty")
        per_query = [[int(t) for t in rule]] * n
    elif rule == "most_likely_other":
        masked = probs.clone()
        masked[torch.arange(n), preds] = -1.0
        per_query = [[int(t)] for t in masked.argmax(-1)]
    elif isinstance(rule, str) and rule.startswith(TOP_K_PREFIX):
        k_text = rule[len(TOP_K_PREFIX) :]
        if not k_text.isdigit() or not 1 <= int(k_text) < num_classes:
            raise UserError(
                f"target rule {rule!r}: K must be an integer from 1 to {num_classes - 1} (the classes other than the "
                f"prediction), e.g. {TOP_K_PREFIX}3"
            )
        masked = probs.clone()
        masked[torch.arange(n), preds] = -float("inf")
        order = masked.argsort(dim=-1, descending=True, stable=True)[:, : int(k_text)]
        per_query = [[int(t) for t in row] for row in order]
    elif rule == "flip":
        if num_classes != 2:
            raise UserError(f"target rule 'flip' needs a binary classifier, this one has {num_classes} classes")
        per_query = [[1 - int(p)] for p in preds]
    elif rule == "all":
        per_query = [[c for c in range(num_classes) if c != int(p)] for p in preds]
    elif rule == "label":
        per_query = [[int(y)] for y in labels]
    elif rule == "file":
        if target_file is None:
            raise UserError("target rule 'file' needs target_file (JSON {index: target} or CSV index,target)")
        table = read_target_file(target_file)
        missing = [i for i in indices if int(i) not in table]
        if missing:
            raise UserError(f"target file {target_file} has no target for dataset indices {missing[:10]}")
        per_query = [table[int(i)] for i in indices]
    else:
        raise UserError(f"unknown target rule {rule!r}: use a class index, a list of classes, or one of {list(RULES)}")

    bad = sorted({t for ts in per_query for t in ts if not 0 <= t < num_classes})
    if bad:
        raise UserError(f"target class(es) {bad} out of range: the classifier has classes 0..{num_classes - 1}")
    pairs: list[tuple[int, int]] = []
    clashes: list[int] = []
    for q, targets in enumerate(per_query):
        for t in targets:
            if t == int(preds[q]):
                clashes.append(int(indices[q]))
                continue
            pairs.append((q, t))
    if clashes and on_source_equals_target == "error":
        raise UserError(
            f"{len(clashes)} queries are already predicted as their target (dataset indices {clashes[:10]}"
            f"{'...' if len(clashes) > 10 else ''}): choose other queries (e.g. source_class/select), another "
            "target, or set on_source_equals_target: skip"
        )
    return pairs
