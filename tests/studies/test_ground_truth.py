"""The ground_truth study: its verdict rule and its usage errors (the full run is a study, not a test)."""

from __future__ import annotations

import pytest

from lit_cf.cli import main
from lit_cf.studies import study_registry
from lit_cf.studies.ground_truth import CONFIG_ROOT, GroundTruthStudy, mark_rank, overall_verdict, parse_methods, verdict


def ranking(*pairs: tuple[str, float]) -> list[tuple[str, float, float, float]]:
    return [(name, score, score - 0.02, score + 0.02) for name, score in pairs]


def test_verdict_needs_a_positive_mark_first_for_the_shortcut_classifier_only():
    ok = verdict(ranking(("mark", 0.3), ("intensity", -0.1)), ranking(("intensity", -0.2), ("mark", 0.01)))
    assert ok["pass"] and ok["ci_separated"]
    second = verdict(ranking(("intensity", -0.3), ("mark", 0.2)), ranking(("intensity", -0.2), ("mark", 0.0)))
    assert not second["pass"] and "intensity" in second["why"]
    negative = verdict(ranking(("mark", -0.3), ("slant", 0.1)), ranking(("slant", 0.2), ("mark", 0.0)))
    assert not negative["pass"]
    clean_too = verdict(ranking(("mark", 0.3), ("slant", 0.1)), ranking(("mark", 0.2), ("slant", 0.1)))
    assert not clean_too["pass"] and "clean classifier" in clean_too["why"]
    close = verdict(ranking(("mark", 0.3), ("slant", -0.29)), ranking(("slant", 0.2), ("mark", 0.0)))
    assert close["pass"] and not close["ci_separated"]  # first, but the intervals overlap
    assert not verdict("no successful counterfactual", ranking(("mark", 0.0)))["pass"]
    # rankings read back from JSON (lists, not tuples) give the same verdict
    as_lists = [list(r) for r in ranking(("mark", 0.3), ("intensity", -0.1))]
    assert verdict(as_lists, ranking(("intensity", -0.2), ("mark", 0.01))) == ok
    assert mark_rank(as_lists) == (1, 0.3) and mark_rank(ranking(("slant", 0.2), ("mark", 0.1))) == (2, 0.1)


def test_overall_verdict_reads_each_methods_primary_source_only():
    good = verdict(ranking(("mark", 0.3), ("slant", 0.1)), ranking(("slant", 0.2), ("mark", 0.0)))
    bad = verdict(ranking(("slant", 0.3), ("mark", 0.1)), ranking(("slant", 0.2), ("mark", 0.0)))
    results = {
        "pixel": {"primary_source": "image", "verdicts": {"image": good}},
        "latent_attack": {"primary_source": "recon", "verdicts": {"image": bad, "recon": good}},
    }
    passed, lines = overall_verdict(results)
    assert (
        passed and "FAIL latent_attack (image, informative): shortcut classifier: slant (+0.300) ranks first, not +mark" in lines
    )
    results["disc"] = {"primary_source": "recon", "verdicts": {"image": good}}  # no recon ranking
    passed, lines = overall_verdict(results)
    assert not passed and "FAIL disc: no recon attribution for both classifiers" in lines


