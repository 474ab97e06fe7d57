"""``lit-cf evaluate``: score explain runs with the metric suite and write the report.

For each run: the classifier it explained (verified by checksum), its records and tensors.
Metrics are torchmetrics objects updated batch by batch on the trainer's device; set-level
numbers (FID, sFID, COUT) are computed over the whole run, the rest also per
source -> target pair. Every file is written only after all numbers exist, atomically.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from torchvision.utils import make_grid

from lit_cf import __version__
from lit_cf.errors import UserError
from lit_cf.metrics.closeness import LpDistance, PerceptualDistance
from lit_cf.metrics.cout import COUT
from lit_cf.metrics.descriptors import MNAC, CorrelationDifference
from lit_cf.metrics.diversity import Diversity
from lit_cf.metrics.features import ClassifierFeatures, FeatureMaps
from lit_cf.metrics.oracle import OracleAgreement
from lit_cf.metrics.realism import DomainFID, DUQCertainty, SplitFID
from lit_cf.metrics.sources import PenultimateFeatures, feature_layers_of, load_source, run_classifier, source_label
from lit_cf.metrics.validity import Validity
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.models.descriptors import DescriptorPredictor
from lit_cf.models.duq import DUQClassifier
from lit_cf.models.external import classifier_identity
from lit_cf.report.images import comparison_rows
from lit_cf.runs import ExplainRun, atomic_write_text
from lit_cf.utils.checkpoint import load_module

LP = (1.0, 1.5, 2.0)
NUISANCE = ("intensity", "mark")  # factors of the rendered digits that never define the class


class _Normalized(nn.Module):
    """``backbone(normalize(x))`` of a classifier, so feature hooks see what the classifier sees."""

    def __init__(self, classifier: ImageClassifier) -> None:
        super().__init__()
        self.model = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.model.backbone(self.model.normalize(x))


def perceptual_layers(classifier: ImageClassifier) -> list[str]:
    """Layers of the feature network used by ``perceptual_domain``: one per resolution stage."""
    backbone = classifier.backbone
    net = getattr(backbone, "net", None)
    if net is not None and hasattr(net, "layer1"):
        return [f"model.backbone.net.layer{i}" for i in range(1, 5)]
    names = [f"model.backbone.{n}" for n, m in backbone.named_modules() if isinstance(m, nn.MaxPool2d)]
    if not names:
        raise UserError(f"cannot choose perceptual layers for backbone {type(backbone).__name__}")
    return names


def _feature_parts(feature_net: ImageClassifier, source: Any, example: Tensor) -> tuple[nn.Module, list[str], nn.Module, str]:
    """(network, perceptual layers, FID feature extractor, how the layers were chosen).

    A lit-cf classifier with a backbone: its backbone stages; any other module: the mapping's
    ``feature_layers``, or one layer per resolution stage (:func:`auto_feature_layers`).
    """
    if hasattr(feature_net, "backbone"):
        return _Normalized(feature_net), perceptual_layers(feature_net), ClassifierFeatures(feature_net), "backbone stages"
    layers, how = feature_layers_of(feature_net, {}, source, example)
    return feature_net, layers, PenultimateFeatures(feature_net, example), how


def _load_classifier(path: str, device: torch.device, kind: type = ImageClassifier) -> ImageClassifier:
    return freeze(load_module(path, kind)).to(device)


def _check_run_against_data(run: ExplainRun, datamodule: L.LightningDataModule, name: str) -> None:
    data_meta = run.meta.get("data") or {}
    want = datamodule.describe() if hasattr(datamodule, "describe") else {}
    for key in ("datamodule", "num_classes", "image_shape"):
        if key in data_meta and key in want and data_meta[key] != want[key]:
            raise UserError(
                f"run {name} was made on other data ({key}: {data_meta[key]} vs {want[key]}): "
                "evaluate it with the datamodule it was explained on"
            )
    query, cf = run.tensor("query"), run.tensor("counterfactual")
    if query.shape != cf.shape:
        raise UserError(f"run {name}: counterfactuals {tuple(cf.shape)} and queries {tuple(query.shape)} differ in shape")
    if want.get("image_shape") and list(query.shape[1:]) != list(want["image_shape"]):
        raise UserError(f"run {name}: images of shape {tuple(query.shape[1:])}, the data has {tuple(want['image_shape'])}")
    data = datamodule.dataset(run.meta.get("split", "test"))
    for r in run.manifest[:16]:  # the stored queries must be the data's images
        if r["index"] >= len(data) or not torch.allclose(data[r["index"]]["image"], query[r["row_in_run"]], atol=1e-4):
            raise UserError(
                f"run {name}: its query for dataset index {r['index']} is not the image the given data holds "
                "there (different dataset, split, seed or corruption)"
            )


def _is_evaluation_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``lit-cf evaluate`` output (its ``metrics.json``)."""
    try:
        payload = json.loads((path / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("meta"), dict) and "lit-cf" in payload["meta"]


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def _as_float(d: Mapping[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def evaluate_run(
    name: str,
    run: ExplainRun,
    classifier: ImageClassifier,
    oracles: dict[str, tuple[ImageClassifier, str]],
    classifier_sha: str,
    feature_net: ImageClassifier | None,
    duq: DUQClassifier | None,
    device: torch.device,
    batch_size: int,
    cout_steps: int,
    descriptors: DescriptorPredictor | None = None,
    datamodule: L.LightningDataModule | None = None,
    feature_parts: tuple[nn.Module, list[str], nn.Module, str] | None = None,
) -> dict[str, Any]:
    """All metrics of one run: ``{"overall": {...}, "per_pair": {"s->t": {...}}, "records": [...]}``."""
    query_all, cf_all = run.tensor("query").float(), run.tensor("counterfactual").float()
    target_all = torch.tensor([r["target"] for r in run.manifest])
    source_all = torch.tensor([r["orig_pred"] for r in run.manifest])
    label_all = torch.tensor([r["source_label"] for r in run.manifest])
    index_all = torch.tensor([r["index"] for r in run.manifest])

    def metric_set() -> dict[str, Any]:
        ms: dict[str, Any] = {"validity": Validity(), **{f"lp{p}": LpDistance(p) for p in LP}}
        for oname in oracles:
            ms[f"oracle:{oname}"] = OracleAgreement()
        return ms

    overall = metric_set()
    if feature_net is not None:
        network, layers, features, _ = feature_parts or _feature_parts(feature_net, None, query_all[:2])
        overall["perceptual"] = PerceptualDistance(FeatureMaps(network, layers))
        overall["fid"] = DomainFID(features)
        overall["sfid"] = SplitFID(features)
    if duq is not None:
        overall["duq"] = DUQCertainty(duq)
    overall["cout"] = COUT(classifier, steps=cout_steps)
    desc = _descriptor_setup(descriptors, datamodule, run) if descriptors is not None else None
    if desc is not None and descriptors.key == "attributes":
        # MNAC/CD count binary attribute flips; continuous factors get ground-truth scores instead
        overall["mnac"] = MNAC(target_attribute=desc["target_index"])
        if desc["data_correlation"] is not None:
            overall["cd"] = CorrelationDifference(desc["target_index"], desc["data_correlation"])
    for m in overall.values():
        m.to(device)
    gt_change: list[Tensor] = []
    gt_error: list[Tensor] = []
    desc_q_all: list[Tensor] = []
    desc_cf_all: list[Tensor] = []
    pairs: dict[tuple[int, int], dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    for start in range(0, len(cf_all), batch_size):
        sl = slice(start, start + batch_size)
        x, x_cf = query_all[sl].to(device), cf_all[sl].to(device)
        target, source = target_all[sl].to(device), source_all[sl].to(device)
        with torch.no_grad():
            probs = classifier.probabilities(x_cf).float()
            preds = probs.argmax(-1)
            oracle_preds = {o: model(x_cf).argmax(-1) for o, (model, _) in oracles.items()}
        for s, t in {(int(a), int(b)) for a, b in zip(source.tolist(), target.tolist())}:
            if (s, t) not in pairs:
                pairs[(s, t)] = {k: m.to(device) for k, m in metric_set().items()}
        for key_pair, ms in pairs.items():
            mask = (source == key_pair[0]) & (target == key_pair[1])
            if mask.any():
                _update(ms, mask, x, x_cf, probs, preds, target, source, oracle_preds)
        _update(overall, None, x, x_cf, probs, preds, target, source, oracle_preds)
        if "perceptual" in overall:
            overall["perceptual"].update(x, x_cf)
            overall["fid"].update(x, real=True)
            overall["fid"].update(x_cf, real=False)
            overall["sfid"].update(x, x_cf, index_all[sl].to(device))
        if "duq" in overall:
            overall["duq"].update(x_cf, x)
        if desc is not None:
            with torch.no_grad():
                d_q, d_cf = descriptors.predict_descriptors(x), descriptors.predict_descriptors(x_cf)
            desc_q_all.append(d_q.cpu())
            desc_cf_all.append(d_cf.cpu())
            if "mnac" in overall:
                overall["mnac"].update(d_q, d_cf)
            if "cd" in overall:
                overall["cd"].update(d_q, d_cf)
            if desc["true_factors"] is not None:
                gt_change.append((d_cf - d_q).abs().cpu())
                gt_error.append((d_q.cpu() - desc["true_factors"][sl]).abs())
        correct = source == label_all[sl].to(device)  # COUT is defined on correctly classified queries
        overall["cout"].update(x, x_cf, target, source, mask=correct)
        delta = (x_cf - x).flatten(1)
        per_record = zip(
            (preds == target).tolist(),
            probs.gather(1, target[:, None]).squeeze(1).tolist(),
            delta.abs().sum(1).tolist(),
            delta.norm(dim=1).tolist(),
        )
        for i, (valid, conf, l1, l2) in enumerate(per_record):
            records.append({"record": start + i, "valid": valid, "target_conf": conf, "l1": l1, "l2": l2})

    result = {"overall": _summarise(overall, oracles, classifier_sha), "per_pair": {}, "records": records}
    if gt_change:
        result["overall"].update(_ground_truth(torch.cat(gt_change), torch.cat(gt_error), descriptors.names))
    if desc_q_all:
        result.update(_attributions(torch.cat(desc_q_all), torch.cat(desc_cf_all), target_all, list(descriptors.names)))
    for (s, t), ms in sorted(pairs.items()):
        result["per_pair"][f"{s}->{t}"] = {
            "n": int(((source_all == s) & (target_all == t)).sum()),
            **_summarise(ms, oracles, classifier_sha),
        }
    seconds = [r.get("seconds", float("nan")) for r in run.manifest]
    steps = [r.get("steps", float("nan")) for r in run.manifest]
    mem = [r["peak_memory_mb"] for r in run.manifest if "peak_memory_mb" in r]
    result["overall"].update(
        {
            "n": len(run.manifest),
            "seconds_per_cf_mean": _mean_std(seconds)[0],
            "seconds_per_cf_std": _mean_std(seconds)[1],
            "steps_mean": _mean_std(steps)[0],
            "peak_memory_mb": max(mem) if mem else float("nan"),
        }
    )
    return result


def _update(ms, mask, x, x_cf, probs, preds, target, source, oracle_preds) -> None:
    if mask is not None:
        x, x_cf, probs, preds, target, source = x[mask], x_cf[mask], probs[mask], preds[mask], target[mask], source[mask]
        oracle_preds = {k: v[mask] for k, v in oracle_preds.items()}
    ms["validity"].update(probs, target, source)
    for p in LP:
        ms[f"lp{p}"].update(x, x_cf)
    for oname, opreds in oracle_preds.items():
        ms[f"oracle:{oname}"].update(opreds, preds, target)


def _summarise(ms: dict[str, Any], oracles: dict[str, tuple[ImageClassifier, str]], classifier_sha: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, metric in ms.items():
        values = _as_float(metric.compute())
        if key.startswith("oracle:"):
            oname = key.split(":", 1)[1]
            if oracles[oname][1] == classifier_sha:  # an oracle identical to the explained model
                values = {k: float("nan") for k in values}
            out.update({f"{k}_{oname}": v for k, v in values.items()})
        else:
            out.update(values)
    oracle_ota = [v for k, v in out.items() if k.startswith("ota_") and not math.isnan(v)]
    oracle_os = [v for k, v in out.items() if k.startswith("os_") and not math.isnan(v)]
    if oracle_ota:
        out["ota_mean"] = sum(oracle_ota) / len(oracle_ota)
        out["os_mean"] = sum(oracle_os) / len(oracle_os)
    return out


def _seed_groups(loaded: list[tuple[str, ExplainRun, str, str]]) -> list[list[tuple[str, ExplainRun, str, str]]]:
    """Runs that differ only in their seed (same method settings, classifier and records).

    sigma_L (diversity) is the mean pairwise distance between the counterfactuals such runs
    produce for the same query; groups of one run get no diversity score.
    """
    groups: dict[str, list] = {}
    for item in loaded:
        _, run, _, sha = item
        key = json.dumps(
            [run.meta.get("method"), sha, run.meta.get("split"), [(r["index"], r["target"]) for r in run.manifest]],
            sort_keys=True,
            default=str,
        )
        groups.setdefault(key, []).append(item)
    return [g for g in groups.values() if len({it[1].meta.get("seed") for it in g}) >= 2]


def _descriptor_setup(predictor: DescriptorPredictor, datamodule, run: ExplainRun) -> dict[str, Any] | None:
    """Target attribute index, labelled-data correlation (CD) and exact query factors, when known."""
    names = list(predictor.names)
    target_name = getattr(datamodule, "target_attribute", None)
    target_index = names.index(target_name) if target_name in names else None
    data_correlation = None
    if target_index is not None:
        train = datamodule.dataset("train")
        base = getattr(train, "dataset", train)
        attributes = getattr(base, "attributes", None)
        data_names = list(getattr(base, "attribute_names", []) or [])
        if attributes is not None and set(names) <= set(data_names):
            from lit_cf.metrics.descriptors import attribute_correlation

            # columns matched by name: the predictor's order need not be the data's
            columns = attributes.float()[:, [data_names.index(n) for n in names]]
            data_correlation = attribute_correlation(columns, target_index)
    true_factors = None
    if predictor.key == "factors":
        from lit_cf.data.rendered import normalize_factors

        data = datamodule.dataset(run.meta.get("split", "test"))
        sample = data[run.manifest[0]["index"]]
        if "factors" not in sample:
            raise UserError("the descriptor predictor regresses factors, but the data has none (use the rendered digits)")
        base = getattr(data, "dataset", data)
        table = getattr(base, "factors", None)  # rendered digits keep all factors in one tensor
        if table is not None and len(base) == len(data):
            raw = table[torch.tensor([r["index"] for r in run.manifest])]
        else:
            raw = torch.stack([data[r["index"]]["factors"] for r in run.manifest])
        true_factors = normalize_factors(raw.float())
    return {"target_index": target_index, "data_correlation": data_correlation, "true_factors": true_factors}


def _attributions(desc_q: Tensor, desc_cf: Tensor, target: Tensor, names: list[str]) -> dict[str, Any]:
    """Local (top-3 per record) and global (overall and per target class) descriptor attributions.

    s_j = P_j(counterfactual) - P_j(query); every counterfactual moves towards its target, so
    the global score is the mean s_j with sign +1, with bootstrap 95% intervals.
    """
    from lit_cf.attribution.scores import global_attribution, local_attributions

    per_class = global_attribution(desc_q, desc_cf, None, names, group=target)
    return {
        "local_attributions": local_attributions(desc_q, desc_cf, names, k=3),
        "global_attributions": global_attribution(desc_q, desc_cf, None, names),
        "global_attributions_by_target": {str(int(c)): r for c, r in per_class.items()},
    }


def _ground_truth(change: Tensor, error: Tensor, names: list[str]) -> dict[str, float]:
    """Ground-truth factor scores on the rendered digits (factors in [0, 1] units).

    ``gt_change_<f>``: mean |predicted factor of the counterfactual - of the query|;
    ``gt_error_<f>``: the predictor's own error on queries (the noise floor of the change);
    ``gt_nuisance_change``: mean change of the nuisance factors (intensity, mark), which a
    counterfactual that changes the digit and nothing else leaves at the noise floor.
    """
    out = {}
    for j, name in enumerate(names):
        out[f"gt_change_{name}"] = float(change[:, j].mean())
        out[f"gt_error_{name}"] = float(error[:, j].mean())
    nuisance = [j for j, n in enumerate(names) if n in NUISANCE]
    style = [j for j, n in enumerate(names) if n not in NUISANCE]
    if nuisance:
        out["gt_nuisance_change"] = float(change[:, nuisance].mean())
    if style:
        out["gt_style_change"] = float(change[:, style].mean())
    return out


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


def run_evaluate(
    trainer: L.Trainer,
    datamodule: L.LightningDataModule,
    runs: list[str],
    output_dir: str,
    oracles: dict[str, str] | None = None,
    feature_network: str | None = None,
    duq: str | None = None,
    descriptors: str | None = None,
    classifier: str | None = None,
    names: list[str] | None = None,
    batch_size: int = 256,
    cout_steps: int = 50,
    num_grid_images: int = 8,
    overwrite: bool = False,
    config_yaml: str | None = None,
    reference: str | None = "test",
    reference_seed: int = 0,
) -> Path:
    """See :meth:`lit_cf.trainer.LitCFTrainer.evaluate`."""
    from lit_cf.metrics.reference import evaluate_reference, reference_rows, reference_split
    from lit_cf.metrics.stopping import stopping_summary
    from lit_cf.report import GridRow, ReportSection, markdown_table
    from lit_cf.report.html import render_report

    if not runs:
        raise UserError("evaluate needs at least one explain run directory (--runs)")
    if names is not None and len(names) != len(runs):
        raise UserError(f"names has {len(names)} entries for {len(runs)} runs")
    run_names = list(names) if names else [Path(r).name for r in runs]
    if len(set(run_names)) != len(run_names):
        raise UserError(f"run names must be unique, got {run_names}: pass names: [...] to tell the runs apart")
    for key, value, low in (
        ("batch_size", batch_size, 1),
        ("cout_steps", cout_steps, 1),
        ("num_grid_images", num_grid_images, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{key} must be an integer >= {low}, got {value}")
    if not str(output_dir).strip():
        raise UserError("output_dir is empty: name the folder to write the evaluation into")
    out = Path(output_dir)
    probe = out
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output directory {out}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable")
    if probe == out and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty: choose a new output_dir or pass overwrite: true")
        if not _is_evaluation_dir(out):  # overwrite replaces an evaluation, never other files
            raise UserError(
                f"{out} is not empty and holds no lit-cf evaluation (no valid metrics.json): "
                "choose an empty or new folder (nothing was changed)"
            )
    device = trainer.strategy.root_device
    loaded, run_models = [], {}
    for i, path in enumerate(runs):
        run = ExplainRun(path)
        for pos, r in enumerate(run.manifest):
            r["row_in_run"] = pos
        name = run_names[i]
        # any classifier source (lit_cf.metrics.sources), checked against the weights the run recorded
        model, info, sha = run_classifier(run, name, classifier, device)
        ckpt = info.get("path") or source_label(classifier)
        run_models[name] = model
        _check_run_against_data(run, datamodule, name)
        loaded.append((name, run, ckpt, sha))
    if reference is not None and feature_network:
        reference_split(datamodule, reference)  # an unknown split fails before any metric runs
    example = loaded[0][1].tensor("query")[:2].float()
    oracle_models = {}
    for o, p in (oracles or {}).items():
        m, oinfo = load_source(p, example, device)
        oracle_models[o] = (m, classifier_identity(oinfo))
    classes = getattr(datamodule, "num_classes", None)
    for o, (m, _) in oracle_models.items():
        if classes and m.num_classes != classes:
            raise UserError(f"oracle {o} has {m.num_classes} classes, the data has {classes}")
    feature_net = load_source(feature_network, example, device)[0] if feature_network else None
    feature_parts = _feature_parts(feature_net, feature_network, example) if feature_net is not None else None
    duq_model = _load_classifier(duq, device, DUQClassifier) if duq else None
    descriptor_model = freeze(load_module(descriptors, DescriptorPredictor)).to(device) if descriptors else None

    results: dict[str, Any] = {}
    sections = []
    for name, run, ckpt, sha in loaded:
        model = run_models[name]
        res = evaluate_run(
            name,
            run,
            model,
            oracle_models,
            sha,
            feature_net,
            duq_model,
            device,
            batch_size,
            cout_steps,
            descriptor_model,
            datamodule,
            feature_parts,
        )
        res["meta"] = {"run": str(Path(run.dir.root).resolve()), "method": run.meta.get("method"), "classifier": ckpt}
        res["overall"].update(stopping_summary(run))
        if reference is not None and feature_net is not None:
            real = evaluate_reference(
                feature_parts[2], datamodule, run, reference, reference_seed, batch_size=batch_size, device=device
            )
            res["reference_sample"] = {k: real.pop(k) for k in ("reference_indices", "floor_indices")}
            res["overall"].update(real)
        results[name] = res
        sections.append(_section(name, run, res, num_grid_images, GridRow, ReportSection))
    for group in _seed_groups(loaded):
        diversity = (
            Diversity(feature_extractor=feature_parts[0], layers=feature_parts[1]) if feature_net is not None else Diversity()
        )
        diversity.update(torch.stack([run.tensor("counterfactual").float() for _, run, _, _ in group], dim=1))
        value = _as_float(diversity.compute())
        for name, *_ in group:
            results[name]["overall"].update(value)
            results[name]["overall"]["diversity_runs"] = len(group)
    table = [{"method": n, **{c: r["overall"].get(c, float("nan")) for c in TABLE_COLUMNS}} for n, r in results.items()]
    oracle_cols = sorted(
        {k for r in results.values() for k in r["overall"] if k.startswith(("ota_", "os_"))} - {"ota_mean", "os_mean"}
    )
    for row, r in zip(table, results.values()):
        row.update({k: r["overall"].get(k, float("nan")) for k in oracle_cols})
    table += reference_rows(
        [
            (n, json.dumps([r.meta.get("split"), [(m["index"], m["target"]) for m in r.manifest]]), results[n]["overall"])
            for n, r, _, _ in loaded
        ]
    )
    columns = list(dict.fromkeys(k for row in table for k in row))
    table = [{c: row.get(c) for c in columns} for row in table]  # None where a row has no value
    empty = [c for c in table[0] if c != "method" and all(row[c] is None or _is_nan(row[c]) for row in table)]
    table = [{k: v for k, v in row.items() if k not in empty} for row in table]
    meta = {
        "lit-cf": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": json.dumps(datamodule.describe() if hasattr(datamodule, "describe") else type(datamodule).__name__),
        "oracles": ", ".join(oracles or {}) or "none",
        "feature network (fid_domain, perceptual_domain)": source_label(feature_network) if feature_network else "none",
        "feature layers (perceptual_domain)": f"{', '.join(feature_parts[1])} ({feature_parts[3]})" if feature_parts else "none",
        "DUQ model": duq or "none",
        "stopping": "how each run stopped its images (from its run.json); steps_mean: mean optimisation steps; "
        "tconf_mean: mean final target probability under the explained classifier",
        "fid_real_domain (realism against real images)": (
            f"{reference} split, seed {reference_seed}: counterfactuals vs real images of their target classes on the "
            "feature network (queries excluded); rows 'no edit (queries)' and 'real floor' (a disjoint real sample "
            "of the same size and classes)"
            if reference is not None and feature_network
            else "not computed (needs --feature_network and --reference)"
        ),
        "descriptor predictor": descriptors or "none",
    }
    payload = {
        "meta": meta,
        "table": table,
        "runs": {n: {k: v for k, v in r.items() if k not in ("records", "local_attributions")} for n, r in results.items()},
    }
    html = render_report("lit-cf counterfactual evaluation", table, sections, meta)  # before any file
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=2, default=float))
    atomic_write_text(out / "metrics.md", markdown_table(table) + "\n")
    if config_yaml:
        atomic_write_text(out / "config.yaml", config_yaml)
    report = out / "report.html"
    atomic_write_text(report, html)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            columns = list(table[0])
            logger.log_table(key="evaluate/comparison", columns=columns, data=[[row[c] for c in columns] for row in table])
            for rname, r in results.items():
                if "global_attributions" in r:
                    logger.log_table(
                        key=f"evaluate/{rname}/global_attributions",
                        columns=["descriptor", "score", "ci_low", "ci_high"],
                        data=[list(x) for x in r["global_attributions"]],
                    )
            for section in sections:
                if section.grid_rows:
                    q = torch.stack([r.query for r in section.grid_rows])
                    c = torch.stack([r.counterfactual for r in section.grid_rows])
                    grid = make_grid(comparison_rows(q, c), nrow=3, padding=2, pad_value=0.5)
                    logger.log_image(key=f"evaluate/{section.name}", images=[grid])
    print(markdown_table(table))
    print(f"\nlit-cf evaluate: metrics in {out / 'metrics.json'}, report {report}")
    return out


def _section(name: str, run: ExplainRun, res: dict[str, Any], k: int, GridRow, ReportSection):
    query, cf = run.tensor("query"), run.tensor("counterfactual")
    recs = res["records"]

    def row(i: int, why: str):
        r = run.manifest[i]
        local = res.get("local_attributions")
        return GridRow(
            query=query[i].float(),
            counterfactual=cf[i].float(),
            caption=f"#{r['index']} {r['orig_pred']}->{r['target']}: {why}",
            attributions=[(n, float(v)) for n, v in local[i]] if local else None,
        )

    valid = [r for r in recs if r["valid"]]
    best = sorted(valid, key=lambda r: r["l2"])[:k]
    worst = sorted(recs, key=lambda r: (r["valid"], r["target_conf"]))[:k]
    per_pair = [
        {"pair": p, **{c: v.get(c, float("nan")) for c in ("n", "flip_rate", "ota_mean", "l2_mean")}}
        for p, v in res["per_pair"].items()
    ]
    return ReportSection(
        name=name,
        grid_rows=[row(i, f"target p={recs[i]['target_conf']:.2f}") for i in range(min(k, len(recs)))],
        best=[row(r["record"], f"valid, smallest L2 {r['l2']:.2f}") for r in best],
        worst=[row(r["record"], f"{'valid' if r['valid'] else 'invalid'}, target p={r['target_conf']:.2f}") for r in worst],
        per_pair=per_pair,
        global_attributions=[tuple(x) for x in res["global_attributions"]] if "global_attributions" in res else None,
    )
