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


def _fake_data_root(root):
    """Empty files under the names the studies check for before running (never real data)."""
    for ds in ("MNIST", "FashionMNIST"):
        raw = root / ds / "raw"
        raw.mkdir(parents=True)
        for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (raw / f).write_bytes(b"")
    celeba = root / "celeba"
    (celeba / "img_align_celeba").mkdir(parents=True)
    (celeba / "img_align_celeba" / "000001.jpg").write_bytes(b"")
    for f in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        (celeba / f).write_text("")


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_shipped_study_config_is_valid(path, tmp_path, monkeypatch):
    # the shipped configs name the data root `data` (relative): give them a fake one to check against
    _fake_data_root(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= {"study", "output_dir", "settings", "description"}
    cls = study_registry[doc["study"]]
    settings = validate_settings(cls, doc.get("settings"))
    assert set(doc.get("settings") or {}) <= set(settings)
    cls(**settings)  # the study accepts them (its own checks)
    assert str(doc["output_dir"]).startswith("runs/")
