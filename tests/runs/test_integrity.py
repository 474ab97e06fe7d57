"""The run format on its own: atomic writes, checksums, verification, redo of damaged chunks.

A small run is written through :class:`RunDir` directly (no model), then damaged in every way a
disk, a kill or a hand can damage it; readers must refuse it naming the file, and a resume must
drop exactly the damaged chunks.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from lit_cf.errors import UserError
from lit_cf.runs import ExplainRun, RunDir, RunIntegrityError, atomic_write_text, check_output_dir, parse_row

CHUNK = 3
N = 7  # chunks of 3, 3, 1


def _records() -> list[dict]:
    return [
        {"record": r, "index": 10 + r, "source_label": r % 2, "orig_pred": r % 2, "orig_prob": 0.9,
         "target": 1 - r % 2, "orig_target_prob": 0.1, "seed": 100 + r}
        for r in range(N)
    ]  # fmt: skip


PLAN = {"method": {"name": "test"}, "seed": 0, "chunk_size": CHUNK, "num_records": N}


def _chunk_rows(records: list[dict], chunk: int) -> list[dict]:
    rows = []
    for rec in records[chunk * CHUNK : (chunk + 1) * CHUNK]:
        rows.append({**rec, "final_pred": rec["target"], "final_target_prob": 0.8, "success": True, "steps": 5,
                     "seconds": 0.01, "chunk": chunk, "chunk_seconds": 0.03})  # fmt: skip
    return rows


def _chunk_tensors(chunk: int) -> dict[str, torch.Tensor]:
    n = len(range(N)[chunk * CHUNK : (chunk + 1) * CHUNK])
    g = torch.Generator().manual_seed(chunk)
    return {"counterfactual": torch.rand(n, 1, 4, 4, generator=g), "query": torch.rand(n, 1, 4, 4, generator=g)}


def write_run(root: Path) -> RunDir:
    rundir = RunDir(root)
    records = _records()
    assert rundir.prepare(PLAN, records, overwrite=False) == "new"
    for chunk in range(3):
        rundir.write_chunk(chunk, _chunk_tensors(chunk), _chunk_rows(records, chunk))
    rows, integrity = rundir.merge(N)
    rundir.finish({"success_rate": 1.0, **integrity})
    return rundir


@pytest.fixture
def run(tmp_path) -> Path:
    return write_run(tmp_path / "run").root


def test_complete_run_reads_back_in_record_order(run):
    r = ExplainRun(run)
    assert len(r) == N and [row["record"] for row in r.manifest] == list(range(N))
    expected = torch.cat([_chunk_tensors(c)["counterfactual"] for c in range(3)])
    assert torch.equal(r.tensor("counterfactual"), expected)
    assert r.has_tensor("query") and not r.has_tensor("latent")
    meta = json.loads((run / "run.json").read_text())
    assert set(meta["shards"]) == {f"chunk-{c:06d}.safetensors" for c in range(3)}
    assert len(meta["manifest_sha256"]) == 64 and meta["version"] == 2
    assert not list(run.rglob("*.tmp"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


SHARD = "shards/chunk-000001.safetensors"


@pytest.mark.parametrize(
    "damage,file,when",
    [
        (lambda p: _flip(p, -5), SHARD, "tensor"),  # tensor data
        (lambda p: _flip(p, 12), SHARD, "tensor"),  # safetensors header
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), SHARD, "tensor"),  # truncated
        (lambda p: p.unlink(), SHARD, "tensor"),  # deleted
        (lambda p: p.write_text("".join(p.read_text().splitlines(keepends=True)[:4])), "manifest.jsonl", "open"),
        (lambda p: p.write_bytes(p.read_bytes()[:-30]), "manifest.jsonl", "open"),  # cut mid-line
        (lambda p: p.write_text(p.read_text().replace('"target": 1', '"target": 0', 1)), "manifest.jsonl", "open"),
        (lambda p: p.write_bytes(p.read_bytes()[:50]), "run.json", "open"),
        (lambda p: p.write_text(p.read_text().replace('"seed": 0', '"seed": 1')), "run.json", "open"),
    ],
)
def test_damaged_run_is_refused_naming_the_file(run, damage, file, when):
    damage(run / file)
    with pytest.raises(RunIntegrityError, match=Path(file).name):
        ExplainRun(run).tensor("counterfactual") if when == "tensor" else ExplainRun(run)


def test_resume_drops_exactly_the_damaged_chunks(run, capsys):
    rundir = RunDir(run)
    _flip(run / SHARD, -3)  # shard of chunk 1
    rows2 = run / "shards/chunk-000002.jsonl"
    rows2.write_text(rows2.read_text().replace('"steps": 5', '"steps": 6', 1))  # edited rows of chunk 2
    assert rundir.state(PLAN, _records(), overwrite=False) == "resume"  # complete but damaged
    assert rundir.prepare(PLAN, _records(), overwrite=False) == "resume"
    assert rundir.done_chunks() == {0}
    assert not (run / SHARD).exists() and not (run / "manifest.jsonl").exists()
    assert "recomputing" in capsys.readouterr().out
    records = _records()
    for chunk in (1, 2):  # what the engine does next
        rundir.write_chunk(chunk, _chunk_tensors(chunk), _chunk_rows(records, chunk))
    rows, integrity = rundir.merge(N)
    rundir.finish(integrity)
    assert torch.equal(ExplainRun(run).tensor("query"), torch.cat([_chunk_tensors(c)["query"] for c in range(3)]))


def test_chunk_of_other_records_is_redone(run):
    records = _records()
    records[0]["target"] = 5  # a different plan for chunk 0 (same fingerprint is the engine's job)
    damaged = RunDir(run).cleanup_partial(records, CHUNK)
    assert damaged == [0]


def test_output_dir_rules(tmp_path, run):
    with pytest.raises(UserError, match="output_dir is empty"):
        check_output_dir("")
    user = tmp_path / "mine"
    (user / "grids").mkdir(parents=True)
    (user / "config.yaml").write_text("my: config\n")
    with pytest.raises(UserError, match="holds no lit-cf explain run"):
        check_output_dir(user)
    with pytest.raises(UserError, match="not a directory"):
        check_output_dir(user / "config.yaml")
    check_output_dir(run)  # a lit-cf run
    check_output_dir(tmp_path / "new" / "deeper")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".run.json.abc.tmp").write_text("{")  # an interrupted first write
    check_output_dir(empty)
    (run / "run.json").write_text("{}")
    with pytest.raises(RunIntegrityError, match="run.json"):
        check_output_dir(run)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import lit_cf.runs.atomic as atomic

    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_parse_row_checks_fields():
    row = {**_records()[0], **_chunk_rows(_records(), 0)[0], "shard": "chunk-000000.safetensors", "row": 0}
    assert parse_row(row, "here") is row
    with pytest.raises(RunIntegrityError, match="lacks"):
        parse_row({k: v for k, v in row.items() if k != "target"}, "here")
    with pytest.raises(RunIntegrityError, match="invalid"):
        parse_row({**row, "index": "3"}, "here")
    with pytest.raises(RunIntegrityError, match="invalid"):
        parse_row({**row, "shard": "../../etc/passwd"}, "here")


def test_explainers_reexports_the_run_format():
    from lit_cf.explainers import ExplainRun as A
    from lit_cf.explainers.rundir import ExplainRun as B
    from lit_cf.explainers.rundir import RunDir as C

    assert A is B is ExplainRun and C is RunDir
