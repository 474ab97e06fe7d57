"""Every shipped study config names a registered study and valid settings (nothing is run)."""

from __future__ import annotations

import pytest
import yaml

from lit_cf.studies import study_registry
from lit_cf.studies.core import CONFIG_ROOT, validate_settings

STUDY_CONFIGS = sorted((CONFIG_ROOT / "study").glob("*.yaml"))


def test_the_built_in_studies_have_configs():
    names = {p.stem for p in STUDY_CONFIGS}
    assert {"ground_truth", "battery", "quickstart"} <= names


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_shipped_study_config_is_valid(path):
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= {"study", "output_dir", "settings", "description"}
    cls = study_registry[doc["study"]]
    settings = validate_settings(cls, doc.get("settings"))
    assert set(doc.get("settings") or {}) <= set(settings)
    cls(**settings)  # the study accepts them (its own checks)
    assert str(doc["output_dir"]).startswith("runs/")
