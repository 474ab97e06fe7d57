"""The parts of ``lit-cf evaluate``: input checks, the metric registry, ground-truth factor scores,
and that scoring a run leaves its rows as they were."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from lit_cf.errors import UserError
from lit_cf.metrics.checks import EvaluateRequest, check_request, check_run_against_data
from lit_cf.metrics.factors import NUISANCE, ground_truth_scores
from lit_cf.metrics.registry import (
    Batch,
    FeatureParts,
    MetricContext,
    Oracle,
    Scorers,
    build_metrics,
    select_metrics,
    summarise,
)
from lit_cf.metrics.suite import evaluate_run
from lit_cf.metrics.summary import LoadedRun, run_section
from lit_cf.models.backbones import ConvNet
from lit_cf.models.classifier import Classifier
from lit_cf.runs import ExplainRun, RunDir


def _classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ConvNet(in_channels=1, channels=(4, 8), hidden=16, image_size=8), num_classes=3).eval()


def test_registry_decides_the_metrics_from_the_inputs():
    clf = _classifier()
    base = select_metrics(MetricContext(Scorers(), clf))
    assert [s.key for s in base] == ["validity", "lp1.0", "lp1.5", "lp2.0", "cout"]
    features = FeatureParts(nn.Identity(), ["x"], nn.Identity(), "test")
    ctx = MetricContext(Scorers(oracles={"o": Oracle(clf, "abc")}, features=features, duq=nn.Identity()), clf)
    assert [s.key for s in select_metrics(ctx)] == [
        "validity",
        "lp1.0",
        "lp1.5",
        "lp2.0",
        "oracle:o",
        "perceptual",
        "fid",
        "sfid",
        "duq",
        "cout",
    ]
    assert [s.key for s in select_metrics(ctx, per_pair=True)] == ["validity", "lp1.0", "lp1.5", "lp2.0", "oracle:o"]


def _batch(n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    probs = torch.softmax(torch.randn(n, 3, generator=g), -1)
    target = torch.tensor([1, 2, 0, 1, 2, 0][:n])
    return Batch(
        x=x,
        x_cf=(x + 0.1).clamp(0, 1),
        probs=probs,
        preds=probs.argmax(-1),
        target=target,
        source=(target + 1) % 3,
        index=torch.arange(n),
        correct=torch.ones(n, dtype=torch.bool),
        oracle_preds={"same": target.clone(), "other": target.clone()},
    )


def test_summarise_masks_an_oracle_that_is_the_explained_classifier():
    clf = _classifier()
    oracles = {"same": Oracle(clf, "sha-1"), "other": Oracle(clf, "sha-2")}
    ctx = MetricContext(Scorers(oracles=oracles), clf)
    specs = select_metrics(ctx, per_pair=True)
    metrics = build_metrics(specs, ctx, torch.device("cpu"))
    batch = _batch()
    for spec in specs:
        spec.update(metrics[spec.key], batch)
    out = summarise(specs, metrics, oracles, "sha-1")
    assert math.isnan(out["ota_same"]) and math.isnan(out["os_same"])
    # the oracle predicts every target (OTA 1) and agrees with the explained classifier where it flipped
    assert out["ota_other"] == 1.0 and out["ota_mean"] == 1.0
    assert out["os_other"] == pytest.approx(float((batch.preds == batch.target).float().mean()))
    assert out["l1_mean"] == pytest.approx(float((batch.x_cf - batch.x).abs().flatten(1).sum(1).mean()), rel=1e-5)
    # the per-pair selection of a batch keeps records and their oracle predictions aligned
    part = batch.select(batch.target == 1)
    assert part.x.shape[0] == 2 and part.oracle_preds["other"].tolist() == [1, 1]


def test_ground_truth_scores_split_nuisance_and_style_factors():
    names = ["thickness", "slant", *NUISANCE]
    change = torch.tensor([[0.1, 0.3, 0.0, 0.2], [0.3, 0.1, 0.2, 0.0]])
    error = torch.full((2, 4), 0.05)
    out = ground_truth_scores(change, error, names)
    assert out["gt_change_thickness"] == pytest.approx(0.2) and out["gt_error_mark"] == pytest.approx(0.05)
    assert out["gt_nuisance_change"] == pytest.approx(0.1)  # mean over intensity and mark
    assert out["gt_style_change"] == pytest.approx(0.2)
    assert "gt_nuisance_change" not in ground_truth_scores(change[:, :2], error[:, :2], names[:2])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runs": []}, "at least one explain run"),
        ({"names": ["a"]}, "names has 1 entries for 2 runs"),
        ({"runs": ["x/run", "y/run"]}, "run names must be unique"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_grid_images": True}, "num_grid_images must be an integer"),
        ({"output_dir": " "}, "output_dir is empty"),
    ],
)
def test_check_request_refuses_bad_values(tmp_path, changes, message):
    request = EvaluateRequest(runs=["a", "b"], output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match=message):
        check_request(EvaluateRequest(**{**request.__dict__, **changes}))
    assert not (tmp_path / "out").exists()


def test_check_request_never_overwrites_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    request = EvaluateRequest(runs=["a"], output_dir=str(out))
    with pytest.raises(UserError, match="is not empty"):
        check_request(request)
    with pytest.raises(UserError, match="holds no lit-cf evaluation"):
        check_request(EvaluateRequest(runs=["a"], output_dir=str(out), overwrite=True))
    (out / "metrics.json").write_text(json.dumps({"meta": {"lit-cf": "0"}}))
    check_request(EvaluateRequest(runs=["a"], output_dir=str(out), overwrite=True))  # an earlier evaluation: replaced
    assert (out / "mine.txt").read_text() == "keep"


class _Data:
    """A datamodule stand-in holding the run's queries at their dataset indices."""

    num_classes = 3

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def describe(self) -> dict:
        return {"datamodule": "Tiny", "num_classes": 3, "image_shape": [1, 8, 8]}

    def dataset(self, split: str) -> list[dict]:
        return [{"image": img, "label": torch.tensor(0)} for img in self.images]


