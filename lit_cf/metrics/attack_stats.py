"""Success and step statistics of an explain run's manifest (Counterfactual Attacks' figures).

Goldwasser & Hooker report the share of attacks whose target probability reached the threshold
tau and the optimisation steps those attacks took. These functions read manifest rows (see
:class:`lit_cf.runs.ManifestRow`); nothing here runs a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["attack_stats", "attack_stats_by_pair"]


def attack_stats(rows: Sequence[Mapping[str, Any]], threshold: float) -> dict[str, Any]:
    """Figures of one run's rows.

    Args:
        rows: Manifest rows (``final_target_prob``, ``success``, ``steps``; LatentAttack's
            ``recon_pred``, ``orig_pred`` and ``recon_mse`` when present in the first row).
        threshold: tau: an attack succeeded when its final target probability is at least this.

    Returns:
        ``{"n": 0}`` for no rows, else ``n``, ``success_rate`` (target probability >= tau),
        ``flip_rate`` (the classifier predicts the target), ``steps_mean`` and ``steps_median``
        over the successful attacks (``nan`` when none), ``steps_mean_all`` over all rows, and
        for LatentAttack ``recon_pred_equals_query_pred`` (share whose decoded start latent keeps
        the query's prediction) and ``recon_mse_mean``.
    """
    if not rows:
        return {"n": 0}
    reached = [r for r in rows if r["final_target_prob"] >= threshold]
    steps_ok = [r["steps"] for r in reached]
    out: dict[str, Any] = {
        "n": len(rows),
        "success_rate": len(reached) / len(rows),
        "flip_rate": sum(bool(r["success"]) for r in rows) / len(rows),
        "steps_mean": statistics.fmean(steps_ok) if steps_ok else math.nan,
        "steps_median": statistics.median(steps_ok) if steps_ok else math.nan,
        "steps_mean_all": statistics.fmean(r["steps"] for r in rows),
    }
    if "recon_pred" in rows[0]:
        out["recon_pred_equals_query_pred"] = sum(r["recon_pred"] == r["orig_pred"] for r in rows) / len(rows)
        out["recon_mse_mean"] = statistics.fmean(r["recon_mse"] for r in rows)
    return out


def attack_stats_by_pair(
    rows: Sequence[Mapping[str, Any]], threshold: float, pairs: Iterable[tuple[int, int]]
) -> dict[str, dict[str, Any]]:
    """:func:`attack_stats` of the rows of each ``(source label, target)`` pair, keyed ``"s->t"``."""
    return {
        f"{s}->{t}": attack_stats([r for r in rows if r["source_label"] == s and r["target"] == t], threshold) for s, t in pairs
    }
