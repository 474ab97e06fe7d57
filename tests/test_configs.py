"""Every shipped config runs through the real CLI on tiny generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lit_cf.cli import main
from tests.conftest import CONFIGS, TINY_DATA
from tests.fixtures import write_celeba_fixture, write_idx_dataset

SMOKE = [f"--config={CONFIGS / 'trainer/smoke.yaml'}", "--sample_grid.num_samples=8"]


def data_args(data_config: str, root: Path) -> list[str]:
    """The data config plus overrides that point it at tiny generated data under ``root``."""
    name = Path(data_config).stem
    args = [f"--config={CONFIGS / data_config}", "--data.init_args.batch_size=16"]
    if name.startswith("rendered"):
        return args + TINY_DATA[:3] + ["--data.init_args.batch_size=16"]
    if name in ("mnist", "fashion_mnist", "fashion_mnist_corrupted"):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        if not (root / folder).exists():
            write_idx_dataset(root, name=folder, n_train=96, n_test=32)
        return args + [f"--data.init_args.root={root}", "--data.init_args.val_size=16"]
    if name == "celeba":
        if not (root / "celeba").exists():
            write_celeba_fixture(root, n=24)
        return args + [f"--data.init_args.root={root}", "--data.init_args.image_size=32"]
    raise AssertionError(f"no tiny-data recipe for {data_config}")


def fit(tmp_path: Path, data_config: str, model_config: str, *extra: str) -> Path:
    main(
        [
            "fit",
            *data_args(data_config, tmp_path / "data"),
            f"--config={CONFIGS / model_config}",
            *SMOKE,
            f"--config={CONFIGS / 'logger/csv.yaml'}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            *extra,
        ]
    )
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts
    return ckpts[-1]


GRAY_MODELS = [
    "model/cnn.yaml",
    "model/cnn_wide.yaml",
    "model/robust_cnn.yaml",
    "model/duq_cnn.yaml",
    "model/duq_cnn_mnist.yaml",
    "model/autoencoder.yaml",
    "model/vae.yaml",
    "model/factor_regressor.yaml",
]
CELEBA_MODELS = [
    "model/resnet18_celeba.yaml",
    "model/duq_resnet18_celeba.yaml",
    "model/autoencoder_celeba.yaml",
    "model/attribute_classifier_celeba.yaml",
    "model/cnn_celeba.yaml",
    "model/duq_cnn_celeba.yaml",
]


def test_every_config_is_covered():
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    covered = set(GRAY_MODELS + CELEBA_MODELS + DATA_CONFIGS + TRAINER_CONFIGS + LOGGER_CONFIGS + EXPLAIN_CONFIGS)
    # need a trained generator (and a direction file): run through the CLI in tests/explainers/test_latent.py
    covered |= {"explain/latent_attack.yaml", "explain/latent_linear_edit.yaml"}
    # your own images: explained with every method in tests/explainers/test_any_classifier.py
    covered |= {"data/image_folder.yaml"}
    # DDPMs and DVCE: fitted and run as shipped in tests/models/test_diffusion.py and tests/explainers/test_dvce.py
    covered |= {"model/ddpm_tiny.yaml", "model/ddpm_mnist.yaml", "model/ddpm_celeba.yaml", "explain/dvce.yaml"}
    # the latent DDPM needs a trained autoencoder: fitted as shipped (small sizes) in tests/models/test_latent_diffusion.py
    covered |= {"model/latent_ddpm_mnist.yaml"}
    # FastDiME and ACE: run as shipped in tests/explainers/test_diffusion_methods_cli.py
    covered |= {"explain/fastdime.yaml", "explain/ace.yaml"}
    # studies (`lit-cf study`): every configs/study/*.yaml is validated in tests/studies/test_study_configs.py
    covered |= {p for p in shipped if p.startswith("study/")}
    assert shipped == covered, f"configs without a test: {sorted(shipped - covered)}"


@pytest.mark.parametrize("model_config", GRAY_MODELS)
def test_gray_model_configs_fit_and_test(model_config, tmp_path):
    fit(tmp_path, "data/rendered.yaml", model_config)
    metrics_files = list(tmp_path.rglob("metrics.csv"))
    assert metrics_files and "train/loss" in metrics_files[0].read_text()
    assert list(tmp_path.rglob("samples.png"))


@pytest.mark.parametrize("model_config", CELEBA_MODELS)
def test_celeba_model_configs_fit(model_config, tmp_path):
    extra = []
    if "autoencoder" in model_config:
        extra = ["--model.init_args.image_size=32"]
    if "cnn_celeba" in model_config:  # the tiny fixture is 32 px
        extra = ["--model.init_args.backbone.init_args.image_size=32"]
    fit(tmp_path, "data/celeba.yaml", model_config, *extra)


DATA_CONFIGS = [
    "data/rendered.yaml",
    "data/rendered_shortcut.yaml",
    "data/mnist.yaml",
    "data/fashion_mnist.yaml",
    "data/fashion_mnist_corrupted.yaml",
    "data/celeba.yaml",
]


@pytest.mark.parametrize("data_config", DATA_CONFIGS[:-1])
def test_data_configs_fit_validate_test_predict(data_config, tmp_path):
    ckpt = fit(tmp_path, data_config, "model/cnn.yaml")
    for verb in ("validate", "test", "predict"):
        main(
            [
                verb,
                *data_args(data_config, tmp_path / "data"),
                f"--config={CONFIGS / 'model/cnn.yaml'}",
                *SMOKE,
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path / verb}",
                f"--ckpt_path={ckpt}",
            ]
        )


TRAINER_CONFIGS = ["trainer/default.yaml", "trainer/duq_paper.yaml", "trainer/smoke.yaml"]


@pytest.mark.parametrize("trainer_config", TRAINER_CONFIGS[:2])
def test_trainer_configs(trainer_config, tmp_path):
    fit(
        tmp_path,
        "data/rendered.yaml",
        "model/cnn.yaml",
        f"--config={CONFIGS / trainer_config}",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
    )


LOGGER_CONFIGS = ["logger/csv.yaml", "logger/wandb.yaml"]


def test_wandb_offline_logger_writes_run_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main(
        [
            "fit",
            *data_args("data/rendered.yaml", tmp_path / "data"),
            f"--config={CONFIGS / 'model/cnn.yaml'}",
            *SMOKE,
            f"--config={CONFIGS / 'logger/wandb.yaml'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    import wandb

    wandb.finish()  # a CLI process ends its run at exit; in-process, a run left open captures the next test's logger
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert runs, "an offline run folder must exist for `wandb sync`"
    assert list(runs[0].glob("*.wandb"))
    media = list(runs[0].rglob("*.png"))
    assert media, "the sample grid must be logged as an image"


EXPLAIN_CONFIGS = ["explain/pixel.yaml", "explain/deepinversion.yaml", "explain/disc.yaml"]
# DISC's prior fit is shortened here (its full behaviour is tested in tests/explainers/test_disc.py)
EXPLAIN_EXTRA = {"explain/disc.yaml": ["--model.init_args.fit_steps=5", "--model.init_args.dip_channels=8"]}


@pytest.mark.parametrize("explain_config", EXPLAIN_CONFIGS)
def test_explain_configs(explain_config, duq_ckpt, tmp_path):
    out = tmp_path / "run"
    main(
        [
            "explain",
            *data_args("data/rendered.yaml", tmp_path / "data"),
            f"--config={CONFIGS / explain_config}",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--classifier={duq_ckpt}",
            f"--output_dir={out}",
            "--num_queries=6",
            "--model.init_args.steps=3",
            *EXPLAIN_EXTRA.get(explain_config, []),
        ]
    )
    assert (out / "manifest.jsonl").exists()
    assert os.path.getsize(out / "grids" / "grid-000.png") > 0
