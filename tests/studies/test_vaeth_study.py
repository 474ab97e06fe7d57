"""The vaeth study: settings validation, the findings and goal rules, and a tiny run."""

from __future__ import annotations

import json

import pytest

from lit_cf.studies.vaeth import GUIDES, METHODS, Vaeth, findings, goal, grid_name
from tests.fixtures import write_idx_dataset
from tests.studies.test_ablate_disc_study import run_cli_expecting_error


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"guides": ["standard", "imagenet"]}, "guides"),
        ({"guides": []}, "guides"),
        ({"methods": ["dvce", "dime"]}, "methods"),
        ({"method_args": {"dime": {}}}, "unknown methods"),
        ({"tau": 1.5}, "tau"),
        ({"queries": 0}, "queries"),
        ({"cones": []}, "cones"),
        ({"x0_off_input": "noisy"}, "x0_off_input must be one of"),
        ({"grid_args": {"model.init_args.tau": 0.3}}, "grid_args may only hold"),
        ({"grid_args": {"classifier": "other.ckpt"}}, "grid_args may only hold"),
        ({"diffusion": "/nonexistent/ddpm.ckpt"}, "diffusion checkpoint not found"),
        ({"root": "/nonexistent"}, "no MNIST folder"),
        ({"data_overrides": {"trainer.max_epochs": 1}}, "data_overrides"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, settings, message):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    line = run_cli_expecting_error(tmp_path, capsys, "vaeth", {"root": str(root), **settings})
    assert message in line


def grid_row(validity, ota_wide, ota_cnn):
    return {"validity": validity, "OTA wide": ota_wide, "OTA cnn": ota_cnn}


def test_findings_read_the_grid():
    grid = {
        ("standard", True, True): grid_row(0.96, 0.8, 0.7),
        ("standard", False, True): grid_row(0.98, 0.3, 0.2),  # cone off: OTA drops, validity +0.02
        ("standard", False, False): grid_row(0.50, 0.2, 0.2),  # x0-prediction off: validity drops
        ("duq", True, True): grid_row(0.90, 0.5, 0.5),
        ("duq", False, True): grid_row(0.70, 0.4, 0.4),  # validity moves by 0.2: does not hold
        ("random", True, True): grid_row(0.3, 0.05, 0.10),  # OTA 0.075 < chance 0.1
    }
    found = {f["finding"]: f for f in findings(grid, tolerance=0.05, chance=0.1)}
    assert found["cone off, standard: OTA drops, validity barely moves"]["holds"] is True
    assert "OTA 0.750 -> 0.250" in found["cone off, standard: OTA drops, validity barely moves"]["numbers"]
    assert found["x0-prediction off, standard: validity drops"]["holds"] is True
    assert found["cone off, duq: OTA drops, validity barely moves"]["holds"] is False
    assert "x0-prediction off, duq: validity drops" not in found  # its run is missing: skipped
    assert found["random guide with the cone: OTA above chance (robust semantics leak in)"]["holds"] is False
    assert len(found) == 4


def test_goal_takes_the_diffusion_method_with_the_best_ota():
    rows = {
        "disc": {**grid_row(1.0, 0.9, 0.9), "FID real": 130.0, "s/cf": 6.0},
        "dvce": {**grid_row(0.97, 0.95, 0.92), "FID real": 120.0, "s/cf": 2.0},
        "ace": {**grid_row(1.0, 0.4, 0.4), "FID real": 100.0, "s/cf": 1.0},
    }
    reached = goal(rows, no_edit_fid=140.0)
    assert reached is not None and reached["method"] == "dvce" and reached["reached"] is True
    assert goal(rows, no_edit_fid=110.0)["checks"]["FID real below no edit"] is False  # type: ignore[index]
    assert goal({"disc": rows["disc"]}, 140.0) is None


def test_grid_cells_equal_to_a_method_run_are_reused(tmp_path):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    study = Vaeth(root=str(root))
    assert study.same_as_method(("standard", False, True)) == "dvce"
    assert study.same_as_method(("standard", True, True)) == "dvce_cone"
    assert study.same_as_method(("standard", False, False)) is None  # the table's DVCE uses x0-prediction
    assert study.same_as_method(("duq", False, True)) is None  # the table explains the standard CNN
    changed = Vaeth(root=str(root), method_args={"dvce": {"model.init_args.num_steps": 10}})
    assert changed.same_as_method(("standard", False, True)) is None  # other arguments: its own run
    assert changed.same_as_method(("standard", True, True)) == "dvce_cone"
    assert Vaeth(root=str(root), methods=["pixel"]).same_as_method(("standard", False, True)) is None
    # grid_args: a cell reuses a table run only when that method's arguments equal the grid's
    strong = {"model.init_args.classifier_weight": 0.5}
    both = Vaeth(root=str(root), grid_args=strong, method_args={"dvce": dict(strong)})
    assert both.same_as_method(("standard", False, True)) == "dvce"
    assert both.same_as_method(("standard", True, True)) is None  # dvce_cone keeps the shipped weight


