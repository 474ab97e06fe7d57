"""Every explain method on an ImageFolderDataModule with a torchvision model, and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lit_cf
from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.explainers import ExplainRun, PixelCounterfactual
from tests.conftest import CONFIGS
from tests.image_folder_fixtures import fit_steps, tiny_resnet, write_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DATA = ["--data.init_args.image_size=16", "--data.init_args.batch_size=8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """An image folder, a ResNet-18 fitted a few steps on it (state dict), and an autoencoder from `lit-cf fit`."""
    root = tmp_path_factory.mktemp("any")
    folder = write_image_folder(root / "imgs", per_class=3, size=16)
    from lit_cf.data import ImageFolderDataModule

    data = ImageFolderDataModule(str(folder), image_size=16).dataset("all")
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    y = torch.stack([data[i]["label"] for i in range(len(data))])
    model = fit_steps(tiny_resnet(), x, y, steps=3)
    save_file(model.state_dict(), root / "resnet.safetensors")
    main(
        [
            "fit",
            f"--config={CONFIGS / 'data/image_folder.yaml'}",
            f"--data.init_args.root={folder}",
            *DATA,
            f"--config={CONFIGS / 'model/autoencoder.yaml'}",
            "--model.init_args.in_channels=3",
            "--model.init_args.image_size=16",
            "--model.init_args.channels=[8,16]",
            "--model.init_args.latent_dim=8",
            f"--config={CONFIGS / 'trainer/smoke.yaml'}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={root / 'ae'}",
            "--sample_grid.num_samples=0",
        ]
    )
    ae = sorted((root / "ae").rglob("*.ckpt"))[-1]
    mapping = json.dumps(
        {
            "module": {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 3}},
            "weights": str(root / "resnet.safetensors"),
            "input_mean": MEAN,
            "input_std": STD,
        }
    )
    return {"root": root, "folder": folder, "model": model, "ae": ae, "mapping": mapping, "x": x, "y": y}


def _direction(setup: dict) -> Path:
    """Linear predictors of 'is a dog' on the autoencoder's codes (the linear edit's direction)."""
    import lightning as L

    from lit_cf.attribution import fit_linear_predictors
    from lit_cf.utils.checkpoint import load_module

    codec = load_module(setup["ae"], L.LightningModule).eval()
    with torch.no_grad():
        z = codec.encode(setup["x"])
    targets = (setup["y"] == 1).float()[:, None]
    path = setup["root"] / "direction.safetensors"
    fit_linear_predictors(z, targets, ["binary"], ["dog"], l2=1e-1).save(path)
    return path


METHODS = {
    "pixel": ["--model.init_args.steps=3"],
    "deepinversion": ["--model.init_args.steps=3"],
    "disc": [
        "--model.init_args.steps=2",
        "--model.init_args.fit_steps=3",
        "--model.init_args.dip_channels=8",
        "--model.init_args.duq=null",
        "--model.init_args.mc_weight=0",
        "--model.init_args.feature_layers=[net.layer1,net.layer2]",
    ],
    "latent_attack": ["--model.init_args.steps=3"],
    "latent_linear_edit": ["--model.init_args.steps=3", "--model.init_args.descriptor=dog"],
    "dvce": ["--model.init_args.num_steps=3", "--model.init_args.num_stages=2"],
    "fastdime": ["--model.init_args.num_steps=3", "--model.init_args.num_stages=2"],
    "ace": [
        "--model.init_args.num_steps=3",
        "--model.init_args.iterations=2",
        "--model.init_args.mask_kernel=3",
        "--model.init_args.num_stages=2",
    ],
}
DIFFUSION = ("dvce", "fastdime", "ace")


@pytest.fixture(scope="module")
def ddpm(setup) -> Path:
    """A tiny DDPM fitted by `lit-cf fit` on the same image folder (16 px RGB)."""
    main(
        [
            "fit",
            f"--config={CONFIGS / 'data/image_folder.yaml'}",
            f"--data.init_args.root={setup['folder']}",
            *DATA,
            f"--config={CONFIGS / 'model/ddpm_tiny.yaml'}",
            "--model.init_args.image_shape=[3,16,16]",
            "--model.init_args.model_size=16",
            "--model.init_args.denoiser.init_args.sample_size=16",
            "--model.init_args.denoiser.init_args.in_channels=3",
            "--model.init_args.denoiser.init_args.out_channels=3",
            f"--config={CONFIGS / 'trainer/smoke.yaml'}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={setup['root'] / 'ddpm'}",
            "--sample_grid.num_samples=0",
        ]
    )
    return sorted((setup["root"] / "ddpm").rglob("*.ckpt"))[-1]


def test_every_registered_method_is_run_on_an_image_folder():
    from lit_cf.explainers.registry import method_registry

    assert set(METHODS) == set(method_registry())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_an_image_folder_with_a_torchvision_model(setup, method, tmp_path, request):
    out = tmp_path / "run"
    extra = list(METHODS[method])
    if method in DIFFUSION:
        extra.append(f"--model.init_args.diffusion={request.getfixturevalue('ddpm')}")
    if method.startswith("latent"):
        extra.append(f"--model.init_args.generator={setup['ae']}")
    if method == "latent_linear_edit":
        extra.append(f"--model.init_args.direction={_direction(setup)}")
    main(
        [
            "explain",
            f"--config={CONFIGS / 'data/image_folder.yaml'}",
            f"--data.init_args.root={setup['folder']}",
            *DATA,
            f"--config={CONFIGS / f'explain/{method}.yaml'}",
            *extra,
            "--split=all",
            "--num_queries=3",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--classifier={setup['mapping']}",
            f"--output_dir={out}",
        ]
    )
    run = ExplainRun(out)
    assert len(run) == 3 and run.meta["classifier"]["kind"] == "module"
    cf = run.tensor("counterfactual")
    assert cf.shape == (3, 3, 16, 16) and float(cf.min()) >= 0 and float(cf.max()) <= 1
    # the manifest's original predictions are the torchvision model's own
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        preds = setup["model"]((run.tensor("query") - mean) / std).argmax(-1).tolist()
    assert [r["orig_pred"] for r in run.manifest] == preds
    if method == "disc":
        assert run.meta["method"]["feature_layers"] == ["net.layer1", "net.layer2"]


def test_python_api_on_a_tensor_a_file_list_and_a_folder(setup, tmp_path):
    model = setup["model"]
    normalised = torch.nn.Sequential(_Normalize(), model)
    model.train()  # the user's mode and flags come back after the run
    run = lit_cf.explain(normalised, setup["x"][:2], PixelCounterfactual(steps=3), tmp_path / "tensor")
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    assert len(run) == 2 and run.meta["split"] == "all" and run.meta["classifier"]["kind"] == "python"
    assert run.meta["classifier_export"]["path"] == "classifier.ts"
    traced = torch.jit.load(str(tmp_path / "tensor" / "classifier.ts"))
    with torch.no_grad():
        torch.testing.assert_close(traced(setup["x"][:2]), normalised(setup["x"][:2]), atol=1e-4, rtol=1e-4)
    # a tensor run is evaluated with the same tensor saved as .safetensors (lit_cf.data.TensorDataModule)
    save_file({"image": setup["x"][:2].contiguous()}, tmp_path / "images.safetensors")
    main(
        [
            "evaluate",
            "--data=lit_cf.data.TensorDataModule",
            f"--data.path={tmp_path / 'images.safetensors'}",
            "--trainer.logger=false",
            f"--runs=[{tmp_path / 'tensor'}]",
            "--cout_steps=2",
            f"--output_dir={tmp_path / 'ev_tensor'}",
        ]
    )
    assert json.loads((tmp_path / "ev_tensor" / "metrics.json").read_text())["table"][0]["n"] == 2
    files = sorted(str(p) for p in (setup["folder"] / "dog").iterdir())
    run = lit_cf.explain(
        normalised,
        files,
        PixelCounterfactual(steps=3),
        tmp_path / "files",
        target=0,
        on_source_equals_target="skip",
        num_queries=2,
        seed=3,
    )
    assert all(r["target"] == 0 for r in run.manifest) and run.meta["seed"] == 3
    # same call again: the finished run is left alone (resume), and evaluate reads the folder run
    run = lit_cf.explain(normalised, setup["folder"], PixelCounterfactual(steps=3), tmp_path / "folder", num_queries=3)
    again = lit_cf.explain(normalised, setup["folder"], PixelCounterfactual(steps=3), tmp_path / "folder", num_queries=3)
    torch.testing.assert_close(run.tensor("counterfactual"), again.tensor("counterfactual"))
    main(
        [
            "evaluate",
            f"--config={CONFIGS / 'data/image_folder.yaml'}",
            f"--data.init_args.root={setup['folder']}",
            *DATA,
            "--trainer.logger=false",
            f"--runs=[{tmp_path / 'folder'}]",
            "--cout_steps=2",
            f"--output_dir={tmp_path / 'ev'}",
            f"--oracles={{resnet: {setup['mapping']}}}",
        ]
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["table"][0]["n"] == 3
    # the oracle holds the same weights as the explained model: masked, not scored as independent
    assert "ota_resnet" not in metrics["table"][0]


class _Normalize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_evaluate_needs_the_mapping_again_and_checks_it(setup, tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        f"--config={CONFIGS / 'data/image_folder.yaml'}",
        f"--data.init_args.root={setup['folder']}",
        *DATA,
        "--trainer.logger=false",
    ]
    main(
        [
            "explain",
            *base,
            f"--config={CONFIGS / 'explain/pixel.yaml'}",
            "--model.init_args.steps=2",
            "--split=all",
            "--num_queries=2",
            f"--classifier={setup['mapping']}",
            f"--output_dir={out}",
        ]
    )
    ev = tmp_path / "ev"
    with pytest.raises(SystemExit):
        main(["evaluate", *base, f"--runs=[{out}]", f"--output_dir={ev}"])
    assert "pass the same mapping as --classifier" in capsys.readouterr().err and not ev.exists()
    other = setup["root"] / "other.safetensors"
    save_file(tiny_resnet(seed=1).state_dict(), other)
    wrong = setup["mapping"].replace(str(setup["root"] / "resnet.safetensors"), str(other))
    with pytest.raises(SystemExit):
        main(["evaluate", *base, f"--runs=[{out}]", f"--output_dir={ev}", f"--classifier={wrong}"])
    assert "different classifier" in capsys.readouterr().err and not ev.exists()
    main(["evaluate", *base, f"--runs=[{out}]", f"--output_dir={ev}", f"--classifier={setup['mapping']}", "--cout_steps=2"])
    assert (ev / "metrics.json").exists()


def test_python_api_method_names():
    from lit_cf.api import _method
    from lit_cf.explainers import DeepInversionCounterfactual, DISCCounterfactual

    assert isinstance(_method("pixel"), PixelCounterfactual) and isinstance(_method("deepinversion"), DeepInversionCounterfactual)
    assert isinstance(_method("disc"), DISCCounterfactual)


def test_python_api_bad_input(tmp_path):
    with pytest.raises(UserError, match="pixels in \\[0, 1\\]"):
        lit_cf.explain(torch.nn.Identity(), torch.full((2, 3, 8, 8), 2.0), "pixel", tmp_path / "a")
    with pytest.raises(UserError, match="latent_attack needs generator"):
        lit_cf.explain(torch.nn.Identity(), torch.rand(2, 3, 8, 8), "latent_attack", tmp_path / "a")
    with pytest.raises(UserError, match="not a folder"):
        lit_cf.explain(torch.nn.Identity(), str(tmp_path / "nope"), "pixel", tmp_path / "a")
    with pytest.raises(UserError, match=r"must return \[N, C\]"):
        lit_cf.explain(lambda x: x, torch.rand(2, 3, 8, 8), "pixel", tmp_path / "a")
    assert not (tmp_path / "a").exists()
