"""The method contract: every registered counterfactual method passes these tests automatically.

A method is a concrete ``CounterfactualMethod`` subclass in :mod:`lit_cf.explainers` (see
:mod:`lit_cf.explainers.registry`) with one shipped ``configs/explain/*.yaml``. The tests build
each method from its shipped config with a tiny budget and check the properties every method
must have: its counterfactual does not depend on its chunk-mates; the same seed gives the same
output; a run interrupted after its first chunk and resumed equals an uninterrupted run bit for
bit; no forward hook is left on the classifier; a bad setting is one clear error before any
output; the extra outputs it declares are in the run.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import lit_cf
from lit_cf.cli import main
from lit_cf.explainers.engine import ChunkWriter
from lit_cf.explainers.registry import method_name, method_registry
from lit_cf.models import ImageClassifier
from lit_cf.utils.checkpoint import load_module
from tests.conftest import CONFIGS
from tests.explainers.test_latent import PoolCodec, _codec_predictors, save_lightning_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

REGISTRY = method_registry()

#: the tiny budget every method runs with here (only the arguments its constructor has)
BUDGET = {"steps": 4, "fit_steps": 4, "num_steps": 3, "iterations": 2, "num_stages": 2, "dip_channels": 8, "log_every": 0}
#: settings that must be refused (the first one the constructor has is tried)
BAD = {"steps": 0, "num_steps": 0, "tau": 1.5, "lr": -1.0}


def shipped_configs() -> dict[str, tuple[Path, dict]]:
    """``{method name: (config path, init_args)}`` of configs/explain/*.yaml."""
    found: dict[str, tuple[Path, dict]] = {}
    by_path = {f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}": name for name, cls in REGISTRY.items()}
    by_path.update({f"{cls.__module__}.{cls.__name__}": name for name, cls in REGISTRY.items()})
    for path in sorted((CONFIGS / "explain").glob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model", {})
        name = by_path.get(model.get("class_path", ""))
        if name is not None:
            found[name] = (path, dict(model.get("init_args") or {}))
    return found


CONFIGS_BY_METHOD = shipped_configs()


def test_registry_holds_every_method_and_each_has_one_shipped_config():
    assert {"pixel", "deepinversion", "disc", "latent_attack", "latent_linear_edit", "dvce", "fastdime", "ace"} <= set(REGISTRY)
    assert set(REGISTRY) == set(CONFIGS_BY_METHOD), f"methods without a config: {set(REGISTRY) - set(CONFIGS_BY_METHOD)}"
    assert all(method_name(cls) == name for name, cls in REGISTRY.items())


@pytest.fixture(scope="module")
def resources(tmp_path_factory, cnn_ckpt, ddpm_ckpt) -> dict[str, str]:
    """Files a method may need, by constructor argument name."""
    root = tmp_path_factory.mktemp("contract")
    codec = PoolCodec()
    return {
        "generator": str(save_lightning_checkpoint(codec, root / "codec.ckpt")),
        "direction": str(_codec_predictors(codec).save(root / "predictors.safetensors")),
        "descriptor": "mark",
        "diffusion": str(ddpm_ckpt),
        "feature_network": str(cnn_ckpt),
        "classifier_ckpt": str(cnn_ckpt),
    }


def settings(name: str, resources: dict[str, str], **override) -> dict:
    """The shipped config's init_args with the tiny budget and the needed files filled in."""
    params = inspect.signature(REGISTRY[name].__init__).parameters
    args = dict(CONFIGS_BY_METHOD[name][1])
    args.update({k: v for k, v in BUDGET.items() if k in params})
    for key in ("generator", "direction", "descriptor", "diffusion", "feature_network"):
        if key in params and (args.get(key) is None or params[key].default is inspect.Parameter.empty):
            args[key] = resources[key]
    if "duq" in params:  # the tiny classifier is no DUQ model and no auxiliary one is given
        args["duq"] = None
        args["mc_weight"] = 0.0
    if "allow_other_data" in params:  # the queries here are a tensor batch, not the DDPM's datamodule
        args["allow_other_data"] = True
    args.update(override)
    return {k: v for k, v in args.items() if k in params}


def build(name: str, resources: dict[str, str], **override):
    return REGISTRY[name](**settings(name, resources, **override))


def queries(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 28, 28, generator=g) * 0.6


def batch_of(images: torch.Tensor, targets: list[int], seeds: list[int]) -> dict[str, torch.Tensor]:
    return {"image": images, "target": torch.tensor(targets), "seed": torch.tensor(seeds)}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_independent_of_chunk_mates_and_same_seed_same_output(name, resources):
    method = build(name, resources)
    method.attach(load_module(resources["classifier_ckpt"], ImageClassifier))
    images = queries(5)
    a = method.optimise(batch_of(images[[0, 1, 2]], [3, 4, 5], [10, 11, 12]))
    b = method.optimise(batch_of(images[[4, 0]], [7, 3], [14, 10]))
    again = method.optimise(batch_of(images[[0, 1, 2]], [3, 4, 5], [10, 11, 12]))
    assert torch.equal(a["counterfactual"], again["counterfactual"]), "same seed, same chunk: the output differs"
    torch.testing.assert_close(a["counterfactual"][0], b["counterfactual"][1], atol=1e-5, rtol=1e-5)
    assert a["counterfactual"].shape == (3, 1, 28, 28)
    assert float(a["counterfactual"].min()) >= 0 and float(a["counterfactual"].max()) <= 1
    assert a["final_probs"].shape == (3, 10) and a["steps"].shape == (3,)
    missing = [k for k in method.declared_outputs() if k not in a]
    assert not missing, f"declared outputs missing from the chunk: {missing}"


def output_of(run, key: str) -> torch.Tensor:
    """A declared output of every record: a saved tensor, or a per-record scalar of the manifest."""
    if all(key in row for row in run.manifest):
        return torch.tensor([row[key] for row in run.manifest])
    return run.tensor(key)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_explain_resumes_bit_identically_leaves_no_hooks_and_saves_declared_outputs(name, resources, tmp_path, monkeypatch):
    classifier = load_module(resources["classifier_ckpt"], ImageClassifier)
    images = queries(4)
    common = dict(chunk_size=2, num_grid_images=0, accelerator="cpu")
    ref = lit_cf.explain(classifier, images, build(name, resources), tmp_path / "ref", **common)
    for module in classifier.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{name} left a hook on {type(module).__name__}"
    for key in build(name, resources).declared_outputs():
        assert output_of(ref, key).shape[0] == 4, key

    # interrupted after its first chunk was committed, then resumed
    original = ChunkWriter.write_on_batch_end
    calls = {"n": 0}

    def write_then_crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        raise RuntimeError("simulated crash after the first chunk")

    monkeypatch.setattr(ChunkWriter, "write_on_batch_end", write_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lit_cf.explain(classifier, images, build(name, resources), tmp_path / "resumed", **common)
    monkeypatch.setattr(ChunkWriter, "write_on_batch_end", original)
    assert calls["n"] == 1
    assert len(list((tmp_path / "resumed" / "shards").glob("chunk-*.jsonl"))) == 1  # the first chunk was kept
    resumed = lit_cf.explain(classifier, images, build(name, resources), tmp_path / "resumed", **common)
    assert torch.equal(resumed.tensor("counterfactual"), ref.tensor("counterfactual"))
    for key in build(name, resources).declared_outputs():
        assert torch.equal(output_of(resumed, key), output_of(ref, key)), key


@pytest.mark.parametrize("name", list(REGISTRY))
def test_bad_setting_is_one_clear_error_before_any_output(name, resources, tmp_path, capsys):
    params = inspect.signature(REGISTRY[name].__init__).parameters
    key, value = next((k, v) for k, v in BAD.items() if k in params)
    out = tmp_path / "run"
    args = settings(name, resources)
    with pytest.raises(SystemExit) as err:
        main(
            [
                "explain",
                f"--config={CONFIGS / 'data/rendered.yaml'}",
                "--data.init_args.test_size=16",
                f"--config={CONFIGS_BY_METHOD[name][0]}",
                *[
                    f"--model.init_args.{k}={resources[k]}"
                    for k in ("generator", "direction", "descriptor", "diffusion")
                    if k in args
                ],
                f"--model.init_args.{key}={value}",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--classifier={resources['classifier_ckpt']}",
                f"--output_dir={out}",
                "--num_queries=2",
            ]
        )
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and key in message, message[-500:]
    assert not out.exists()
