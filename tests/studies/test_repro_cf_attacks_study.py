"""The repro_cf_attacks study: settings and data validation, and the digit-pair queries."""

from __future__ import annotations

import pytest

from lit_cf.errors import UserError
from lit_cf.studies.repro_cf_attacks import celeba_data_root, check_mnist, pair_targets
from tests.fixtures import write_celeba_fixture, write_idx_dataset
from tests.studies.test_ablate_disc_study import run_cli_expecting_error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"parts": []}, "parts"),
        ({"parts": ["mnist", "cifar"]}, "parts"),
        ({"threshold": 1.5}, "threshold"),
        ({"pair_queries": 0}, "pair_queries"),
        ({"celeba_classifier": "vit"}, "celeba_classifier"),
        ({"parts": ["mnist", "celeba"]}, "CelebA not found"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, settings, message):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    line = run_cli_expecting_error(
        tmp_path, capsys, "repro_cf_attacks", {"root": str(root), "celeba_root": str(tmp_path), "parts": ["mnist"], **settings}
    )
    assert message in line


def test_data_checks(tmp_path):
    with pytest.raises(UserError, match="MNIST not found"):
        check_mnist(tmp_path)
    check_mnist(write_idx_dataset(tmp_path / "data", n_train=8, n_test=8))
    write_celeba_fixture(tmp_path / "celeba_root")
    assert celeba_data_root(tmp_path / "celeba_root") == tmp_path / "celeba_root"
    assert celeba_data_root(tmp_path / "celeba_root" / "celeba") == tmp_path / "celeba_root"  # the folder itself
    with pytest.raises(UserError, match="CelebA not found"):
        celeba_data_root(tmp_path / "data")


def test_pair_targets_take_the_first_images_of_each_source_class():
    labels = [4, 9, 4, 1, 4, 8, 9]
    assert pair_targets(labels, 2, ((4, 9), (8, 9))) == {0: 9, 2: 9, 5: 9}
    # 9 is a source (9 -> 7) and a target (4 -> 9): the source rule decides its images
    assert pair_targets(labels, 5, ((4, 9), (9, 7))) == {0: 9, 2: 9, 4: 9, 1: 7, 6: 7}


def test_shipped_config_holds_the_study_defaults():
    """configs/study/repro_cf_attacks.yaml names the study and validates; its settings are the class defaults."""
    import inspect
    from pathlib import Path

    import yaml

    from lit_cf.studies.core import study_registry, validate_settings

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/study/repro_cf_attacks.yaml").read_text())
    cls = study_registry[cfg["study"]]
    assert cfg["study"] == "repro_cf_attacks" and cfg["output_dir"]
    settings = validate_settings(cls, cfg["settings"])
    defaults = validate_settings(cls, {})
    assert set(settings) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    # lists and mappings default to None in the signature and are spelled out in the config
    assert {k: v for k, v in settings.items() if defaults[k] is not None} == {k: v for k, v in defaults.items() if v is not None}
