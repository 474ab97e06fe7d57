"""Classifier sources (lit_cf.models.external): every source with a model built here, and every bad input."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.models.external import ExternalClassifier, is_torchscript, load_classifier
from tests.conftest import CONFIGS
from tests.image_folder_fixtures import tiny_resnet, write_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RESNET = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 3}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A seeded ResNet-18 saved every way a user might have it."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_resnet()
    out = {"dir": root}
    out["safetensors"] = root / "m.safetensors"
    save_file(model.state_dict(), out["safetensors"])
    out["pt"] = root / "m.pt"
    torch.save(model.state_dict(), out["pt"])
    out["traced"] = root / "m_traced.ts"
    torch.jit.trace(model, torch.rand(2, 3, 16, 16)).save(out["traced"])
    out["scripted"] = root / "m_scripted.pt"
    torch.jit.script(model).save(out["scripted"])
    return out


def reference(x: torch.Tensor) -> torch.Tensor:
    model = tiny_resnet()
    with torch.no_grad():
        return model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))


@pytest.mark.parametrize(
    "kind", ["safetensors", "pt", "traced_weights", "torchscript_path", "scripted_path", "module", "callable"]
)
def test_every_source_gives_the_same_frozen_classifier(files, kind):
    x = torch.rand(4, 3, 16, 16)
    norm = {"input_mean": MEAN, "input_std": STD}
    if kind in ("safetensors", "pt"):
        source = {"module": RESNET, "weights": str(files[kind]), **norm}
    elif kind == "traced_weights":  # TorchScript as the weights of a Python module: hooks keep working
        source = {"module": RESNET, "weights": str(files["traced"]), **norm}
    elif kind in ("torchscript_path", "scripted_path"):
        source = {"path": str(files["traced" if kind == "torchscript_path" else "scripted"]), **norm}
    elif kind == "module":
        source = nn.Sequential(_Normalize(), tiny_resnet())
    else:
        net = nn.Sequential(_Normalize(), tiny_resnet()).eval()
        source = lambda t: net(t)  # noqa: E731 - any callable returning logits
    model, info = load_classifier(source, example=x[:2])
    assert model.num_classes == 3 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    assert info["kind"] == {"safetensors": "module", "pt": "module", "traced_weights": "module"}.get(
        kind, "torchscript" if "path" in kind else "python"
    )
    if info["kind"] != "python":
        assert len(info["sha256"]) == 64 and Path(info["path"]).is_file()
    if info["kind"] == "module":
        assert info["class_path"] == "torchvision.models.resnet18"
    assert isinstance(model, ExternalClassifier)
    assert model.scripted == ("path" in kind)


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_lit_cf_checkpoint_source(cnn_ckpt):
    model, info = load_classifier(str(cnn_ckpt))
    assert info["kind"] == "lit_cf_checkpoint" and info["class_path"] == "lit_cf.models.classifier.Classifier"
    assert model.num_classes == 10 and not model.training


class _OneLogit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def test_output_kinds(tmp_path):
    x = torch.rand(5, 3, 8, 8)
    torch.manual_seed(0)
    net = _OneLogit().eval()
    binary, info = load_classifier(
        {"module": net, "weights": _save(net, tmp_path / "b.safetensors"), "output": "binary_logit"}, x
    )
    assert binary.num_classes == 2 and info["output"] == "binary_logit"
    p = torch.sigmoid(net(x))[:, 0]
    torch.testing.assert_close(binary.probabilities(x), torch.stack([1 - p, p], 1), atol=1e-6, rtol=1e-5)
    probs_net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.Softmax(-1)).eval()
    model, _ = load_classifier(
        {"module": probs_net, "weights": _save(probs_net, tmp_path / "p.safetensors"), "output": "probabilities"}, x
    )
    torch.testing.assert_close(model.probabilities(x), probs_net(x), atol=1e-6, rtol=1e-5)


def _save(net: nn.Module, path: Path) -> str:
    save_file(net.state_dict(), path)
    return str(path)


def test_torchscript_detected_by_content(files, tmp_path):
    assert is_torchscript(files["traced"]) and is_torchscript(files["scripted"])
    assert not is_torchscript(files["pt"]) and not is_torchscript(files["safetensors"])


# --------------------------------------------------------------------------- bad inputs through the CLI
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "imgs", per_class=2, size=16)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Volume(nn.Module):  # returns [N, 3, 2]: not [N, C]
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)).view(len(x), 3, 2)


def _bad_sources(files: dict[str, Path], tmp: Path) -> list[tuple[str, str]]:
    """(classifier argument, expected part of the error) for every bad input of the issue."""
    wrong = tmp / "wrong.pt"  # 4 classes instead of 3, plus an extra and a missing key
    state = tiny_resnet(num_classes=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    torch.save(state, wrong)
    corrupt = tmp / "corrupt.ts"
    with zipfile.ZipFile(files["traced"]) as src, zipfile.ZipFile(corrupt, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(
                item,
                b"def forward(self, x):\n  return @@ not torchscript\n"
                if "/code/" in item.filename and item.filename.endswith(".py")
                else data,
            )
    evil = tmp / "evil.pth"
    torch.save({"conv1.weight": _Evil(tmp / "PWNED")}, evil)
    volume = _Volume()
    save_file(volume.state_dict(), tmp / "volume.safetensors")
    gray = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 3}}
    return [
        (json.dumps({"module": RESNET, "weights": str(tmp / "missing.safetensors")}), "weights not found"),
        (json.dumps({"module": RESNET, "weights": str(wrong)}), "missing keys (e.g. ['layer1.0.conv1.weight'])"),
        (json.dumps({"module": RESNET, "weights": str(wrong)}), "shape mismatches"),
        (json.dumps({"module": RESNET, "weights": str(wrong)}), "unexpected keys (e.g. ['extra.weight'])"),
        (str(corrupt), "cannot load TorchScript file"),
        (json.dumps({"module": {"class_path": "no_such_pkg.nets.Net"}, "weights": str(files["pt"])}), "no_such_pkg.nets.Net"),
        (
            json.dumps(
                {"module": {"class_path": "tests.models.test_external._Volume"}, "weights": str(tmp / "volume.safetensors")}
            ),
            "[N, C]",
        ),
        (
            json.dumps({"module": gray, "weights": str(files["pt"]), "input_mean": [0.5, 0.5]}),
            "input_mean has 2 values but the images have 3",
        ),
        (json.dumps({"module": RESNET, "weights": str(evil)}), "refused"),
    ]


def test_every_bad_classifier_is_one_clear_error_and_leaves_nothing(files, folder, tmp_path, capsys):
    for source, match in _bad_sources(files, tmp_path):
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as exc:
            main(_explain_args(folder, source, out))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("lit-cf: error:")]
        assert len(lines) == 1 and match in lines[0], (match, err[-2000:])
        assert "Traceback" not in err
        assert not out.exists()
    assert not (tmp_path / "PWNED").exists()  # the malicious pickle was never unpickled


def test_images_the_model_cannot_take(files, tmp_path, capsys):
    gray = write_image_folder(tmp_path / "gray", per_class=2, size=16)
    out = tmp_path / "run"
    args = _explain_args(gray, json.dumps({"module": RESNET, "weights": str(files["pt"])}), out) + ["--data.init_args.channels=1"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot take images of shape (1, 16, 16)" in err and "3 channel(s)" in err
    assert not out.exists()


def _explain_args(folder: Path, classifier: str, out: Path) -> list[str]:
    return [
        "explain",
        f"--config={CONFIGS / 'data/image_folder.yaml'}",
        f"--data.init_args.root={folder}",
        "--data.init_args.image_size=16",
        f"--config={CONFIGS / 'explain/pixel.yaml'}",
        "--model.init_args.steps=2",
        "--split=all",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--classifier={classifier}",
        f"--output_dir={out}",
    ]


def test_direct_errors_without_the_cli(files):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(UserError, match="exactly one of"):
        load_classifier({"module": RESNET, "path": str(files["pt"]), "weights": str(files["pt"])}, x)
    with pytest.raises(UserError, match="unknown classifier keys"):
        load_classifier({"module": RESNET, "weights": str(files["pt"]), "mean": [0.5]}, x)
    with pytest.raises(UserError, match="needs `weights`"):
        load_classifier({"module": RESNET}, x)
    with pytest.raises(UserError, match="class_names has 2 names"):
        load_classifier({"module": RESNET, "weights": str(files["pt"]), "class_names": ["a", "b"]}, x)
    with pytest.raises(UserError, match="binary_logit"):
        load_classifier(nn.Sequential(nn.Flatten(), nn.Linear(768, 1)), x)


def test_help_documents_the_mapping_and_yaml_configs_take_it(files, folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for part in (
        "{module: {class_path: torchvision.models.resnet18, init_args: {num_classes: 3}}",
        "weights:",
        "input_mean:",
        "binary_logit",
        "class_names:",
        "TorchScript",
    ):
        assert part in help_text, part
    config = tmp_path / "classifier.yaml"  # the mapping in a YAML config, as in the issue
    config.write_text(
        "classifier:\n"
        "  module: {class_path: torchvision.models.resnet18, init_args: {num_classes: 3}}\n"
        f"  weights: {files['safetensors']}\n"
        f"  input_mean: {MEAN}\n  input_std: {STD}\n  output: logits\n  class_names: [cat, dog, fox]\n"
    )
    out = tmp_path / "run"
    args = [a for a in _explain_args(folder, "x", out) if not a.startswith("--classifier")]
    main([*args, f"--config={config}", "--num_queries=2"])
    meta = json.loads((out / "run.json").read_text())
    assert meta["classifier"]["class_names"] == ["cat", "dog", "fox"] and meta["classifier"]["input_std"] == STD


def test_torchscript_classifier_cannot_feed_disc_feature_preservation(files, folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = _explain_args(folder, str(files["traced"]), out)
    args[args.index(f"--config={CONFIGS / 'explain/pixel.yaml'}")] = f"--config={CONFIGS / 'explain/disc.yaml'}"
    args += ["--model.init_args.duq=null", "--model.init_args.mc_weight=0", "--model.init_args.fit_steps=2"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "TorchScript does not allow" in err and "weights: <the TorchScript file>" in err
    assert not out.exists()
