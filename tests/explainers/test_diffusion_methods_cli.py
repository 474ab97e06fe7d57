"""`lit-cf explain` with FastDiME and ACE as shipped, on a tiny DDPM: outputs, resume after SIGKILL, bad settings.

The DDPM is the session fixture ``ddpm_ckpt`` of tests/conftest.py (configs/model/ddpm_tiny.yaml).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.explainers import ExplainRun
from lit_cf.explainers.diffusion_sampler import stage_indices
from tests.conftest import CONFIGS, ROOT
from tests.explainers.test_explain_cli import DATA, _cli, kill_after_chunks, rows_without_timing

# the tiny DDPM has a 100-step schedule: few steps keep each chunk at a fraction of a second
FAST = {
    "explain/fastdime.yaml": ["--model.init_args.num_steps=4", "--model.init_args.class_scales=[8.0,10.0]"],
    "explain/ace.yaml": ["--model.init_args.num_steps=2", "--model.init_args.iterations=3", "--model.init_args.mask_kernel=5"],
}


def diffusion_args(ckpt: Path, ddpm: Path, out: Path, method: str, *extra: str) -> list[str]:
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
        f"--model.init_args.diffusion={ddpm}",
        *FAST[method],
        *extra,
    ]


@pytest.mark.parametrize("method", list(FAST))
def test_shipped_config_explains_and_draws_progressions(cnn_ckpt, ddpm_ckpt, tmp_path, method):
    out = tmp_path / "run"
    main(diffusion_args(cnn_ckpt, ddpm_ckpt, out, method, "--num_queries=6", "--chunk_size=4", "--seed=2"))
    run = ExplainRun(out)
    assert len(run) == 6
    cf, query, stages = run.tensor("counterfactual"), run.tensor("query"), run.tensor("stages")
    assert cf.shape == query.shape == (6, 1, 28, 28)
    # FastDiME: 6 stages spread over 4 steps (distinct steps only); ACE: pre-explanation + up to 4 over 2 steps
    kept = len(stage_indices(4, 6)) if "fastdime" in method else 1 + len(stage_indices(2, 4))
    assert stages.shape == (6, kept, 1, 28, 28)
    assert cf.min() >= 0 and cf.max() <= 1 and not torch.equal(cf, query)
    rows = run.manifest
    assert all(r["denoiser_calls"] > 0 and 0 < r["mask_fraction"] <= 1 for r in rows)
    if "fastdime" in method:
        assert all(r["attempt"] in (1, 2) and r["steps"] == 4 * r["attempt"] for r in rows)
        assert all(r["denoiser_calls"] == 4 * r["attempt"] for r in rows)
    else:
        assert all(0 <= r["steps"] <= 3 and r["denoiser_calls"] == 2 * (r["steps"] + 1) + 2 for r in rows)
    assert (out / "grids" / "progression-000.png").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and len(meta["method"]["diffusion_sha256"]) == 64


def test_fastdime_with_a_separate_feature_network_and_the_chain(cnn_ckpt, duq_ckpt, ddpm_ckpt, tmp_path):
    out = tmp_path / "run"
    main(
        diffusion_args(
            cnn_ckpt,
            ddpm_ckpt,
            out,
            "explain/fastdime.yaml",
            "--num_queries=2",
            f"--model.init_args.feature_network={duq_ckpt}",
            "--model.init_args.clean_estimate=chain",
            "--model.init_args.class_scales=[8.0]",
        )
    )
    run = ExplainRun(out)
    assert all(r["denoiser_calls"] == 4 * 5 // 2 for r in run.manifest)  # a full chain at every step
    assert len(run.meta["method"]["feature_network_sha256"]) == 64


def test_fastdime_resume_after_sigkill_matches_uninterrupted_run(cnn_ckpt, ddpm_ckpt, tmp_path):
    # 12 chunks of a fraction of a second each: the kill lands mid-run; retries on (two scales)
    common = ["--num_queries=24", "--chunk_size=2"]
    method = "explain/fastdime.yaml"
    ref = tmp_path / "ref"
    main(diffusion_args(cnn_ckpt, ddpm_ckpt, ref, method, *common))
    out = tmp_path / "killed"
    args = _cli(*diffusion_args(cnn_ckpt, ddpm_ckpt, out, method, *common))
    done = kill_after_chunks(args, out, 2, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)}, poll=0.02)
    assert 2 <= done < 12, f"kill landed after {done} of 12 chunks"
    assert not (out / "manifest.jsonl").exists()
    main(diffusion_args(cnn_ckpt, ddpm_ckpt, out, method, *common))  # resume in-process: one start-up less
    resumed, reference = ExplainRun(out), ExplainRun(ref)
    assert rows_without_timing(resumed) == rows_without_timing(reference)
    for key in ("counterfactual", "stages"):
        assert torch.equal(resumed.tensor(key), reference.tensor(key))
    assert not list(out.rglob("*.tmp"))


def _expect_error(args: list[str], capsys, match: str, out: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code != 0
    assert match in capsys.readouterr().err
    assert not out.exists(), "a failed explain must leave no output behind"


@pytest.mark.parametrize(
    "method,extra,match",
    [
        ("explain/fastdime.yaml", ["--model.init_args.tau=1.5"], "tau"),
        ("explain/fastdime.yaml", ["--model.init_args.num_steps=50"], "num_steps"),  # 0.3 of 100 steps: at most 30
        ("explain/fastdime.yaml", ["--model.init_args.class_scales=[10.0,8.0]"], "strictly increasing"),
        ("explain/fastdime.yaml", ["--model.init_args.l1_weight=-1"], "l1_weight"),
        ("explain/ace.yaml", ["--model.init_args.tau=0"], "tau"),
        ("explain/ace.yaml", ["--model.init_args.num_steps=40"], "num_steps"),
        ("explain/ace.yaml", ["--model.init_args.step_size=-0.1"], "step_size"),
    ],
)
def test_bad_settings_fail_before_any_output(cnn_ckpt, ddpm_ckpt, tmp_path, capsys, method, extra, match):
    out = tmp_path / "bad"
    _expect_error(diffusion_args(cnn_ckpt, ddpm_ckpt, out, method, "--num_queries=2", *extra), capsys, match, out)


def test_bad_feature_network_and_missing_ddpm_fail_before_any_output(cnn_ckpt, ddpm_ckpt, tmp_path, capsys):
    out = tmp_path / "bad"
    method = "explain/fastdime.yaml"
    args = diffusion_args(cnn_ckpt, ddpm_ckpt, out, method, "--num_queries=2", f"--model.init_args.feature_network={ddpm_ckpt}")
    _expect_error(args, capsys, "not a lit-cf classifier", out)
    missing = tmp_path / "missing.ckpt"
    args = diffusion_args(cnn_ckpt, ddpm_ckpt, out, method, "--num_queries=2", f"--model.init_args.diffusion={missing}")
    _expect_error(args, capsys, "not found", out)
