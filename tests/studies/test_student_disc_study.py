"""The student_disc study: settings validation, and the scores of one student."""

from __future__ import annotations

import pytest
import torch

from lit_cf.studies.student_disc import METHODS, student_scores
from tests.fixtures import write_idx_dataset
from tests.studies.test_ablate_disc_study import run_cli_expecting_error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"methods": ["disc", "dvce"]}, "methods"),
        ({"methods": ["disc", "disc"]}, "distinct"),
        ({"severities": [0, 6]}, "severities"),
        ({"targets": "label"}, "targets"),
        ({"targets": "most_likely_others:0"}, "most_likely_others:K (K in 1..9)"),
        ({"student_epochs": 0}, "student_epochs"),
        ({"root": "/nonexistent"}, "no MNIST folder"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, settings, message):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    line = run_cli_expecting_error(tmp_path, capsys, "student_disc", {"root": str(root), **settings})
    assert message in line


def test_student_scores_compare_with_labels_and_teacher():
    def constant(c):
        return lambda x: torch.nn.functional.one_hot(torch.full((len(x),), c), 3).float()

    images = torch.rand(4, 1, 8, 8)
    labels = torch.tensor([0, 0, 1, 2])
    res = student_scores(constant(0), constant(1), images, labels, severities=[1])
    assert res["clean_acc"] == 0.5 and res["agreement"] == 0.0
    assert res["corrupted_acc"] == 0.5 and all(v == 0.5 for v in res["per_corruption"].values())
    assert set(METHODS) == {"disc", "iso", "deepinversion"}


def test_shipped_config_holds_the_study_defaults():
    """configs/study/student_disc.yaml names the study and validates; its settings are the class defaults."""
    import inspect
    from pathlib import Path

    import yaml

    from lit_cf.studies.core import study_registry, validate_settings

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/study/student_disc.yaml").read_text())
    cls = study_registry[cfg["study"]]
    assert cfg["study"] == "student_disc" and cfg["output_dir"]
    settings = validate_settings(cls, cfg["settings"])
    defaults = validate_settings(cls, {})
    assert set(settings) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    # lists and mappings default to None in the signature and are spelled out in the config
    assert {k: v for k, v in settings.items() if defaults[k] is not None} == {k: v for k, v in defaults.items() if v is not None}
