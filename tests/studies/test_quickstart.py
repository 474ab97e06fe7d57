"""The quickstart study (the README's first command) at toy scale through `lit-cf study --settings`."""

from __future__ import annotations

import json

import pytest

from lit_cf.cli import main
from lit_cf.studies.core import CONFIG_ROOT
from lit_cf.studies.quickstart import QuickstartStudy

CONFIG = str(CONFIG_ROOT / "study" / "quickstart.yaml")
TOY = [
    "--settings.train_size=200",
    "--settings.test_size=60",
    "--settings.epochs=1",
    "--settings.duq_epochs=1",
    "--settings.oracle_epochs=1",
    "--settings.regressor_epochs=1",
    "--settings.num_queries=2",
    "--settings.methods=[pixel]",
    "--settings.pixel_steps=2",
    "--settings.cout_steps=1",
    "--settings.n_boot=10",
]


def test_quickstart_at_toy_scale_prints_the_verdict_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "qs"
    main(["study", "--config", CONFIG, "--output_dir", str(out), *TOY])  # returns: exit status 0
    printed = capsys.readouterr().out
    assert "planted-shortcut verdict: " in printed
    report = out / "evaluate" / "shortcut-cnn" / "report.html"
    assert report.is_file() and f"report: {report}" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["passed"] is None and isinstance(results["verdict"]["pass"], bool)  # printed, not the exit status
    assert sorted(results["models"]) == ["clean", "duq", "oracle", "regressor", "shortcut"]  # no generator without latent_attack
    assert [(r["method"], r["classifier"]) for r in results["rows"]] == [("pixel", "shortcut"), ("pixel", "clean")]
    assert "planted-shortcut verdict" in (out / "results.md").read_text()


def test_quickstart_defaults_match_its_config_and_refuse_a_verdict_method_not_run():
    import yaml

    settings = yaml.safe_load(open(CONFIG))["settings"]
    study = QuickstartStudy(**settings)
    assert study.methods == ["pixel", "disc", "latent_attack"] and study.verdict_methods == ["pixel"]
    assert sorted(study.model_specs()) == ["autoencoder", "clean", "duq", "oracle", "regressor", "shortcut"]
    from lit_cf.errors import UserError

    with pytest.raises(UserError, match="not among methods"):
        QuickstartStudy(methods=("pixel",), verdict_methods=("disc",))
