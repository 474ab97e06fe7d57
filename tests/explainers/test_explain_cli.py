"""`lit-cf explain` end to end: outputs, resume after SIGKILL, DDP sharding, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.explainers import ExplainRun
from lit_cf.explainers.targets import resolve_targets
from tests.conftest import CONFIGS, ROOT, fit_checkpoint

DATA = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=64",
    "--data.init_args.test_size=128",
]
TIMING = {"seconds", "chunk_seconds", "peak_memory_mb"}


def explain_args(ckpt: Path, out: Path, *extra: str, method: str = "explain/pixel.yaml") -> list[str]:
    return [
        "explain",
        *DATA,
        f"--config={CONFIGS / method}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out.parent}",
        f"--classifier={ckpt}",
        f"--output_dir={out}",
        "--model.init_args.steps=30",
        "--model.init_args.lr=0.05",
        *extra,
    ]


def rows_without_timing(run: ExplainRun) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run.manifest]


def test_explain_writes_manifest_shards_and_grids(cnn_ckpt, tmp_path):
    out = tmp_path / "pixel"
    main(explain_args(cnn_ckpt, out, "--num_queries=20", "--chunk_size=8", "--seed=3"))
    run = ExplainRun(out)
    assert len(run) == 20
    expected = {
        "record",
        "index",
        "source_label",
        "orig_pred",
        "orig_prob",
        "target",
        "orig_target_prob",
        "final_pred",
        "final_target_prob",
        "success",
        "steps",
        "seconds",
        "seed",
    }
    assert expected <= set(run.manifest[0])
    assert [r["index"] for r in run.manifest] == list(range(20))
    assert all(r["target"] != r["orig_pred"] for r in run.manifest)  # most_likely_other
    cf, query = run.tensor("counterfactual"), run.tensor("query")
    assert cf.shape == query.shape == (20, 1, 28, 28)
    assert cf.min() >= 0 and cf.max() <= 1
    success = sum(r["success"] for r in run.manifest) / 20
    assert success > 0.5
    assert all(0 <= r["steps"] <= 30 for r in run.manifest)
    assert (out / "config.yaml").exists() and (out / "grids" / "grid-000.png").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["seed"] == 3 and meta["num_records"] == 20
    assert not list(out.rglob("*.tmp"))


def test_several_targets_per_query_and_fixed_class(cnn_ckpt, tmp_path):
    out = tmp_path / "multi"
    main(explain_args(cnn_ckpt, out, "--num_queries=4", "--target=all", "--model.init_args.steps=2"))
    run = ExplainRun(out)
    by_query: dict[int, list[int]] = {}
    for r in run.manifest:
        by_query.setdefault(r["index"], []).append(r["target"])
    assert len(by_query) == 4 and all(len(t) == 9 for t in by_query.values())
    out2 = tmp_path / "fixed"
    main(
        explain_args(
            cnn_ckpt, out2, "--num_queries=30", "--target=7", "--on_source_equals_target=skip", "--model.init_args.steps=2"
        )
    )
    assert {r["target"] for r in ExplainRun(out2).manifest} == {7}


def test_most_likely_others_k_takes_the_k_most_probable_other_classes_in_order():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.02, 0.08], [0.05, 0.05, 0.1, 0.2, 0.6]])
    pairs = resolve_targets("most_likely_others:3", probs, torch.zeros(2), [10, 11], num_classes=5)
    assert pairs == [(0, 2), (0, 1), (0, 4), (1, 3), (1, 2), (1, 0)]  # ties (0.05, 0.05) keep class order
    assert resolve_targets("most_likely_others:1", probs, torch.zeros(2), [10, 11], 5) == resolve_targets(
        "most_likely_other", probs, torch.zeros(2), [10, 11], 5
    )
    for bad in ("most_likely_others:0", "most_likely_others:5", "most_likely_others:x"):
        with pytest.raises(UserError, match="K must be an integer from 1 to 4"):
            resolve_targets(bad, probs, torch.zeros(2), [10, 11], 5)


def test_second_run_is_a_no_op_and_overwrite_recomputes(cnn_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    args = explain_args(cnn_ckpt, out, "--num_queries=8", "--model.init_args.steps=3")
    main(args)
    stamp = (out / "manifest.jsonl").stat().st_mtime_ns
    main(args)
    assert "already complete" in capsys.readouterr().out
    assert (out / "manifest.jsonl").stat().st_mtime_ns == stamp
    main(args + ["--overwrite=true"])
    assert (out / "manifest.jsonl").stat().st_mtime_ns != stamp
    with pytest.raises(SystemExit) as err:  # a different run into the same folder is refused
        main(explain_args(cnn_ckpt, out, "--num_queries=8", "--model.init_args.steps=4"))
    assert err.value.code == 2
    assert "different explain run" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lit_cf", *args]


def kill_after_chunks(args: list[str], out: Path, chunks: int, cwd: Path, env: dict[str, str], poll: float = 0.05) -> int:
    """Start ``args`` in a subprocess, SIGKILL it once ``chunks`` chunks of ``out`` are committed
    (or after 240 s), and return how many chunks were committed by then."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "shards").glob("chunk-*.jsonl"))) < chunks:
        if proc.poll() is not None:
            break
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list((out / "shards").glob("chunk-*.jsonl")))