def _explain_run(root, n: int = 6, method: dict | None = None, stages: int = 0) -> tuple[ExplainRun, torch.Tensor]:
    """A complete explain run written through the run format (two chunks), as explain writes it."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n + 2, 1, 8, 8, generator=g)
    records = [
        {"record": i, "index": i + 1, "source_label": i % 3, "orig_pred": i % 3, "target": (i + 1) % 3, "seed": 0}
        for i in range(n)
    ]
    rundir = RunDir(root)
    plan = {
        "method": method or {"class_path": "tiny"},
        "data": _Data(images).describe(),
        "split": "test",
        "chunk_size": 3,
        "seed": 0,
    }
    assert rundir.prepare({**plan, "num_records": n}, records, overwrite=False) == "new"
    for chunk, start in enumerate(range(0, n, 3)):
        recs = records[start : start + 3]
        rows = [
            {
                **r,
                "orig_prob": 0.8,
                "orig_target_prob": 0.1,
                "final_pred": r["target"],
                "final_target_prob": 0.7,
                "success": True,
                "steps": 4,
                "seconds": 0.5,
                "chunk": chunk,
                "chunk_seconds": 1.5,
            }
            for r in recs
        ]
        q = images[[r["index"] for r in recs]]
        tensors = {"query": q, "counterfactual": (q + 0.2).clamp(0, 1)}
        if stages:
            tensors["stages"] = torch.stack([(q + 0.2 * (k + 1) / stages).clamp(0, 1) for k in range(stages)], 1)
        rundir.write_chunk(chunk, tensors, rows)
    _, integrity = rundir.merge(n)
    rundir.finish(integrity)
    return ExplainRun(root), images


def test_scoring_a_run_leaves_its_rows_unchanged(tmp_path):
    run, images = _explain_run(tmp_path / "run")
    before = copy.deepcopy(run.manifest)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    data = _Data(images)
    check_run_against_data(run, data, "run")
    loaded = LoadedRun("run", run, _classifier(), "tiny.ckpt", "sha")
    result = evaluate_run(loaded, Scorers(cout_steps=2, batch_size=4), data, torch.device("cpu"))
    section = run_section(loaded, result, k=2)
    assert run.manifest == before  # no key added, none changed
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    assert result["overall"]["n"] == 6 and [r["record"] for r in result["records"]] == list(range(6))
    assert sum(v["n"] for v in result["per_pair"].values()) == 6
    assert result["overall"]["steps_mean"] == 4.0
    # captions: dataset index, source -> target, p(target) before (the run) and after (evaluate)
    conf = result["records"][0]["target_conf"]
    assert section.grid_rows[0].caption == f"#1 0 -> 1  p(1) 0.10 -> {conf:.2f}"
    # the data check compares the stored queries with the data's images
    shifted = _Data(torch.roll(images, 1, 0))
    with pytest.raises(UserError, match="is not the image"):
        check_run_against_data(run, shifted, "run")


def test_report_section_draws_the_declared_image_sequences_of_a_run(tmp_path):
    method = {"class_path": "tiny", "outputs": {"stages": {"kind": "image_sequence", "caption": "four stages"}}}
    run, images = _explain_run(tmp_path / "run", method=method, stages=4)
    loaded = LoadedRun("run", run, _classifier(), "tiny.ckpt", "sha")
    result = evaluate_run(loaded, Scorers(cout_steps=2), _Data(images), torch.device("cpu"))
    section = run_section(loaded, result, k=4)  # records 0-2 in the first shard, 3 in the second
    (grid,) = section.sequences
    assert grid.name == "stages" and grid.caption == "four stages" and len(grid.rows) == 4
    stages = run.tensor("stages")
    for i, row in enumerate(grid.rows):
        torch.testing.assert_close(row.frames, stages[i])
        assert row.caption == section.grid_rows[i].caption
    # undeclared, the same tensor is not drawn
    plain, images = _explain_run(tmp_path / "plain", stages=4)
    loaded = LoadedRun("plain", plain, _classifier(), "tiny.ckpt", "sha")
    assert (
        run_section(loaded, evaluate_run(loaded, Scorers(cout_steps=2), _Data(images), torch.device("cpu")), k=2).sequences == []
    )
