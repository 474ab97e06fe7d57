"""The README's "Explain your own model" example, run as written (tiny sizes, CPU)."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from lit_cf.cli import main
from tests.conftest import CONFIGS, ROOT

pytestmark = pytest.mark.usefixtures("single_thread")


def readme_blocks(title: str = "## Explain your own model") -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    end = text.index("\n## ", start + len(title))
    return re.findall(r"```(python|bash)\n(.*?)```", text[start:end], flags=re.S)


def cli_commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.strip().startswith("lit-cf ")]


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks()
    assert [kind for kind, _ in blocks] == ["python", "bash", "python", "bash"]
    namespace: dict = {}
    for kind, code in blocks:
        if kind == "python":
            exec(compile(code, "README.md", "exec"), namespace)
            continue
        for args in cli_commands(code.replace("configs/", f"{CONFIGS}/")):
            main(args)
    for run in ("pets_pixel", "pets_pixel_ts", "pets_di"):
        meta = json.loads((tmp_path / "runs" / run / "run.json").read_text())
        assert meta["status"] == "complete"
        assert len((tmp_path / "runs" / run / "manifest.jsonl").read_text().splitlines()) == 6
    clf = json.loads((tmp_path / "runs/pets_pixel/run.json").read_text())["classifier"]
    assert clf["kind"] == "module" and clf["class_path"].startswith("torchvision.models")
    assert clf["path"].endswith("resnet18_pets.safetensors") and len(clf["sha256"]) == 64
    assert clf["class_names"] == ["cat", "dog", "fox"]
    ts = json.loads((tmp_path / "runs/pets_pixel_ts/run.json").read_text())["classifier"]
    assert ts["kind"] == "torchscript" and ts["state_sha256"] == clf["state_sha256"]  # the same weights
    di = json.loads((tmp_path / "runs/pets_di/run.json").read_text())
    assert di["classifier"]["kind"] == "python" and (tmp_path / "runs/pets_di/classifier.ts").is_file()
    for ev in ("pets_evaluate", "pets_di_evaluate"):
        metrics = json.loads((tmp_path / "runs" / ev / "metrics.json").read_text())
        assert metrics["table"][0]["n"] == 6
    meta = json.loads((tmp_path / "runs/pets_evaluate/metrics.json").read_text())["meta"]
    assert meta["feature layers (perceptual_domain)"].endswith("(chosen automatically)")
    assert "net.layer1" in meta["feature layers (perceptual_domain)"]
