"""``lit-cf evaluate``: score explain runs with the metric suite and write the report.

For each run: the classifier it explained (verified by checksum), its records and tensors.
Metrics are torchmetrics objects updated batch by batch on the trainer's device; set-level
numbers (FID, sFID, COUT) are computed over the whole run, the rest also per
source -> target pair. Every file is written only after all numbers exist, atomically.

The jobs live in their own modules: input checks (:mod:`~lit_cf.metrics.checks`), which
metrics run and how (:mod:`~lit_cf.metrics.registry`), the rendered data's ground-truth
factor scores (:mod:`~lit_cf.metrics.factors`), the table, header and pictures
(:mod:`~lit_cf.metrics.summary`) and W&B logging (:mod:`~lit_cf.metrics.wandb_log`). This
module loads the models, scores the runs and writes the files. A run is only read: its rows
are never changed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn

from lit_cf.errors import UserError
from lit_cf.metrics.checks import EvaluateRequest, check_request, check_run_against_data
from lit_cf.metrics.diversity import Diversity
from lit_cf.metrics.factors import GroundTruthCollector, descriptor_setup
from lit_cf.metrics.features import ClassifierFeatures
from lit_cf.metrics.registry import (
    Batch,
    FeatureParts,
    MetricContext,
    Oracle,
    Scorers,
    as_floats,
    build_metrics,
    select_metrics,
    summarise,
)
from lit_cf.metrics.sources import PenultimateFeatures, feature_layers_of, load_source, run_classifier, source_label
from lit_cf.metrics.summary import LoadedRun, comparison_table, evaluation_meta, run_section
from lit_cf.metrics.wandb_log import log_evaluation
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.models.descriptors import DescriptorPredictor
from lit_cf.models.duq import DUQClassifier
from lit_cf.models.external import classifier_identity
from lit_cf.runs import ExplainRun, atomic_write_text
from lit_cf.utils.checkpoint import load_module

__all__ = ["evaluate", "evaluate_run", "perceptual_layers"]


class _Normalized(nn.Module):
    """``backbone(normalize(x))`` of a classifier, so feature hooks see what the classifier sees."""

    def __init__(self, classifier: ImageClassifier) -> None:
        super().__init__()
        self.model = classifier

    def forward(self, x: Tensor) -> Tensor:
        backbone = cast(nn.Module, self.model.backbone)
        return cast(Tensor, backbone(self.model.normalize(x)))


def perceptual_layers(classifier: ImageClassifier) -> list[str]:
    """Layers of the feature network used by ``perceptual_domain``: one per resolution stage."""
    backbone = cast(nn.Module, classifier.backbone)
    net = getattr(backbone, "net", None)
    if net is not None and hasattr(net, "layer1"):
        return [f"model.backbone.net.layer{i}" for i in range(1, 5)]
    names = [f"model.backbone.{n}" for n, m in backbone.named_modules() if isinstance(m, nn.MaxPool2d)]
    if not names:
        raise UserError(f"cannot choose perceptual layers for backbone {type(backbone).__name__}")
    return names


def feature_parts(feature_net: ImageClassifier, source: Any, example: Tensor) -> FeatureParts:
    """Perceptual network and layers, FID feature extractor, and how the layers were chosen.

    A lit-cf classifier with a backbone: its backbone stages; any other module: the mapping's
    ``feature_layers``, or one layer per resolution stage (:func:`auto_feature_layers`).
    """
    if hasattr(feature_net, "backbone"):
        return FeatureParts(
            _Normalized(feature_net), perceptual_layers(feature_net), ClassifierFeatures(feature_net), "backbone stages"
        )
    layers, how = feature_layers_of(feature_net, {}, source, example)
    return FeatureParts(feature_net, layers, PenultimateFeatures(feature_net, example), how)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def evaluate_run(loaded: LoadedRun, scorers: Scorers, datamodule: Any, device: torch.device) -> dict[str, Any]:
    """All metrics of one run: ``{"overall": {...}, "per_pair": {"s->t": {...}}, "records": [...]}``.

    Which metrics run is decided by the scorers given (:func:`~lit_cf.metrics.registry.select_metrics`).
    """
    run, classifier = loaded.run, loaded.classifier
    manifest = run.manifest
    query_all, cf_all = run.tensor("query").float(), run.tensor("counterfactual").float()
    target_all = torch.tensor([r["target"] for r in manifest])
    source_all = torch.tensor([r["orig_pred"] for r in manifest])
    label_all = torch.tensor([r["source_label"] for r in manifest])
    index_all = torch.tensor([r["index"] for r in manifest])

    descriptors = scorers.descriptors
    setup = descriptor_setup(descriptors, datamodule, run) if descriptors is not None else None
    ctx = MetricContext(scorers, classifier, setup)
    specs, pair_specs = select_metrics(ctx), select_metrics(ctx, per_pair=True)
    overall = build_metrics(specs, ctx, device)
    pairs: dict[tuple[int, int], dict[str, Any]] = {}
    ground_truth = GroundTruthCollector(setup.true_factors) if setup is not None and setup.true_factors is not None else None
    desc_q_all: list[Tensor] = []
    desc_cf_all: list[Tensor] = []
    records: list[dict[str, Any]] = []
    for start in range(0, len(cf_all), scorers.batch_size):
        sl = slice(start, start + scorers.batch_size)
        x, x_cf = query_all[sl].to(device), cf_all[sl].to(device)
        target, source = target_all[sl].to(device), source_all[sl].to(device)
        with torch.no_grad():
            probs = classifier.probabilities(x_cf).float()
            preds = probs.argmax(-1)
            oracle_preds = {o: oracle.model(x_cf).argmax(-1) for o, oracle in scorers.oracles.items()}
            d_q = d_cf = None
            if descriptors is not None:
                d_q, d_cf = descriptors.predict_descriptors(x), descriptors.predict_descriptors(x_cf)
        batch = Batch(
            x=x,
            x_cf=x_cf,
            probs=probs,
            preds=preds,
            target=target,
            source=source,
            index=index_all[sl].to(device),
            correct=source == label_all[sl].to(device),  # COUT is defined on correctly classified queries
            oracle_preds=oracle_preds,
            desc_query=d_q,
            desc_cf=d_cf,
        )
        for s, t in sorted({(int(a), int(b)) for a, b in zip(source.tolist(), target.tolist())}):
            if (s, t) not in pairs:
                pairs[(s, t)] = build_metrics(pair_specs, ctx, device)
        for (s, t), metrics in pairs.items():
            mask = (source == s) & (target == t)
            if mask.any():
                part = batch.select(mask)
                for spec in pair_specs:
                    spec.update(metrics[spec.key], part)
        for spec in specs:
            spec.update(overall[spec.key], batch)
        if d_q is not None and d_cf is not None:
            desc_q_all.append(d_q.cpu())
            desc_cf_all.append(d_cf.cpu())
            if ground_truth is not None:
                ground_truth.update(sl, d_q, d_cf)
        delta = (x_cf - x).flatten(1)
        per_record = zip(
            (preds == target).tolist(),
            probs.gather(1, target[:, None]).squeeze(1).tolist(),
            delta.abs().sum(1).tolist(),
            delta.norm(dim=1).tolist(),
        )
        for i, (valid, conf, l1, l2) in enumerate(per_record):
            records.append({"record": start + i, "valid": valid, "target_conf": conf, "l1": l1, "l2": l2})

    result: dict[str, Any] = {
        "overall": summarise(specs, overall, scorers.oracles, loaded.identity),
        "per_pair": {},
        "records": records,
    }
    if ground_truth is not None and descriptors is not None:
        result["overall"].update(ground_truth.compute(descriptors.names))
    if desc_q_all and descriptors is not None:
        result.update(_attributions(torch.cat(desc_q_all), torch.cat(desc_cf_all), target_all, list(descriptors.names)))
    for (s, t), metrics in sorted(pairs.items()):
        result["per_pair"][f"{s}->{t}"] = {
            "n": int(((source_all == s) & (target_all == t)).sum()),
            **summarise(pair_specs, metrics, scorers.oracles, loaded.identity),
        }
    seconds = [float(r.get("seconds", float("nan"))) for r in manifest]
    steps = [float(r.get("steps", float("nan"))) for r in manifest]
    mem = [r["peak_memory_mb"] for r in manifest if "peak_memory_mb" in r]
    result["overall"].update(
        {
            "n": len(manifest),
            "seconds_per_cf_mean": _mean_std(seconds)[0],
            "seconds_per_cf_std": _mean_std(seconds)[1],
            "steps_mean": _mean_std(steps)[0],
            "peak_memory_mb": max(mem) if mem else float("nan"),
        }
    )
    return result


def _attributions(desc_q: Tensor, desc_cf: Tensor, target: Tensor, names: list[str]) -> dict[str, Any]:
    """Local (top-3 per record) and global (overall and per target class) descriptor attributions.

    s_j = P_j(counterfactual) - P_j(query); every counterfactual moves towards its target, so
    the global score is the mean s_j with sign +1, with bootstrap 95% intervals.
    """
    from lit_cf.attribution.scores import global_attribution, local_attributions

    per_class = global_attribution(desc_q, desc_cf, None, names, group=target)
    assert isinstance(per_class, dict)  # grouped: one ranking per target class
    return {
        "local_attributions": local_attributions(desc_q, desc_cf, names, k=3),
        "global_attributions": global_attribution(desc_q, desc_cf, None, names),
        "global_attributions_by_target": {str(int(c)): r for c, r in per_class.items()},
    }


def _seed_groups(loaded: Sequence[LoadedRun]) -> list[list[LoadedRun]]:
    """Runs that differ only in their seed (same method settings, classifier and records).

    sigma_L (diversity) is the mean pairwise distance between the counterfactuals such runs
    produce for the same query; groups of one run get no diversity score.
    """
    groups: dict[str, list[LoadedRun]] = {}
    for item in loaded:
        run = item.run
        key = json.dumps(
            [run.meta.get("method"), item.identity, run.meta.get("split"), [(r["index"], r["target"]) for r in run.manifest]],
            sort_keys=True,
            default=str,
        )
        groups.setdefault(key, []).append(item)
    return [g for g in groups.values() if len({it.run.meta.get("seed") for it in g}) >= 2]


def _load_runs(request: EvaluateRequest, datamodule: Any, device: torch.device) -> list[LoadedRun]:
    """Open every run with the classifier it explained, checked against the data."""
    loaded = []
    for path, name in zip(request.runs, request.run_names):
        run = ExplainRun(path)
        # any classifier source (lit_cf.metrics.sources), checked against the weights the run recorded
        model, info, identity = run_classifier(run, name, request.classifier, device)
        checkpoint = info.get("path") or source_label(request.classifier)
        check_run_against_data(run, datamodule, name)
        loaded.append(LoadedRun(name, run, model, checkpoint, identity))
    return loaded


def _load_scorers(request: EvaluateRequest, datamodule: Any, example: Tensor, device: torch.device) -> Scorers:
    """The oracles, feature network, DUQ model and descriptor predictor the request names."""
    oracles = {}
    for o, source in request.oracles.items():
        model, info = load_source(source, example, device)
        oracles[o] = Oracle(model, classifier_identity(info))
    classes = getattr(datamodule, "num_classes", None)
    for o, oracle in oracles.items():
        if classes and oracle.model.num_classes != classes:
            raise UserError(f"oracle {o} has {oracle.model.num_classes} classes, the data has {classes}")
    features = None
    if request.feature_network:
        feature_net = load_source(request.feature_network, example, device)[0]
        features = feature_parts(feature_net, request.feature_network, example)
    duq = freeze(load_module(request.duq, DUQClassifier)).to(device) if request.duq else None
    descriptors = freeze(load_module(request.descriptors, DescriptorPredictor)).to(device) if request.descriptors else None
    return Scorers(
        oracles=oracles,
        features=features,
        duq=duq,
        descriptors=descriptors,
        cout_steps=request.cout_steps,
        batch_size=request.batch_size,
    )


def evaluate(trainer: L.Trainer, datamodule: Any, request: EvaluateRequest) -> Path:
    """Check, score every run, then write ``metrics.json``, ``metrics.md`` and ``report.html``."""
    from lit_cf.metrics.reference import evaluate_reference, reference_split
    from lit_cf.metrics.stopping import stopping_summary
    from lit_cf.report import markdown_table
    from lit_cf.report.html import render_report

    check_request(request)
    device = trainer.strategy.root_device
    loaded = _load_runs(request, datamodule, device)
    if request.reference is not None and request.feature_network:
        reference_split(datamodule, request.reference)  # an unknown split fails before any metric runs
    scorers = _load_scorers(request, datamodule, loaded[0].run.tensor("query")[:2].float(), device)

    results: dict[str, Any] = {}
    sections = []
    for item in loaded:
        res = evaluate_run(item, scorers, datamodule, device)
        res["meta"] = {
            "run": str(Path(item.run.dir.root).resolve()),
            "method": item.run.meta.get("method"),
            "classifier": item.checkpoint,
        }
        res["overall"].update(stopping_summary(item.run))
        if request.reference is not None and scorers.features is not None:
            real = evaluate_reference(
                scorers.features.extractor,
                datamodule,
                item.run,
                request.reference,
                request.reference_seed,
                batch_size=request.batch_size,
                device=device,
            )
            res["reference_sample"] = {k: real.pop(k) for k in ("reference_indices", "floor_indices")}
            res["overall"].update(real)
        results[item.name] = res
        sections.append(run_section(item, res, request.num_grid_images))
    for group in _seed_groups(loaded):
        features = scorers.features
        diversity = Diversity(feature_extractor=features.network, layers=features.layers) if features is not None else Diversity()
        diversity.update(torch.stack([it.run.tensor("counterfactual").float() for it in group], dim=1))
        value = as_floats(diversity.compute())
        for it in group:
            results[it.name]["overall"].update(value)
            results[it.name]["overall"]["diversity_runs"] = len(group)
    table = comparison_table(results, loaded)
    meta = evaluation_meta(request, datamodule, scorers.features)
    payload = {
        "meta": meta,
        "table": table,
        "runs": {n: {k: v for k, v in r.items() if k not in ("records", "local_attributions")} for n, r in results.items()},
    }
    html = render_report("lit-cf counterfactual evaluation", table, sections, meta)  # before any file
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, default=float))
    atomic_write_text(out / "metrics.md", markdown_table(table) + "\n")
    if request.config_yaml:
        atomic_write_text(out / "config.yaml", request.config_yaml)
    report = out / "report.html"
    atomic_write_text(report, html)
    log_evaluation(trainer.loggers, table, results, sections)
    print(markdown_table(table))
    print(f"\nlit-cf evaluate: metrics in {out / 'metrics.json'}, report {report}")
    return out