def test_defaults_are_the_full_scale_and_methods_are_normalised():
    study = GroundTruthStudy()
    assert study_registry["ground_truth"] is GroundTruthStudy
    assert (study.train_size, study.epochs, study.num_queries, study.methods) == (
        20000,
        5,
        200,
        ["pixel", "latent_attack", "disc"],
    )
    assert parse_methods(["latent, pixel", "Latent-Attack"]) == ["latent_attack", "pixel"]
    specs = study.model_specs()
    assert sorted(specs) == ["autoencoder", "clean", "regressor", "shortcut"]
    assert specs["autoencoder"].args["model.init_args.output_activation"] == "identity"
    assert specs["shortcut"].args["data.init_args.val_size"] == 2000
    assert (CONFIG_ROOT / "study" / "ground_truth.yaml").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--settings.generator", "vae", "--settings.ae_output", "identity"], "ae_output identity needs generator autoencoder"),
        (["--settings.latent_pixel_weight", "-1"], "latent_pixel_weight must be >= 0"),
        (["--settings.latent_source", "pixels"], "settings.latent_source"),
        (["--settings.methods", "[diffusion]"], "unknown method 'diffusion'"),
        (["--settings.methods", "[dvce]", "--settings.diffusion", "nowhere.ckpt"], "diffusion: no DDPM checkpoint at"),
        (["--settings.methods", "[ace]", "--settings.diffusion_config", "model/none.yaml"], "diffusion_config: study config"),
        (["--settings.diffusion_args", "{dime: {}}"], "diffusion_args has keys ['dime']"),
        (["--settings.diffusion_epochs", "0"], "diffusion_epochs must be >= 1"),
        (["--settings.num_queries", "0"], "num_queries must be >= 1"),
        (["--settings.epoch", "3"], "unrecognized arguments: --settings.epoch"),
    ],
)
def test_usage_errors_exit_2_one_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "gt"
    with pytest.raises(SystemExit) as err:
        main(["study", "--config", str(CONFIG_ROOT / "study" / "ground_truth.yaml"), "--output_dir", str(out), *args])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lit-cf: error: ") and message in lines[0]
    assert not out.exists()


def test_too_few_queries_fail_before_training_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "gt"
    cfg = str(CONFIG_ROOT / "study" / "ground_truth.yaml")
    with pytest.raises(SystemExit) as err:
        main(["study", "--config", cfg, "--output_dir", str(out), "--settings.test_size", "20", "--settings.num_queries", "50"])
    assert err.value.code == 2
    assert "raise test_size or lower num_queries" in capsys.readouterr().err
    assert not out.exists()


def test_diffusion_methods_train_a_ddpm_on_the_auxiliary_data_or_reuse_one(tmp_path):
    study = GroundTruthStudy(
        methods=("pixel", "dvce", "ace"), diffusion_epochs=2, diffusion_args={"dvce": {"model.init_args.num_steps": 10}}
    )
    specs = study.model_specs()
    assert sorted(specs) == ["clean", "diffusion", "regressor", "shortcut"]
    ddpm = specs["diffusion"]
    assert ddpm.configs == ("data/rendered.yaml", "model/ddpm_mnist.yaml")
    assert ddpm.args["data.init_args.mark_rate"] == 0.5 and ddpm.args["trainer.max_epochs"] == 2
    ckpt = {"diffusion": tmp_path / "ddpm.ckpt"}
    assert study.method_args("dvce", ckpt) == {"model.init_args.diffusion": ckpt["diffusion"], "model.init_args.num_steps": 10}
    assert study.method_args("ace", ckpt) == {"model.init_args.diffusion": ckpt["diffusion"]}
    given = tmp_path / "given.ckpt"
    given.write_bytes(b"x")
    reuse = GroundTruthStudy(methods=("fastdime",), diffusion=str(given))
    assert "diffusion" not in reuse.model_specs() and reuse.diffusion == given.resolve()
    assert "diffusion" not in GroundTruthStudy().model_specs()  # no diffusion method: no DDPM


@pytest.mark.slow  # about a minute on two busy cores: five tiny fits, two DVCE runs, attribution
def test_tiny_study_with_dvce_ranks_factors_on_the_query_image(tmp_path):
    from lit_cf.studies import run_study

    settings = {
        "train_size": 256,
        "test_size": 64,
        "epochs": 1,
        "num_queries": 4,
        "methods": ["dvce"],
        "diffusion_config": "model/ddpm_tiny.yaml",
        "diffusion_args": {"dvce": {"model.init_args.num_steps": 4}},
        "n_boot": 20,
    }
    result = run_study({"study": "ground_truth", "output_dir": str(tmp_path / "out"), "settings": settings}, quiet=True)
    rows = [r for r in result.rows if r["method"] == "dvce"]
    assert {r["source"] for r in rows} == {"image"} and {r["classifier"] for r in rows} == {"shortcut", "clean"}
    assert all(r["n"] == 4 for r in rows)
    assert result.verdict["methods"]["dvce"]["primary_source"] == "image"  # type: ignore[index]
    assert len(list((tmp_path / "out" / "models").glob("diffusion-*/last.ckpt"))) == 1  # trained by the study
