"""`lit-cf evaluate` end to end on tiny explain runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.explainers import ExplainRun
from lit_cf.runs import RunDir
from tests.conftest import CONFIGS, fit_checkpoint

DATA = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=640",  # the reference split of realism against real images
    "--data.init_args.val_size=64",
    "--data.init_args.test_size=128",
]


def explain(ckpt: Path, out: Path, method: str = "pixel", *extra: str) -> Path:
    main(
        [
            "explain",
            *DATA,
            f"--config={CONFIGS / f'explain/{method}.yaml'}",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out.parent}",
            f"--classifier={ckpt}",
            f"--output_dir={out}",
            "--num_queries=24",
            "--model.init_args.steps=20",
            "--model.init_args.lr=0.05",
            *extra,
        ]
    )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cnn_ckpt, duq_ckpt):
    root = tmp_path_factory.mktemp("evaluate")
    oracle = fit_checkpoint(root / "oracle", "model/cnn.yaml", "--seed_everything=7")
    regressor = fit_checkpoint(root / "regressor", "model/factor_regressor.yaml")
    runs = [
        explain(cnn_ckpt, root / "pixel"),
        explain(duq_ckpt, root / "deepinversion", "deepinversion"),
        explain(duq_ckpt, root / "deepinversion_seed1", "deepinversion", "--seed=1"),
    ]
    return root, runs, oracle, regressor


def evaluate_args(runs, out, oracle, cnn_ckpt, duq_ckpt, *extra, regressor=None):
    return [
        "evaluate",
        *DATA,
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--runs=[{','.join(str(r) for r in runs)}]",
        f"--output_dir={out}",
        f"--oracles={{oracle: {oracle}, self: {cnn_ckpt}}}",
        f"--feature_network={oracle}",
        f"--duq={duq_ckpt}",
        "--cout_steps=5",
        "--reference=train",
        *([f"--descriptors={regressor}"] if regressor else []),
        *extra,
    ]


def test_evaluate_writes_comparison_table_metrics_and_report(setup, cnn_ckpt, duq_ckpt, tmp_path):
    root, runs, oracle, regressor = setup
    out = tmp_path / "eval"
    main(evaluate_args(runs, out, oracle, cnn_ckpt, duq_ckpt, regressor=regressor))
    payload = json.loads((out / "metrics.json").read_text())
    # one row per run, then the no-edit and floor rows of realism against real images (the two
    # DeepInversion runs share queries and targets, so they share one pair)
    assert [row["method"] for row in payload["table"]] == [
        "pixel",
        "deepinversion",
        "deepinversion_seed1",
        "no edit (queries) [pixel]",
        "real floor [pixel]",
        "no edit (queries) [deepinversion]",
        "real floor [deepinversion]",
    ]
    # the two DeepInversion runs differ only in their seed: sigma_L is their pairwise distance
    # (perceptual, on the feature network, since one is given)
    di = payload["runs"]["deepinversion"]["overall"]
    di1 = payload["runs"]["deepinversion_seed1"]["overall"]
    assert di["diversity_perceptual_domain_mean"] > 0
    assert di["diversity_perceptual_domain_mean"] == di1["diversity_perceptual_domain_mean"]
    assert di["diversity_runs"] == 2
    assert not any(k.startswith("diversity") for k in payload["runs"]["pixel"]["overall"])
    pixel = payload["runs"]["pixel"]["overall"]
    run = ExplainRun(runs[0])
    # validity agrees with the manifest, closeness with the stored tensors
    assert pixel["flip_rate"] == pytest.approx(sum(r["success"] for r in run.manifest) / len(run), abs=1e-6)
    l2 = (run.tensor("counterfactual") - run.tensor("query")).flatten(1).norm(dim=1)
    assert pixel["l2_mean"] == pytest.approx(float(l2.mean()), rel=1e-4)
    # the explained classifier as its own oracle is masked, the independent one is scored
    assert math.isnan(pixel["ota_self"]) and 0.0 <= pixel["ota_oracle"] <= 1.0
    for key in (
        "fid_domain",
        "sfid_domain",
        "perceptual_domain_mean",
        "duq_certainty_cf_mean",
        "cout_mean",
        "seconds_per_cf_mean",
        "l1.5_mean",
        "gt_nuisance_change",
        "gt_change_mark",
        "gt_error_mark",
    ):
        assert key in pixel and not math.isnan(pixel[key]), key
    assert "mnac_mean" not in pixel  # MNAC counts binary attribute flips, not continuous factors
    pairs = payload["runs"]["pixel"]["per_pair"]
    assert sum(v["n"] for v in pairs.values()) == len(run)
    assert all(re.fullmatch(r"\d->\d", k) for k in pairs)
    # descriptor attributions: global ranking over the 7 factors with intervals, and per target
    ranking = payload["runs"]["pixel"]["global_attributions"]
    assert len(ranking) == 7 and all(lo <= score <= hi for _, score, lo, hi in ranking)
    assert set(payload["runs"]["pixel"]["global_attributions_by_target"]) == {str(r["target"]) for r in run.manifest}
    md = (out / "metrics.md").read_text()
    assert md.count("\n") >= 3 and "fid_domain" in md
    html = (out / "report.html").read_text()
    assert "pixel" in html and "deepinversion" in html
    assert "data:image/png;base64," in html
    assert not re.search(r'src="(?!data:)', html), "every image must be embedded"


def test_evaluate_scores_realism_against_real_images_of_the_target_class(setup, cnn_ckpt, duq_ckpt, tmp_path, capsys):
    root, runs, oracle, _ = setup
    out = tmp_path / "eval"
    main(evaluate_args(runs[:2], out, oracle, cnn_ckpt, duq_ckpt, "--reference_seed=3"))
    payload = json.loads((out / "metrics.json").read_text())
    from lit_cf.data.rendered import RenderedDigitsDataModule

    train_labels = RenderedDigitsDataModule(train_size=640, val_size=64, test_size=128).dataset("train")
    train_labels = torch.stack([train_labels[i]["label"] for i in range(len(train_labels))])
    for name, run_dir in zip(("pixel", "deepinversion"), runs[:2]):
        res = payload["runs"][name]
        overall, sample = res["overall"], res["reference_sample"]
        targets = sorted(r["target"] for r in ExplainRun(run_dir).manifest)
        # class matched: one real train image of each counterfactual's target class, and a
        # disjoint floor sample with the same classes
        assert sorted(train_labels[sample["reference_indices"]].tolist()) == targets
        assert sorted(train_labels[sample["floor_indices"]].tolist()) == targets
        assert not set(sample["reference_indices"]) & set(sample["floor_indices"])
        assert overall["reference_split"] == "train" and overall["reference_seed"] == 3
        assert overall["reference_excluded"] == 0  # the queries come from another split
        for key in ("fid_real_domain", "fid_real_domain_no_edit", "fid_real_domain_floor"):
            assert overall[key] > 0 and math.isfinite(overall[key]), key
        assert overall["stopping"] == "per image at p(target) >= 0.9, at most 20 steps"
    # the two runs explained different classifiers (other targets): one pair of rows each
    rows = {row["method"]: row for row in payload["table"]}
    assert set(rows) == {
        "pixel",
        "deepinversion",
        "no edit (queries) [pixel]",
        "real floor [pixel]",
        "no edit (queries) [deepinversion]",
        "real floor [deepinversion]",
    }
    assert rows["no edit (queries) [pixel]"]["fid_real_domain"] == payload["runs"]["pixel"]["overall"]["fid_real_domain_no_edit"]
    assert rows["real floor [pixel]"]["n"] == 24
    assert rows["pixel"]["steps_mean"] >= 0 and 0 <= rows["pixel"]["tconf_mean"] <= 1
    md = (out / "metrics.md").read_text()
    assert "fid_real_domain" in md and "real floor [pixel]" in md and "stopping" in md
    assert "real floor [deepinversion]" in (out / "report.html").read_text()
    # the default reference (the test split the queries came from) is too small here once the
    # queries are excluded: one line naming the fix, no output
    bad = evaluate_args(runs[:1], tmp_path / "eval2", oracle, cnn_ckpt, duq_ckpt)
    bad.remove("--reference=train")
    with pytest.raises(SystemExit) as err:
        main(bad)
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "queries excluded" in msg and "--reference" in msg and not (tmp_path / "eval2").exists()
    with pytest.raises(SystemExit):
        main(evaluate_args(runs[:1], tmp_path / "eval3", oracle, cnn_ckpt, duq_ckpt, "--reference=nope"))
    assert "--reference nope: unknown split" in capsys.readouterr().err


def test_evaluate_rejects_bad_runs(setup, cnn_ckpt, duq_ckpt, tmp_path, capsys):
    root, runs, oracle, _ = setup
    out = tmp_path / "eval"

    def expect(args, match):
        with pytest.raises(SystemExit) as err:
            main(args)
        assert err.value.code == 2
        assert match in capsys.readouterr().err
        assert not out.exists()

    # other data: a different seed renders other images at the same indices
    expect(evaluate_args(runs, out, oracle, cnn_ckpt, duq_ckpt, "--data.init_args.seed=5"), "not the image")
    # a classifier that is not the one explained
    expect(evaluate_args(runs[:1], out, oracle, cnn_ckpt, duq_ckpt, f"--classifier={oracle}"), "different classifier")
    # an incomplete run
    broken = tmp_path / "broken"
    broken.mkdir()
    RunDir(broken).write_meta({"status": "running"})
    expect(evaluate_args([broken], out, oracle, cnn_ckpt, duq_ckpt), "not a complete explain run")
    # another datamodule altogether
    from tests.fixtures import write_idx_dataset

    mnist_root = write_idx_dataset(tmp_path / "mnist", name="MNIST", n_train=32, n_test=32)
    args = evaluate_args(runs[:1], out, oracle, cnn_ckpt, duq_ckpt)
    args[1:5] = ["--data=lit_cf.data.MNISTDataModule", f"--data.init_args.root={mnist_root}", "--data.init_args.val_size=4"]
    expect(args, "other data")


def test_evaluate_logs_table_and_images_to_wandb_offline(setup, cnn_ckpt, duq_ckpt, tmp_path, monkeypatch):
    root, runs, oracle, regressor = setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.finish()  # no run of an earlier test in this process may capture this one's logger
    args = evaluate_args(runs[:1], tmp_path / "eval", oracle, cnn_ckpt, duq_ckpt, regressor=regressor)
    args.remove("--trainer.logger=false")
    main(args + [f"--config={CONFIGS / 'logger/wandb.yaml'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'wb'}"])
    import wandb

    wandb.finish()
    run_dir = next((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    media = {p.suffix for p in run_dir.rglob("*") if "media" in p.parts}
    assert ".png" in media, "the per-run grids are logged as images"
    tables = [p.name for p in run_dir.rglob("*.table.json")]
    assert any("comparison" in t for t in tables) and any("global_attributions" in t for t in tables)


def test_mnac_and_cd_with_an_attribute_predictor_on_celeba(tmp_path):
    from tests.fixtures import write_celeba_fixture

    root = write_celeba_fixture(tmp_path / "data", n=24)
    data = [
        f"--config={CONFIGS / 'data/celeba.yaml'}",
        f"--data.init_args.root={root}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
    ]
    clf = fit_checkpoint(tmp_path / "clf", "model/resnet18_celeba.yaml", *data[1:], data_config="data/celeba.yaml")
    attrs = fit_checkpoint(tmp_path / "attr", "model/attribute_classifier_celeba.yaml", *data[1:], data_config="data/celeba.yaml")
    run = tmp_path / "run"
    main(
        [
            "explain",
            *data,
            f"--config={CONFIGS / 'explain/pixel.yaml'}",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--classifier={clf}",
            f"--output_dir={run}",
            "--split=train",
            "--num_queries=6",
            "--target=flip",
            "--model.init_args.steps=5",
        ]
    )
    out = tmp_path / "eval"
    main(
        [
            "evaluate",
            *data,
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--runs=[{run}]",
            f"--output_dir={out}",
            f"--descriptors={attrs}",
            "--cout_steps=3",
        ]
    )
    overall = json.loads((out / "metrics.json").read_text())["runs"]["run"]["overall"]
    assert 0.0 <= overall["mnac_mean"] <= 40.0
    assert "cd" in overall and overall["cd"] >= 0.0
    assert len(json.loads((out / "metrics.json").read_text())["runs"]["run"]["global_attributions"]) == 40


def test_evaluate_leaves_the_runs_rows_and_files_unchanged(setup, tmp_path, monkeypatch):
    """Evaluation reads runs: the rows it opened (in memory) and the run's files stay as they were."""
    import lit_cf.metrics.suite as suite

    _, runs, _, _ = setup
    opened: list[ExplainRun] = []

    class Recording(ExplainRun):
        def __init__(self, root):
            super().__init__(root)
            opened.append(self)

    monkeypatch.setattr(suite, "ExplainRun", Recording)
    files = {p: p.read_bytes() for p in Path(runs[0]).rglob("*") if p.is_file()}
    out = tmp_path / "eval"
    main(
        [
            "evaluate",
            *DATA,
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--runs=[{runs[0]}]",
            f"--output_dir={out}",
            "--cout_steps=2",
            "--num_grid_images=2",
        ]
    )
    assert len(opened) == 1 and opened[0].manifest == ExplainRun(runs[0]).manifest
    assert {p: p.read_bytes() for p in Path(runs[0]).rglob("*") if p.is_file()} == files
    html = (out / "report.html").read_text()
    assert re.search(r"#\d+ \d -&gt; \d  p\(\d\) \d\.\d\d -&gt; \d\.\d\d", html), "captioned grids"
