"""What ``lit-cf evaluate`` reports: the comparison table, the header facts and each run's pictures.

Everything here reads the numbers evaluate computed (``RunResult``) and the runs' files; it
computes no metric and writes no file (see :mod:`lit_cf.metrics.suite`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lit_cf import __version__
from lit_cf.metrics.checks import EvaluateRequest
from lit_cf.metrics.reference import reference_rows
from lit_cf.metrics.registry import FeatureParts
from lit_cf.metrics.sources import source_label
from lit_cf.models.base import ImageClassifier
from lit_cf.report import GridRow, ReportSection, SequenceGrid, SequenceRow
from lit_cf.report.grids import RecordCaption, class_names_of
from lit_cf.report.outputs import declared_image_sequences
from lit_cf.runs import ExplainRun

__all__ = ["TABLE_COLUMNS", "LoadedRun", "comparison_table", "evaluation_meta", "run_section"]

TABLE_COLUMNS = (
    "n",
    "flip_rate",
    "tconf_mean",
    "oa",
    "ota_mean",
    "os_mean",
    "l1_mean",
    "l1.5_mean",
    "l2_mean",
    "perceptual_domain_mean",
    "fid_domain",
    "sfid_domain",
    "fid_real_domain",
    "duq_certainty_cf_mean",
    "cout_mean",
    "mnac_mean",
    "cd",
    "gt_nuisance_change",
    "gt_style_change",
    "diversity_perceptual_domain_mean",
    "diversity_l1_mean",
    "seconds_per_cf_mean",
    "steps_mean",
    "stopping",
)


@dataclass(frozen=True)
class LoadedRun:
    """An explain run opened for evaluation, with the classifier it explained (verified).

    Attributes:
        name: Its row name.
        run: The run (read only: evaluate never changes its rows).
        classifier: The explained classifier on the evaluation device.
        checkpoint: Where that classifier came from (for the outputs).
        identity: Its identity (checksum), to mask an oracle that is the same model.
    """

    name: str
    run: ExplainRun
    classifier: ImageClassifier
    checkpoint: str
    identity: str | None

    def records_key(self) -> str:
        """Equal for runs of the same queries and targets (they share the real-image rows)."""
        return json.dumps([self.run.meta.get("split"), [(m["index"], m["target"]) for m in self.run.manifest]])


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def comparison_table(results: Mapping[str, Mapping[str, Any]], loaded: Sequence[LoadedRun]) -> list[dict[str, Any]]:
    """One row per run (:data:`TABLE_COLUMNS` and every oracle's OS/OTA), then the real-image rows.

    Columns no row has a value for are dropped; a row without a value has None there.
    """
    table = [{"method": n, **{c: r["overall"].get(c, float("nan")) for c in TABLE_COLUMNS}} for n, r in results.items()]
    oracle_cols = sorted(
        {k for r in results.values() for k in r["overall"] if k.startswith(("ota_", "os_"))} - {"ota_mean", "os_mean"}
    )
    for row, r in zip(table, results.values()):
        row.update({k: r["overall"].get(k, float("nan")) for k in oracle_cols})
    table += reference_rows([(lr.name, lr.records_key(), results[lr.name]["overall"]) for lr in loaded])
    columns = list(dict.fromkeys(k for row in table for k in row))
    table = [{c: row.get(c) for c in columns} for row in table]  # None where a row has no value
    empty = [c for c in table[0] if c != "method" and all(row[c] is None or _is_nan(row[c]) for row in table)]
    return [{k: v for k, v in row.items() if k not in empty} for row in table]


def evaluation_meta(request: EvaluateRequest, datamodule: Any, features: FeatureParts | None) -> dict[str, Any]:
    """The facts shown above the table and stored in ``metrics.json`` (``meta``)."""
    reference, feature_network = request.reference, request.feature_network
    return {
        "lit-cf": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": json.dumps(datamodule.describe() if hasattr(datamodule, "describe") else type(datamodule).__name__),
        "oracles": ", ".join(request.oracles) or "none",
        "feature network (fid_domain, perceptual_domain)": source_label(feature_network) if feature_network else "none",
        "feature layers (perceptual_domain)": f"{', '.join(features.layers)} ({features.how})" if features else "none",
        "DUQ model": request.duq or "none",
        "stopping": "how each run stopped its images (from its run.json); steps_mean: mean optimisation steps; "
        "tconf_mean: mean final target probability under the explained classifier",
        "fid_real_domain (realism against real images)": (
            f"{reference} split, seed {request.reference_seed}: counterfactuals vs real images of their target classes on "
            "the feature network (queries excluded); rows 'no edit (queries)' and 'real floor' (a disjoint real sample "
            "of the same size and classes)"
            if reference is not None and feature_network
            else "not computed (needs --feature_network and --reference)"
        ),
        "descriptor predictor": request.descriptors or "none",
    }


def run_section(loaded: LoadedRun, result: Mapping[str, Any], k: int) -> ReportSection:
    """The report's pictures of one run: examples, best and worst cases, declared image sequences.

    Every row is captioned with source -> target (class names when the run recorded them) and
    the classifier's probability of the target before (the query) and after (the counterfactual).
    """
    run = loaded.run
    query, cf = run.tensor("query"), run.tensor("counterfactual")
    recs = result["records"]
    names = class_names_of(run.meta)
    local = result.get("local_attributions")

    def caption(i: int) -> str:
        r = run.manifest[i]
        return RecordCaption.of_row(r, after=recs[i]["target_conf"], prefix=f"#{r['index']}").text(names)

    def row(i: int, why: str = "") -> GridRow:
        return GridRow(
            query=query[i].float(),
            counterfactual=cf[i].float(),
            caption=caption(i) + (f"\n{why}" if why else ""),
            attributions=[(n, float(v)) for n, v in local[i]] if local else None,
        )

    valid = [r for r in recs if r["valid"]]
    best = sorted(valid, key=lambda r: r["l2"])[:k]
    worst = sorted(recs, key=lambda r: (r["valid"], r["target_conf"]))[:k]
    per_pair = [
        {"pair": p, **{c: v.get(c, float("nan")) for c in ("n", "flip_rate", "ota_mean", "l2_mean")}}
        for p, v in result["per_pair"].items()
    ]
    shown = list(range(min(k, len(recs))))
    return ReportSection(
        name=loaded.name,
        grid_rows=[row(i) for i in shown],
        best=[row(r["record"], f"valid, smallest L2 {r['l2']:.2f}") for r in best],
        worst=[row(r["record"], "valid" if r["valid"] else "invalid") for r in worst],
        per_pair=per_pair,
        global_attributions=[tuple(x) for x in result["global_attributions"]] if "global_attributions" in result else None,
        sequences=_sequences(run, shown, query, [caption(i) for i in shown]),
    )


def _sequences(run: ExplainRun, shown: list[int], query: Tensor, captions: list[str]) -> list[SequenceGrid]:
    """The declared image-sequence outputs of the shown records (only their shards are read)."""
    specs = declared_image_sequences(run.meta.get("method"))
    if not specs or not shown:
        return []
    checksums = run.meta.get("shards") or {}
    shards: dict[str, dict[str, Tensor]] = {}
    for i in shown:
        name = run.manifest[i]["shard"]
        if name not in shards:
            shards[name] = run.dir.load_shard(name, checksums.get(name))
    grids = []
    for key, spec in specs.items():
        rows = [run.manifest[i] for i in shown]
        if not all(key in shards[r["shard"]] for r in rows):
            continue
        frames = [shards[r["shard"]][key][r["row"]].float() for r in rows]
        if any(f.dim() != 4 or f.shape[1:] != query.shape[1:] for f in frames):
            continue
        grids.append(
            SequenceGrid(
                name=key,
                caption=spec.caption,
                rows=[SequenceRow(query[i].float(), f, c) for i, f, c in zip(shown, frames, captions)],
            )
        )
    return grids
