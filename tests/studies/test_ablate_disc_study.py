"""The ablate_disc study: settings validation, the matched-validity rule, and a tiny run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.studies.ablate_disc import CHAIN, AblateDISC, matched_scores, matched_valid, region_mask
from tests.fixtures import write_idx_dataset


def run_cli_expecting_error(tmp_path, capsys, study: str, settings: dict) -> str:
    """`lit-cf study` on a config with ``settings``: exit 2, one line, no output folder; the line."""
    out = tmp_path / "out"
    cfg = tmp_path / "study.yaml"
    cfg.write_text(json.dumps({"study": study, "output_dir": str(out), "settings": settings}))
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-cf: error:"), err
    assert not out.exists()
    return err[0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"links": ["iso", "dip"]}, "links"),
        ({"links": []}, "links"),
        ({"data": "cifar"}, "data"),
        ({"queries": 0}, "queries"),
        ({"feature_distance": "l1"}, "feature_distance"),
        ({"root": "/nonexistent"}, "no /nonexistent/MNIST"),
        ({"data_overrides": {"trainer.max_epochs": 1}}, "data_overrides"),
        ({"oracle": "model/no_such.yaml"}, "ablate_disc: oracle: study config model/no_such.yaml not found"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, settings, message):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    line = run_cli_expecting_error(tmp_path, capsys, "ablate_disc", {"root": str(root), **settings})
    assert message in line


def test_oracle_defaults_per_dataset_and_takes_another_architecture(tmp_path):
    root = write_idx_dataset(tmp_path / "data", n_train=8, n_test=8)
    (tmp_path / "data" / "celeba").mkdir()
    digits = AblateDISC(root=str(root)).model_specs()["oracle"]
    assert digits.configs == ("data/mnist.yaml", "model/cnn_wide.yaml") and digits.args["seed_everything"] == 2
    celeba = AblateDISC(data="celeba", root=str(tmp_path / "data")).model_specs()
    assert celeba["oracle"].configs[-1] == "model/cnn_celeba.yaml" == celeba["classifier"].configs[-1]
    other = AblateDISC(data="celeba", root=str(tmp_path / "data"), oracle="model/resnet18_celeba.yaml").model_specs()
    assert other["oracle"].configs[-1] == "model/resnet18_celeba.yaml" and other["oracle"].key() != celeba["oracle"].key()


def row(index, target, pred):
    return {"index": index, "target": target, "final_pred": pred}


def test_matched_valid_keeps_the_queries_every_link_made_valid():
    a = [row(0, 1, 1), row(1, 2, 2), row(2, 3, 0), row(3, 4, 4)]
    b = [row(0, 1, 1), row(1, 2, 5), row(2, 3, 3), row(3, 4, 4)]
    assert matched_valid([a, b]).tolist() == [True, False, False, True]
    assert matched_valid([a]).tolist() == [True, True, False, True]
    with pytest.raises(UserError, match="different queries"):
        matched_valid([a, [row(0, 1, 1), row(1, 3, 3), row(2, 3, 3), row(3, 4, 4)]])


def test_region_masks_per_dataset():
    q = torch.zeros(2, 1, 28, 28)
    q[:, :, 10, 10] = 1.0
    assert region_mask("mnist", q)[0, 0].sum() == 25  # 5x5 around the one ink pixel
    assert region_mask("celeba", torch.zeros(1, 3, 64, 64))[0, 0, 45, 30]  # inside the mouth box


class Oracle(nn.Module):
    """Class 1 when the image's mean exceeds 0.3, else 0; its backbone gives the features."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([0.3 - m, m - 0.3], 1)


class Certainty(nn.Module):
    def certainty(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x.flatten(1).mean(1)


def test_matched_scores_by_hand():
    q = torch.zeros(3, 1, 4, 4)
    cf = q.clone()
    cf[:, :, :2, :2] = 1.0  # 4 pixels of 1 inside the top-left quarter: L1 4, L2 2, mean 0.25
    cf[0, 0, 3, 3] = 1.0  # image 0: one more pixel, outside; mean 5/16
    mask = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2, :2] = True
    s = matched_scores(q, cf, torch.tensor([1, 1, 0]), Oracle(), Certainty(), mask)
    assert s["l1_mean"] == pytest.approx((5 + 4 + 4) / 3) and s["l2_mean"] == pytest.approx((5**0.5 + 2 + 2) / 3)
    assert s["loc"] == pytest.approx((4 / 5 + 1 + 1) / 3)
    assert s["ota_oracle"] == pytest.approx(2 / 3)  # predicted 1, 0, 0 (means 5/16, 1/4, 1/4); targets 1, 1, 0
    assert s["duq_certainty_cf_mean"] == pytest.approx(1 - (5 / 16 + 0.25 + 0.25) / 3)
    assert s["fid_domain"] >= 0
    assert matched_scores(q[:0], cf[:0], torch.tensor([]), Oracle(), Certainty(), mask[:0]) == {}


@pytest.mark.slow  # about 20 s on an idle core, 50 s on a busy one: three fits, two explain runs, evaluate
def test_tiny_ablation_two_links(tmp_path):
    """Two links on 2 queries of a tiny MNIST: the table, the matched columns, loc and the report."""
    from lit_cf.studies import run_study

    root = write_idx_dataset(tmp_path / "data", n_train=64, n_test=64)
    settings = {
        "root": str(root),
        "links": ["iso", "iso+fp"],
        "queries": 2,
        "steps": 1,
        "fit_steps": 1,
        "chunk_size": 2,
        "epochs": 1,
        "duq_epochs": 1,
        "data_overrides": {"data.init_args.val_size": 8, "data.init_args.batch_size": 16},
    }
    result = run_study({"study": "ablate_disc", "output_dir": str(tmp_path / "out"), "settings": settings}, quiet=True)
    assert [r["link"] for r in result.rows] == ["iso", "iso+fp", "no edit (queries)", "real floor"]
    assert all(r["FID real"] >= 0 for r in result.rows)  # realism against real images, with its two reference rows
    for r in result.rows[:2]:
        assert 0 <= r["validity"] <= 1 and 0 <= r["loc"] <= 1 and r["s/cf"] > 0 and r["PSNR"] == 100.0  # pixels: 100 dB
        assert r["matched n"] <= 2 and set(r) >= {"matched L1", "matched loc", "matched OTA"}
    assert result.report is not None and result.report.is_file()
    assert "matched columns" in (tmp_path / "out" / "results.md").read_text()
    assert set(CHAIN) >= {"iso", "iso+fp"} and AblateDISC.name == "ablate_disc"


def test_shipped_config_holds_the_study_defaults():
    """configs/study/ablate_disc.yaml names the study and validates; its settings are the class defaults."""
    import inspect
    from pathlib import Path

    import yaml

    from lit_cf.studies.core import study_registry, validate_settings

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/study/ablate_disc.yaml").read_text())
    cls = study_registry[cfg["study"]]
    assert cfg["study"] == "ablate_disc" and cfg["output_dir"]
    settings = validate_settings(cls, cfg["settings"])
    defaults = validate_settings(cls, {})
    assert set(settings) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    # lists and mappings default to None in the signature and are spelled out in the config
    assert {k: v for k, v in settings.items() if defaults[k] is not None} == {k: v for k, v in defaults.items() if v is not None}
