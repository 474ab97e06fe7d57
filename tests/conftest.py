"""Shared fixtures: tiny classifiers trained through the real CLI on small rendered data."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_cf.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

TINY_DATA = [
    "--data.init_args.train_size=512",
    "--data.init_args.val_size=64",
    "--data.init_args.test_size=128",
    "--data.init_args.batch_size=64",
]


def fit_checkpoint(workdir: Path, model_config: str, *extra: str, data_config: str = "data/rendered.yaml") -> Path:
    """Train with `lit-cf fit` on tiny rendered data and return the last checkpoint path."""
    main(
        [
            "fit",
            f"--config={CONFIGS / data_config}",
            f"--config={CONFIGS / model_config}",
            f"--config={CONFIGS / 'trainer/smoke.yaml'}",
            f"--config={CONFIGS / 'logger/csv.yaml'}",
            f"--trainer.default_root_dir={workdir}",
            f"--trainer.logger.init_args.save_dir={workdir}",
            "--trainer.limit_train_batches=8",
            "--trainer.max_epochs=3",
            "--sample_grid.num_samples=0",
            *(TINY_DATA if "rendered" in data_config else []),
            *extra,
        ]
    )
    ckpts = sorted(workdir.rglob("*.ckpt"))
    assert ckpts, f"no checkpoint written under {workdir}"
    return ckpts[-1]


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny kernels: on a shared 2-core machine a second
    thread mostly waits for a busy core (up to 10x slower). Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cnn_ckpt(tmp_path_factory) -> Path:
    return fit_checkpoint(tmp_path_factory.mktemp("cnn"), "model/cnn.yaml")


@pytest.fixture(scope="session")
def duq_ckpt(tmp_path_factory) -> Path:
    return fit_checkpoint(
        tmp_path_factory.mktemp("duq"),
        "model/duq_cnn.yaml",
        "--model.init_args.backbone.init_args.channels=[8,16,16]",
        "--model.init_args.backbone.init_args.hidden=32",
        "--model.init_args.embedding_size=16",
    )


@pytest.fixture(scope="session")
def ddpm_ckpt(tmp_path_factory) -> Path:
    """A tiny DDPM (configs/model/ddpm_tiny.yaml, 100-step schedule) fitted on the rendered digits."""
    return fit_checkpoint(tmp_path_factory.mktemp("ddpm"), "model/ddpm_tiny.yaml", "--trainer.max_epochs=2")