def test_grid_args_reach_every_grid_cell(tmp_path):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    ckpt = {name: tmp_path / f"{name}.ckpt" for name in (*GUIDES, "ddpm")}
    strong = Vaeth(root=str(root), grid_args={"model.init_args.classifier_weight": 0.5})
    for guide in GUIDES:
        for cone in (False, True):
            for x0 in (False, True):
                args = strong.grid_cell_args(ckpt, guide, cone, x0)
                assert args["model.init_args.classifier_weight"] == 0.5
                assert args["model.init_args.x0_prediction"] is x0 and args["classifier"] == ckpt[guide]
    assert "model.init_args.classifier_weight" not in Vaeth(root=str(root)).grid_cell_args(ckpt, "duq", True, False)


def test_x0_off_input_x_t_gives_the_cells_without_x0_prediction_their_own_runs(tmp_path):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    ckpt = {name: tmp_path / f"{name}.ckpt" for name in (*GUIDES, "ddpm")}
    default, noisy = Vaeth(root=str(root)), Vaeth(root=str(root), x0_off_input="x_t")
    assert "model.init_args.x0_off_input" not in default.dvce_args(ckpt, "standard", False, False)
    assert noisy.dvce_args(ckpt, "standard", False, False)["model.init_args.x0_off_input"] == "x_t"
    assert "model.init_args.x0_off_input" not in noisy.dvce_args(ckpt, "standard", False, True)  # x0-prediction on
    assert grid_name("duq", True, False) == "dvce-duq-cone-nox0"
    assert grid_name("duq", True, False, "x_t") == "dvce-duq-cone-nox0xt"  # never the x0-hat reading's folder
    assert grid_name("duq", True, True, "x_t") == "dvce-duq-cone-x0"  # shared: the same arguments


@pytest.mark.slow  # about a minute on two busy cores: eight tiny fits, four DVCE runs, two evaluations
def test_tiny_study_two_guides_with_and_without_the_cone(tmp_path):
    from lit_cf.studies import run_study

    root = write_idx_dataset(tmp_path / "data", n_train=64, n_test=64)
    settings = {
        "root": str(root),
        "queries": 2,
        "epochs": 1,
        "duq_epochs": 1,
        "ddpm_config": "model/ddpm_tiny.yaml",
        "ddpm_epochs": 1,
        "guides": ["standard", "random"],
        "x0_predictions": [True],
        "num_steps": 2,
        "methods": ["pixel", "dvce", "fastdime"],
        "method_args": {
            "pixel": {"model.init_args.steps": 2},
            "fastdime": {"model.init_args.num_steps": 2, "model.init_args.tau": 0.3},
        },
        "chunk_size": 2,
        "data_overrides": {"data.init_args.val_size": 8, "data.init_args.batch_size": 16},
    }
    result = run_study({"study": "vaeth", "output_dir": str(tmp_path / "out"), "settings": settings}, quiet=True)
    runs = [r["run"] for r in result.rows]
    assert runs[:4] == [
        "DVCE standard, cone off, x0-prediction on",
        "DVCE standard, cone on, x0-prediction on",
        "DVCE random, cone off, x0-prediction on",
        "DVCE random, cone on, x0-prediction on",
    ]
    assert runs[4:] == ["pixel", "dvce", "fastdime", "no edit (queries)", "real floor"]
    for r in result.rows[:7]:
        assert 0 <= r["validity"] <= 1 and 0 <= r["OTA wide"] <= 1 and r["s/cf"] > 0 and r["FID real"] >= 0
    # the grid's standard / cone off / x0 cell is the methods table's dvce run, not a second run
    explained = tmp_path / "out" / "explain"
    assert (explained / "method-dvce").is_dir() and not (explained / "dvce-standard-nocone-x0").exists()
    assert (explained / "dvce-standard-cone-x0").is_dir()  # dvce_cone is not in the table: run by the grid
    assert {k: v for k, v in result.rows[0].items() if k not in ("part", "run")} == {
        k: v for k, v in result.rows[5].items() if k not in ("part", "run")
    }
    targets = json.loads((tmp_path / "out" / "targets.json").read_text())
    assert len(targets) == 2
    names = {f["finding"] for f in result.verdict["findings"]}  # type: ignore[index]
    assert "cone off, standard: OTA drops, validity barely moves" in names
    assert result.verdict["goal"]["method"] in ("dvce", "fastdime")  # type: ignore[index]
    assert set(GUIDES) >= {"standard", "random"} and "ace" in METHODS and Vaeth.name == "vaeth"
