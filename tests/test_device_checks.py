"""scripts/device_checks.sh: its dry mode runs every step at tiny sizes on CPU (generated data)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/device_checks.sh"


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def test_dry_run_writes_every_figure_file(tmp_path):
    out = tmp_path / "out"
    res = run("--dry-run", str(out))
    assert res.returncode == 0, res.stderr + (out / "log.txt").read_text()[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    diffusion = (ROOT / "configs/model/ddpm_mnist.yaml").exists()
    expected = {"summary.md", "log.txt", "bench_explain_bf16.json", "bench_fit.json", "duq_fashion_mnist.json", "duq_mnist.json"}
    assert expected <= set(files), files
    assert set(files) - expected <= ({"diffusion.json"} if diffusion else set())
    explain = json.loads((out / "bench_explain_bf16.json").read_text())
    assert explain["precision"] == "bf16-mixed" and explain["images"] == 8
    assert explain["cf_per_second"]["engine"] > 0 and explain["batched_over_per_image"] > 0
    fit = json.loads((out / "bench_fit.json").read_text())
    assert fit["duq_over_cnn"] > 0 and {"duq", "cnn_same_backbone"} <= set(fit["seconds_per_epoch"])
    assert fit["profile_top_ops"] and all(0 <= r["share"] <= 1 for r in fit["profile_top_ops"])
    for ds in ("fashion_mnist", "mnist"):
        duq = json.loads((out / f"duq_{ds}.json").read_text())
        assert duq["finished"] and [r["epoch"] for r in duq["curve"]] == [1, 2]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| duq_paper_protocol | ok |" in summary and "failed" not in summary


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    res = run("--dry-run", str(tmp_path))
    assert res.returncode == 2 and "not empty" in res.stderr
    assert (tmp_path / "old.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_needs_an_output_folder_and_known_options():
    assert "output folder" in run("--dry-run").stderr
    res = run("--fast")
    assert res.returncode == 2 and "unknown option --fast" in res.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_without_a_gpu_the_real_mode_refuses(tmp_path):
    res = run(str(tmp_path / "out"))
    assert res.returncode == 1 and "no CUDA GPU" in res.stderr and "--dry-run" in res.stderr
