"""Damaged runs through every reader: evaluate, explain's resume, the counterfactual datamodule
and attribution. One tiny finished run is made per module; each test damages a copy.

The property test feeds seeded random truncations and bit flips of the run's files (and of the
classifier checkpoint) to the verbs and asserts: a clear error (exit 2, one ``lit-cf: error:``
line naming the problem, no traceback) or the correct result - never a traceback, never a wrong
number.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.runs import ExplainRun, RunIntegrityError
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=32",
    "--data.init_args.test_size=32",
]
TIMING = {"seconds", "chunk_seconds", "peak_memory_mb"}


def explain_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "explain", *DATA, f"--config={CONFIGS / 'explain/pixel.yaml'}", "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out.parent}",
        f"--classifier={ckpt}", f"--output_dir={out}", "--num_queries=8", "--chunk_size=4",
        "--model.init_args.steps=4", "--model.init_args.lr=0.05", "--num_grid_images=4", *extra,
    ]  # fmt: skip


def evaluate_args(run: Path, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate", *DATA, "--trainer.accelerator=cpu", "--trainer.logger=false", f"--runs=[{run}]",
        f"--output_dir={out}", "--cout_steps=2", "--num_grid_images=2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(cnn_ckpt, tmp_path_factory):
    """A finished tiny run and the metrics evaluate computes on it (the correct result)."""
    root = tmp_path_factory.mktemp("damaged")
    run = root / "run"
    main(explain_args(cnn_ckpt, run))
    main(evaluate_args(run, root / "eval"))
    return run, _numbers(root / "eval")


def _numbers(out: Path) -> dict:
    payload = json.loads((out / "metrics.json").read_text())
    overall = next(iter(payload["runs"].values()))["overall"]
    return {k: v for k, v in overall.items() if not k.startswith(("seconds", "peak_memory"))}


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"  # same folder name: evaluate names rows after it
    shutil.copytree(run, dst)
    return dst


def _flip(path: Path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


def _expect_clear_error(args: list[str], capsys, *names: str) -> str:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("lit-cf: error:")]
    assert len(lines) == 1, stderr[-2000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


SHARD = "shards/chunk-000001.safetensors"
DAMAGES = {
    "shard data flipped": (SHARD, lambda p: _flip(p, -7)),
    "shard header flipped": (SHARD, lambda p: _flip(p, 20)),
    "shard truncated": (SHARD, lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "shard deleted": (SHARD, lambda p: p.unlink()),
    "manifest cut at a line": ("manifest.jsonl", lambda p: p.write_text("".join(p.read_text().splitlines(True)[:4]))),
    "manifest cut mid-line": ("manifest.jsonl", lambda p: p.write_bytes(p.read_bytes()[:-25])),
    "run.json damaged": ("run.json", lambda p: p.write_bytes(p.read_bytes()[:-3])),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_evaluate_refuses_a_damaged_run_naming_the_file(finished, tmp_path, capsys, case):
    name, damage = DAMAGES[case]
    run = _copy(finished[0], tmp_path)
    damage(run / name)
    out = tmp_path / "eval"
    _expect_clear_error(evaluate_args(run, out), capsys, Path(name).name)
    assert not out.exists()


@pytest.mark.parametrize("case", ["shard data flipped", "manifest cut at a line", "run.json damaged"])
def test_counterfactual_datamodule_and_attribution_refuse_a_damaged_run(finished, tmp_path, case):
    from lit_cf.attribution.scores import attribute_run
    from lit_cf.data import CounterfactualDataModule

    name, damage = DAMAGES[case]
    run = _copy(finished[0], tmp_path)
    damage(run / name)
    with pytest.raises(RunIntegrityError, match=Path(name).name):
        CounterfactualDataModule(runs=[str(run)]).dataset("train")
    with pytest.raises(RunIntegrityError, match=Path(name).name):
        attribute_run(ExplainRun(run), lambda x: x.flatten(1)[:, :3], names=["a", "b", "c"], n_boot=0)


def test_fit_on_a_damaged_counterfactual_run_is_one_error_and_leaves_no_folder(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    _flip(run / SHARD, -7)
    logs = tmp_path / "logs"
    args = [
        "fit", f"--config={CONFIGS / 'model/cnn.yaml'}", f"--config={CONFIGS / 'logger/csv.yaml'}",
        "--data=lit_cf.data.CounterfactualDataModule", f"--data.init_args.runs=[{run}]",
        f"--trainer.default_root_dir={logs}", f"--trainer.logger.init_args.save_dir={logs}", "--trainer.max_epochs=1",
        "--sample_grid.num_samples=0",
    ]  # fmt: skip
    _expect_clear_error(args, capsys, "chunk-000001.safetensors")
    assert not logs.exists()


def _same_run(a: Path, b: Path) -> None:
    ra, rb = ExplainRun(a), ExplainRun(b)
    strip = lambda run: [{k: v for k, v in r.items() if k not in TIMING} for r in run.manifest]  # noqa: E731
    assert strip(ra) == strip(rb)
    for key in ("counterfactual", "query", "final_probs"):
        assert torch.equal(ra.tensor(key), rb.tensor(key)), key


@pytest.mark.parametrize("case", ["shard data flipped", "shard deleted", "manifest cut mid-line", "chunk rows edited"])
def test_resume_redoes_a_damaged_chunk_bit_for_bit(finished, cnn_ckpt, tmp_path, capsys, case):
    run = _copy(finished[0], tmp_path)
    if case == "chunk rows edited":
        rows = run / "shards/chunk-000000.jsonl"
        _flip(rows, 30)  # inside the first row of chunk 0
        (run / "manifest.jsonl").unlink()  # as if killed before the merge: the chunk rows are read again
    else:
        name, damage = DAMAGES[case]
        damage(run / name)
    main(explain_args(cnn_ckpt, run))
    assert "recomputing" in capsys.readouterr().out
    _same_run(run, finished[0])


def test_resume_refuses_a_damaged_run_json(finished, cnn_ckpt, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    DAMAGES["run.json damaged"][1](run / "run.json")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    _expect_clear_error(explain_args(cnn_ckpt, run), capsys, "run.json")
    _expect_clear_error(explain_args(cnn_ckpt, run, "--overwrite=true"), capsys, "run.json")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_full_disk_is_one_error_and_a_rerun_resumes(finished, cnn_ckpt, tmp_path, capsys, monkeypatch):
    import lit_cf.runs.rundir as rundir

    real = rundir.atomic_save_tensors
    calls = []

    def fill_up(path, tensors):
        calls.append(path)
        if len(calls) == 2:  # the second chunk hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors)

    monkeypatch.setattr(rundir, "atomic_save_tensors", fill_up)
    run = tmp_path / "run"
    line = _expect_clear_error(explain_args(cnn_ckpt, run), capsys, "no space left on device")
    assert "again" in line
    assert not list(run.rglob("*.tmp"))
    monkeypatch.setattr(rundir, "atomic_save_tensors", real)
    main(explain_args(cnn_ckpt, run))
    _same_run(run, finished[0])


# ----------------------------------------------------------------------------- property test
RUN_FILES = ("run.json", "manifest.jsonl", "shards/chunk-000000.safetensors", SHARD, "shards/chunk-000000.jsonl")


def _random_damage(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} at {cut}/{len(data)}"
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped a bit of {path.name} at {pos}"


@pytest.mark.parametrize("seed", range(6))
def test_random_damage_gives_a_clear_error_or_the_correct_result(finished, cnn_ckpt, tmp_path, capsys, seed):
    rng = random.Random(seed)
    run = _copy(finished[0], tmp_path)
    what = _random_damage(rng, run / rng.choice(RUN_FILES))
    out = tmp_path / "eval"
    try:
        main(evaluate_args(run, out))
    except SystemExit as err:  # a clear error, never a traceback
        assert err.code == 2, what
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr and "lit-cf: error:" in stderr, what
        assert not out.exists(), what
    else:  # or exactly the numbers of the intact run
        assert _numbers(out) == finished[1], what
    # the counterfactual datamodule: refuses or reads the intact tensors
    from lit_cf.data import CounterfactualDataModule

    try:
        images = CounterfactualDataModule(runs=[str(run)], val_fraction=0.0).pool().images
    except RunIntegrityError:
        pass
    else:
        assert torch.equal(images[:8], ExplainRun(finished[0]).tensor("counterfactual").float()), what
    # explain's resume: refuses (damaged run.json) or repairs to the uninterrupted result
    try:
        main(explain_args(cnn_ckpt, run))
    except SystemExit as err:
        assert err.code == 2 and "run.json" in capsys.readouterr().err, what
    else:
        _same_run(run, finished[0])


@pytest.mark.parametrize("seed", range(3))
def test_random_checkpoint_damage_is_a_clear_error_or_a_valid_run(cnn_ckpt, tmp_path, capsys, seed):
    rng = random.Random(100 + seed)
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(cnn_ckpt, ckpt)
    what = _random_damage(rng, ckpt)
    out = tmp_path / "run"
    try:
        main(explain_args(ckpt, out, "--num_queries=4"))
    except SystemExit as err:
        assert err.code == 2, what
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr and "lit-cf: error:" in stderr, what
        assert not out.exists(), what
    else:  # weights changed by the flip are a (different) valid model; the run records its checksum
        from lit_cf.utils.checkpoint import file_sha256

        assert ExplainRun(out).meta["classifier"]["sha256"] == file_sha256(ckpt), what
