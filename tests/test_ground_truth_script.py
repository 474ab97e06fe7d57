"""scripts/ground_truth.py: its verdict rule and its usage errors (the full run is a script, not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import ground_truth  # noqa: E402


def ranking(*pairs: tuple[str, float]) -> list[tuple[str, float, float, float]]:
    return [(name, score, score - 0.02, score + 0.02) for name, score in pairs]


def test_verdict_needs_a_positive_mark_first_for_the_shortcut_classifier_only():
    ok = ground_truth.verdict(ranking(("mark", 0.3), ("intensity", -0.1)), ranking(("intensity", -0.2), ("mark", 0.01)))
    assert ok["pass"] and ok["ci_separated"]
    second = ground_truth.verdict(ranking(("intensity", -0.3), ("mark", 0.2)), ranking(("intensity", -0.2), ("mark", 0.0)))
    assert not second["pass"] and "intensity" in second["why"]
    negative = ground_truth.verdict(ranking(("mark", -0.3), ("slant", 0.1)), ranking(("slant", 0.2), ("mark", 0.0)))
    assert not negative["pass"]
    clean_too = ground_truth.verdict(ranking(("mark", 0.3), ("slant", 0.1)), ranking(("mark", 0.2), ("slant", 0.1)))
    assert not clean_too["pass"] and "clean classifier" in clean_too["why"]
    close = ground_truth.verdict(ranking(("mark", 0.3), ("slant", -0.29)), ranking(("slant", 0.2), ("mark", 0.0)))
    assert close["pass"] and not close["ci_separated"]  # first, but the intervals overlap
    assert not ground_truth.verdict("no successful counterfactual", ranking(("mark", 0.0)))["pass"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--generator", "vae", "--ae-output", "identity"], "--ae-output identity needs --generator autoencoder"),
        (["--latent-pixel-weight", "-1"], "--latent-pixel-weight must be >= 0"),
        (["--latent-source", "pixels"], "invalid choice"),
        (["--methods", "diffusion"], "unknown method"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "gt"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "ground_truth.py"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not out.exists()
