"""Explain's progress lines, its use of the Trainer (public API only) and hook clean-up."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

import lit_cf
from lit_cf.explainers import DeepInversionCounterfactual, PixelCounterfactual
from lit_cf.explainers.engine import ChunkWriter, ExplainProgress
from lit_cf.runs import RunDir
from tests.explainers.test_engine import make_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"lit-cf explain: chunk (\d+)/(\d+) \((\d+)/(\d+) records(?:, (\d+) resumed)?\) success ([\d.]+)% "
    r"\(this chunk ([\d.]+)%\), [\d.]+ m?s/record, eta \S+"
)
COMMON = dict(chunk_size=2, num_grid_images=0, accelerator="cpu")


def queries(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def pixel() -> PixelCounterfactual:
    return PixelCounterfactual(steps=4, lr=0.05, stop_probability=None, log_every=0)


def progress_lines(err: str) -> list[re.Match]:
    lines = [line for line in err.splitlines() if line.startswith("lit-cf explain: chunk")]
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m is not None]


def crash_after_first_chunk(monkeypatch) -> None:
    original = ChunkWriter.write_on_batch_end

    def write_then_crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise RuntimeError("simulated crash after the first chunk")

    monkeypatch.setattr(ChunkWriter, "write_on_batch_end", write_then_crash)


def test_one_progress_line_per_chunk_with_running_success(tmp_path, capsys):
    run = lit_cf.explain(make_classifier(batch_norm=False), queries(5), pixel(), tmp_path / "run", **COMMON)
    lines = progress_lines(capsys.readouterr().err)
    assert [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in lines] == [(1, 3, 2, 5), (2, 3, 4, 5), (3, 3, 5, 5)]
    assert all(m[5] is None for m in lines)  # nothing resumed
    success = [bool(r["success"]) for r in run.manifest]
    for m, (lo, hi) in zip(lines, [(0, 2), (0, 4), (0, 5)]):
        assert float(m[6]) == pytest.approx(100 * sum(success[lo:hi]) / (hi - lo), abs=0.05)
    for m, (lo, hi) in zip(lines, [(0, 2), (2, 4), (4, 5)]):
        assert float(m[7]) == pytest.approx(100 * sum(success[lo:hi]) / (hi - lo), abs=0.05)
    assert lines[-1][0].endswith("eta 0s")


def test_resumed_chunks_are_counted_as_resumed(tmp_path, capsys, monkeypatch):
    classifier, images = make_classifier(batch_norm=False), queries(5)
    crash_after_first_chunk(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lit_cf.explain(classifier, images, pixel(), tmp_path / "run", **COMMON)
    monkeypatch.undo()
    capsys.readouterr()
    run = lit_cf.explain(classifier, images, pixel(), tmp_path / "run", **COMMON)
    err = capsys.readouterr().err
    first = sum(bool(r["success"]) for r in run.manifest[:2]) / 2
    assert f"lit-cf explain: resuming: 1/3 chunks (2/5 records) already committed, success {first:.1%}" in err
    lines = progress_lines(err)
    assert [(int(m[1]), int(m[3]), m[5]) for m in lines] == [(2, 4, "2"), (3, 5, "2")]


def test_progress_counts_chunks_other_ranks_committed(tmp_path):
    """Under DDP rank 0 reads the chunks the other ranks committed since its last line."""
    rundir = RunDir(tmp_path)
    rundir.shards.mkdir(parents=True)
    out = io.StringIO()
    progress = ExplainProgress(rundir, num_records=6, num_chunks=3, stream=out)

    def rows(chunk: int, success: list[bool]) -> list[dict]:
        return [{"record": 2 * chunk + i, "success": s} for i, s in enumerate(success)]

    rundir.write_chunk(1, {"x": torch.zeros(2)}, rows(1, [False, False]))  # another rank's chunk
    own = rows(0, [True, True])
    rundir.write_chunk(0, {"x": torch.zeros(2)}, own)
    progress.committed(0, own)
    m = LINE.fullmatch(out.getvalue().splitlines()[-1])
    assert m is not None and (m[1], m[3], m[6], m[7]) == ("2", "4", "50.0", "100.0")


def test_inference_mode_of_the_trainer_does_not_change_the_counterfactuals(tmp_path):
    """The method leaves inference mode in its predict_step; the trainer keeps the user's setting."""
    classifier, images = make_classifier(batch_norm=False), queries(3)
    a = lit_cf.explain(classifier, images, pixel(), tmp_path / "a", inference_mode=True, **COMMON)
    b = lit_cf.explain(classifier, images, pixel(), tmp_path / "b", inference_mode=False, **COMMON)
    assert not torch.equal(a.tensor("counterfactual"), a.tensor("query"))  # it optimised
    assert torch.equal(a.tensor("counterfactual"), b.tensor("counterfactual"))


def test_no_private_lightning_attributes_in_lit_cf():
    pattern = re.compile(r"\._\w+_connector\b|\b(?:predict|fit|validate|test)_loop\.")
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "lit_cf").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "private Lightning attributes used:\n" + "\n".join(found)


def test_hooks_are_removed_even_when_explain_fails(tmp_path, monkeypatch):
    classifier = make_classifier(batch_norm=True)  # DeepInversion hooks its BatchNorm layers
    crash_after_first_chunk(monkeypatch)
    method = DeepInversionCounterfactual(steps=2, stop_probability=None, log_every=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lit_cf.explain(classifier, queries(4), method, tmp_path / "run", **COMMON)
    hooked = [type(m).__name__ for m in classifier.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"hooks left on {hooked}"