def test_resume_after_sigkill_matches_uninterrupted_run(cnn_ckpt, tmp_path):
    common = ["--num_queries=96", "--chunk_size=8", "--model.init_args.steps=60", "--model.init_args.stop_probability=0.999"]
    ref = tmp_path / "ref"
    main(explain_args(cnn_ckpt, ref, *common))
    out = tmp_path / "killed"
    args = _cli(*explain_args(cnn_ckpt, out, *common))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = kill_after_chunks(args, out, 2, tmp_path, env)
    assert 2 <= done < 12, f"kill landed after {done} of 12 chunks"
    assert not (out / "manifest.jsonl").exists()
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed, reference = ExplainRun(out), ExplainRun(ref)
    assert rows_without_timing(resumed) == rows_without_timing(reference)
    assert torch.equal(resumed.tensor("counterfactual"), reference.tensor("counterfactual"))
    assert not list(out.rglob("*.tmp"))


def test_ddp_two_processes_equals_single_device(cnn_ckpt, tmp_path):
    common = ["--num_queries=40", "--chunk_size=8", "--model.init_args.steps=10"]
    single = tmp_path / "single"
    # Lightning gives each CPU DDP rank cpu_count // world_size threads; Adam turns float noise
    # in near-zero pixel gradients into full steps, so the reference uses the same thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        main(explain_args(cnn_ckpt, single, *common))
    finally:
        torch.set_num_threads(threads)
    ddp = tmp_path / "ddp"
    args = _cli(*explain_args(cnn_ckpt, ddp, *common), "--trainer.strategy=ddp", "--trainer.devices=2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = ExplainRun(single), ExplainRun(ddp)
    plan_keys = ("record", "index", "source_label", "orig_pred", "target", "seed", "chunk", "row")
    assert [[r[k] for k in plan_keys] for r in a.manifest] == [[r[k] for k in plan_keys] for r in b.manifest]
    torch.testing.assert_close(a.tensor("counterfactual"), b.tensor("counterfactual"), atol=1e-5, rtol=0)
    probs_a = torch.tensor([r["final_target_prob"] for r in a.manifest])
    probs_b = torch.tensor([r["final_target_prob"] for r in b.manifest])
    torch.testing.assert_close(probs_a, probs_b, atol=1e-5, rtol=0)
    # both ranks did work: the chunks were split between them
    chunks = {r["chunk"] for r in b.manifest}
    assert chunks == set(range(5))
    # rank 0 alone prints progress, one line per chunk it committed (chunks 0, 2 and 4 of 5)
    progress = [line for line in result.stderr.splitlines() if line.startswith("lit-cf explain: chunk")]
    assert len(progress) == 3 and all("/5 (" in line for line in progress), result.stderr[-3000:]


# ----------------------------------------------------------------------------- bad input
def _expect_error(args: list[str], capsys, match: str, out: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code != 0
    assert match in capsys.readouterr().err
    assert not out.exists(), "a failed explain must leave no output behind"


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--target=12"], "out of range"),
        (["--target=bogus"], "unknown target rule"),
        (["--target=most_likely_others:10"], "K must be an integer from 1 to 9"),
        (["--source_class=3", "--target=3"], "already predicted as their target"),
        (["--indices=[]"], "selection is empty"),
        (["--indices=[5000]"], "out of range"),
        (["--split=nope"], "unknown split"),
        (["--select=misclassified", "--indices=[]"], "selection is empty"),
    ],
)
def test_bad_queries_and_targets(cnn_ckpt, tmp_path, capsys, extra, match):
    out = tmp_path / "bad"
    _expect_error(explain_args(cnn_ckpt, out, "--num_queries=16", *extra), capsys, match, out)


