"""Students trained on counterfactuals: the datamodule that pools explain runs, and `lit-cf fit` on it."""

from __future__ import annotations

import pytest
import torch

from lit_cf.cli import main
from lit_cf.data import CounterfactualDataModule
from lit_cf.errors import UserError
from lit_cf.explainers import ExplainRun
from tests.conftest import CONFIGS


@pytest.fixture(scope="module")
def pixel_run(cnn_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfdata") / "run"
    main(
        [
            "explain",
            f"--config={CONFIGS / 'data/rendered.yaml'}",
            "--data.init_args.train_size=64",
            "--data.init_args.val_size=32",
            "--data.init_args.test_size=32",
            f"--config={CONFIGS / 'explain/pixel.yaml'}",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--classifier={cnn_ckpt}",
            f"--output_dir={out}",
            "--split=val",
            "--num_queries=6",
            "--target=[1,2]",
            "--on_source_equals_target=skip",
            "--model.init_args.steps=5",
        ]
    )
    return out


def test_pool_labels_are_the_teachers_predictions(pixel_run):
    run = ExplainRun(pixel_run)
    dm = CounterfactualDataModule(runs=[str(pixel_run)], val_fraction=0.25, num_classes=10)
    pool = dm.pool()
    queries = {r["index"] for r in run.manifest}
    assert len(pool) == len(run) + len(queries)
    assert torch.equal(pool.labels[: len(run)], torch.tensor([r["final_pred"] for r in run.manifest]))
    assert torch.equal(pool.images[: len(run)], run.tensor("counterfactual").float())
    assert int(pool.kinds.sum()) == len(run)
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) + len(val) == len(pool) and len(val) == round(0.25 * len(pool))
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    without = CounterfactualDataModule(runs=[str(pixel_run)], include_queries=False)
    assert len(without.pool()) == len(run)
    with pytest.raises(UserError, match="not found"):
        CounterfactualDataModule(runs=[str(pixel_run.parent / "missing")]).pool()
    with pytest.raises(UserError, match="at least one explain run"):
        CounterfactualDataModule(runs=[])


def test_fit_a_student_on_counterfactuals(pixel_run, tmp_path):
    main(
        [
            "fit",
            "--data=lit_cf.data.CounterfactualDataModule",
            f"--data.init_args.runs=[{pixel_run}]",
            "--data.init_args.num_classes=10",
            "--data.init_args.batch_size=8",
            f"--config={CONFIGS / 'model/cnn.yaml'}",
            f"--config={CONFIGS / 'trainer/smoke.yaml'}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--sample_grid.num_samples=0",
        ]
    )
    assert list(tmp_path.rglob("*.ckpt"))
