"""The `lit-cf` command surface."""

import subprocess
import sys

import pytest

from lit_cf.cli import main


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for verb in ("fit", "validate", "test", "predict", "explain", "evaluate"):
        assert verb in out
    assert "One more subcommand: study (lit-cf study --config" in " ".join(out.split())


def test_explain_help_documents_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    out = capsys.readouterr().out
    for arg in ("--classifier", "--output_dir", "--target", "--num_queries", "--chunk_size", "--overwrite", "most_likely_other"):
        assert arg in out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "lit_cf", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "explain" in result.stdout


def test_unknown_model_class_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["fit", "--model=lit_cf.models.NoSuchModel", "--data=lit_cf.data.RenderedDigitsDataModule"])
    assert err.value.code != 0
    assert "NoSuchModel" in capsys.readouterr().err
