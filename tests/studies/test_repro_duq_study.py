"""The repro_duq study: settings validation, and a toy-scale run that stops after an epoch and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.studies import run_study
from lit_cf.studies.repro_duq import ReproDUQ
from tests.fixtures import write_idx_dataset

TINY = {
    "data.init_args.val_size": 8,
    "data.init_args.batch_size": 16,  # 56 training images: 3 full batches + 8 dropped
    "model.init_args.backbone.init_args.channels": [4, 8, 8],
    "model.init_args.backbone.init_args.hidden": 16,
    "model.init_args.embedding_size": 8,
}


@pytest.fixture
def data_root(tmp_path):
    write_idx_dataset(tmp_path / "data", name="FashionMNIST", n_train=64, n_test=32)
    write_idx_dataset(tmp_path / "data", name="MNIST", n_train=64, n_test=32, seed=1)
    return tmp_path / "data"


def config(root, out, **settings):
    return {
        "study": "repro_duq",
        "output_dir": str(out),
        "settings": {"root": str(root), "datasets": ["fashion_mnist"], "epochs": 3, "overrides": TINY, **settings},
    }


def test_stops_after_an_epoch_and_resumes(data_root, tmp_path):
    out = tmp_path / "out"
    first = run_study(config(data_root, out, stop_after=1), quiet=True)
    assert first.rows[0]["epochs done"] == 1 and not first.rows[0]["finished"]
    (folder,) = (out / "models").glob("duq-fashion_mnist-*")
    result = json.loads((folder / "result.json").read_text())
    assert [r["epoch"] for r in result["curve"]] == [1] and result["stopped_by"] == "stop_after 1"
    ckpt = torch.load(folder / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # Lightning counts the dropped batch too (its step changes nothing)
    # the same command again: nothing left to train up to stop_after
    again = run_study(config(data_root, out, stop_after=1), quiet=True)
    assert again.rows[0]["epochs done"] == 1 and again.rows[0]["train s (this run)"] == 0
    assert json.loads((folder / "result.json").read_text())["curve"] == result["curve"]  # restored from the checkpoint
    # other settings in the same folder are refused, nothing is touched
    with pytest.raises(UserError, match="other settings"):
        run_study(config(data_root, out), quiet=True)
    # dropping stop_after with --overwrite: results replaced, the model's fit continues
    resumed = run_study(config(data_root, out), overwrite=True, quiet=True)
    assert resumed.rows[0]["epochs done"] == 3 and resumed.rows[0]["finished"]
    curve = json.loads((folder / "curve.json").read_text())
    result = json.loads((folder / "result.json").read_text())
    assert curve == result["curve"] and [r["epoch"] for r in curve] == [1, 2, 3]
    assert curve[0]["accuracy"] == pytest.approx(json.loads(json.dumps(first.rows[0]["accuracy"])))
    # shortened schedule: milestones at epochs 1 and 2, so the resumed fit continues the LR schedule
    assert [r["lr"] for r in curve] == pytest.approx([0.05, 0.01, 0.002])
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["auroc_ood"] <= 1 for r in curve)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 12
    assert json.loads((folder / "fit.json").read_text())["seed"] == 0  # lit-cf's default seed, recorded
    summary = json.loads((out / "results.json").read_text())
    assert summary["models"]["duq-fashion_mnist"]["seed"] == 0
    assert summary["rows"] == resumed.rows and "shortened schedule" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, "must be >= 1"),
        ({"datasets": []}, "at most once"),
        ({"datasets": ["cifar"]}, "datasets"),
        ({"time_budget": -5}, "time_budget"),
        ({"overrides": {"trainer.max_epochs": 3}}, "overrides"),
        ({"stop_after": "soon"}, "stop_after"),
    ],
)
def test_bad_settings_are_one_line_and_write_nothing(data_root, tmp_path, capsys, settings, message):
    out = tmp_path / "out"
    cfg = tmp_path / "study.yaml"
    cfg.write_text(json.dumps(config(data_root, out, **settings)))
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-cf: error:") and message in err[0]
    assert not out.exists()


def test_the_applied_seed_is_the_one_recorded(data_root):
    from lit_cf.studies.core import ModelSpec
    from lit_cf.studies.resumable_fit import instantiate

    configs = ("data/fashion_mnist.yaml", "model/duq_cnn.yaml", "trainer/duq_paper.yaml")
    args = {"data.init_args.root": str(data_root), **TINY}
    seeds, weights = [], []
    for seed in (3, 3, 4):
        model, _, applied = instantiate(ModelSpec("duq", configs, {**args, "seed_everything": seed}))
        seeds.append(applied)
        weights.append(model.W.detach().clone())
    assert seeds == [3, 3, 4]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_missing_data_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="MNIST/raw not found"):
        ReproDUQ(root=str(tmp_path / "nowhere"), datasets=["mnist"])


def test_shipped_config_holds_the_study_defaults():
    """configs/study/repro_duq.yaml names the study and validates; its settings are the class defaults."""
    import inspect
    from pathlib import Path

    import yaml

    from lit_cf.studies.core import study_registry, validate_settings

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/study/repro_duq.yaml").read_text())
    cls = study_registry[cfg["study"]]
    assert cfg["study"] == "repro_duq" and cfg["output_dir"]
    settings = validate_settings(cls, cfg["settings"])
    defaults = validate_settings(cls, {})
    assert set(settings) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    # lists and mappings default to None in the signature and are spelled out in the config
    assert {k: v for k, v in settings.items() if defaults[k] is not None} == {k: v for k, v in defaults.items() if v is not None}


def test_a_fit_killed_mid_epoch_resumes_from_the_last_whole_epoch(tmp_path):
    """EpochCheckpoint writes last.ckpt after every epoch (Lightning's save_last with save_top_k=0
    wrote it only when the fit ended), atomically: no temporary file is left."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_cf.studies.resumable_fit import EpochCheckpoint

    class Killed(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.current_epoch == 2 and args[-1] == 1:
                raise RuntimeError("killed")

    ckpt = tmp_path / "last.ckpt"

    def trainer(*callbacks):
        return L.Trainer(
            max_epochs=4,
            limit_train_batches=3,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[EpochCheckpoint(ckpt), *callbacks],
        )

    with pytest.raises(RuntimeError, match="killed"):
        trainer(Killed()).fit(BoringModel())
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 6  # two whole epochs of 3 batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    resumed = trainer()
    resumed.fit(BoringModel(), ckpt_path=ckpt, weights_only=True)
    assert resumed.global_step == 12 and torch.load(ckpt, weights_only=True)["global_step"] == 12
