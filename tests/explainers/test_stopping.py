"""Early stopping is explicit: every explain config states it, every method records it."""

from __future__ import annotations

import yaml

from lit_cf.explainers import DeepInversionCounterfactual, PixelCounterfactual
from lit_cf.metrics.stopping import stopping_rule_of
from tests.conftest import CONFIGS


def test_every_explain_config_states_its_early_stopping():
    configs = sorted((CONFIGS / "explain").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert "Early stopping:" in text, f"{path.name} does not say whether and when it stops per image"
        yaml.safe_load(text)


def test_methods_record_their_stopping_rule():
    assert PixelCounterfactual(steps=30, stop_probability=0.9).describe()["stopping"] == (
        "per image at p(target) >= 0.9, at most 30 steps"
    )
    assert DeepInversionCounterfactual(steps=40, stop_probability=None).describe()["stopping"] == (
        "none: every image runs 40 steps"
    )


def test_stopping_rule_of_older_runs_is_derived_from_their_settings():
    assert stopping_rule_of({"stopping": "custom"}) == "custom"
    assert stopping_rule_of({"steps": 100, "stages": [0.2, 0.4, 0.6, 0.8], "progressive": True}).startswith(
        "per image at each stage's target probability (0.2, 0.4, 0.6, 0.8)"
    )
    assert stopping_rule_of({"steps": 5, "threshold": 0.75}) == "per image at p(target) >= 0.75, at most 5 steps"
    assert stopping_rule_of({"steps": 5, "stop_probability": None}) == "none: every image runs 5 steps"
    assert stopping_rule_of(None) == "not recorded"