def test_bad_checkpoints(cnn_ckpt, tmp_path, capsys):
    out = tmp_path / "bad"
    _expect_error(explain_args(tmp_path / "missing.ckpt", out), capsys, "checkpoint not found", out)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(cnn_ckpt.read_bytes()[:1000])
    _expect_error(explain_args(corrupt, out), capsys, "corrupt", out)
    # same class, other architecture: widen the backbone in the saved hyperparameters
    ckpt = torch.load(cnn_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["backbone"]["init_args"]["hidden"] = 64
    other = tmp_path / "other_arch.ckpt"
    torch.save(ckpt, other)
    _expect_error(explain_args(other, out), capsys, "do not match the architecture", out)


def test_autoencoder_checkpoint_is_not_a_classifier(tmp_path, capsys):
    ae = fit_checkpoint(tmp_path / "ae", "model/autoencoder.yaml")
    out = tmp_path / "bad"
    _expect_error(explain_args(ae, out), capsys, "not a ImageClassifier", out)


@pytest.mark.parametrize("mode,match", [("rgb", "channel"), ("big", "cannot process images"), ("nan", "NaN")])
def test_bad_images(cnn_ckpt, tmp_path, capsys, mode, match):
    out = tmp_path / "bad"
    args = explain_args(cnn_ckpt, out, "--num_queries=16")
    args[1:5] = [
        "--data=tests.explainers.broken_data.BrokenDigits",
        f"--data.init_args.mode={mode}",
        "--data.init_args.train_size=64",
        "--data.init_args.test_size=32",
    ]
    _expect_error(args, capsys, match, out)


def test_num_classes_mismatch(cnn_ckpt, tmp_path, capsys):
    from tests.fixtures import write_celeba_fixture

    root = write_celeba_fixture(tmp_path / "celeba_root")
    out = tmp_path / "bad"
    args = explain_args(cnn_ckpt, out)
    args[1:5] = ["--data=lit_cf.data.celeba.CelebADataModule", f"--data.init_args.root={root}"]
    _expect_error(args, capsys, "classes", out)


def test_unwritable_output_dir(cnn_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(SystemExit):
        main(explain_args(cnn_ckpt, out))
    assert "not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_wandb_offline_run_gets_loss_curves_and_grids(cnn_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.finish()  # no run of an earlier test in this process may capture this one's logger
    out = tmp_path / "run"
    args = explain_args(cnn_ckpt, out, "--num_queries=8", "--model.init_args.log_every=1")
    args.remove("--trainer.logger=false")
    main(args + [f"--config={CONFIGS / 'logger/wandb.yaml'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'wb'}"])
    import wandb

    wandb.finish()  # a CLI process does this at exit; in-process we flush the offline run here
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs
    assert list(runs[0].rglob("*.png")), "the counterfactual grid is logged as an image"
    # the offline writer may flush a moment after finish() returns: poll briefly
    deadline = time.time() + 30
    while True:
        logged = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file() and p.suffix in (".wandb", ".json"))
        if (b"explain/cf" in logged and b"explain/target_prob" in logged) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert b"explain/cf" in logged and b"explain/target_prob" in logged
