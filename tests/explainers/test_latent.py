"""Latent counterfactuals: LatentAttack (Counterfactual Attacks) and the linear latent edit.

Two generators: a tiny autoencoder trained through the real CLI (what users run; a few steps
leave it far from converged, so it is only used where the result's quality does not matter),
and :class:`PoolCodec`, a parameter-free codec standing in for any module with
``encode``/``decode`` (e.g. a GAN-inversion wrapper) whose decoder responds to its code, so the
attack reliably reaches its threshold within a few steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_cf.attribution import LinearPredictors, attribute_run, descriptor_targets, encode_dataset, fit_linear_predictors
from lit_cf.cli import main
from lit_cf.data.rendered import RenderedDigits
from lit_cf.errors import UserError
from lit_cf.explainers import ExplainRun, LatentAttack, LatentLinearEdit
from lit_cf.models import AutoEncoder, Classifier, ConvNet, ImageClassifier
from lit_cf.utils.checkpoint import load_module
from tests.conftest import CONFIGS, fit_checkpoint

DATA = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=64",
    "--data.init_args.test_size=128",
]


class PoolCodec(L.LightningModule):
    """Codes are logits of ``factor x factor`` average-pooled images; decoding repeats each code
    pixel and applies a sigmoid (no clamping, so no code pixel ever loses its gradient)."""

    def __init__(self, factor: int = 2, eps: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.factor, self.eps = factor, eps

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(F.avg_pool2d(x, self.factor).clamp(self.eps, 1 - self.eps)).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(z.shape[1])
        return F.interpolate(z.view(-1, 1, side, side), scale_factor=self.factor, mode="nearest").sigmoid()


def save_lightning_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """What ``lit-cf fit`` writes, as far as :func:`load_module` needs it."""
    hparams = {**dict(module.hparams), "_class_path": f"{type(module).__module__}.{type(module).__qualname__}"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}, path)
    return path


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    # one epoch (8 steps): the tests below check mechanics, not reconstruction quality
    return fit_checkpoint(
        tmp_path_factory.mktemp("ae"), "model/autoencoder.yaml", "--model.init_args.latent_dim=8", "--trainer.max_epochs=1"
    )


@pytest.fixture(scope="module")
def codec_ckpt(tmp_path_factory) -> Path:
    return save_lightning_checkpoint(PoolCodec(), tmp_path_factory.mktemp("codec") / "codec.ckpt")


def explain_args(classifier: Path, out: Path, config: str, *extra: str) -> list[str]:
    return [
        "explain",
        *DATA,
        f"--config={CONFIGS / config}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out.parent}",
        f"--classifier={classifier}",
        f"--output_dir={out}",
        *extra,
    ]


def make_batch(images: torch.Tensor, targets: list[int]) -> dict[str, torch.Tensor]:
    n = len(targets)
    return {"image": images, "target": torch.tensor(targets), "seed": torch.arange(n), "index": torch.arange(n)}


def queries(n: int) -> torch.Tensor:
    return RenderedDigits(n, split="test").images


# ----------------------------------------------------------------------------- end to end
def test_latent_attack_cli_writes_latents_and_reconstruction_fields(ae_ckpt, cnn_ckpt, tmp_path):
    out = tmp_path / "attack"
    steps = 15
    main(
        explain_args(
            cnn_ckpt,
            out,
            "explain/latent_attack.yaml",
            f"--model.init_args.generator={ae_ckpt}",
            f"--model.init_args.steps={steps}",
            "--num_queries=8",
            "--chunk_size=4",
        )
    )
    run = ExplainRun(out)
    assert len(run) == 8
    fields = {"steps", "success", "final_target_prob", "recon_mse", "recon_target_prob", "recon_pred", "latent_l2"}
    assert fields <= set(run.manifest[0])
    method = run.meta["method"]
    assert method["original_prediction"] == "query" and len(method["generator_sha256"]) == 64
    ae = load_module(ae_ckpt, AutoEncoder).eval()
    clf = load_module(cnn_ckpt, ImageClassifier).eval()
    latent, latent_init = run.tensor("latent"), run.tensor("latent_init")
    query, cf = run.tensor("query"), run.tensor("counterfactual")
    assert latent.shape == latent_init.shape == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(cf, ae.decode(latent).clamp(0, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(latent_init, ae.encode(query), atol=1e-5, rtol=1e-5)
        recon = ae.decode(latent_init)
        probs = clf(recon).softmax(-1)
    targets = torch.tensor([r["target"] for r in run.manifest])
    recon_mse = torch.tensor([r["recon_mse"] for r in run.manifest])
    torch.testing.assert_close(recon_mse, (recon - query).square().flatten(1).mean(1), atol=1e-6, rtol=1e-4)
    recon_tp = torch.tensor([r["recon_target_prob"] for r in run.manifest])
    torch.testing.assert_close(recon_tp, probs.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert [r["recon_pred"] for r in run.manifest] == probs.argmax(-1).tolist()
    l2 = torch.tensor([r["latent_l2"] for r in run.manifest])
    torch.testing.assert_close(l2, (latent - latent_init).norm(dim=1), atol=1e-5, rtol=1e-5)
    for r in run.manifest:
        assert 0 <= r["steps"] <= steps
        if r["steps"] < steps:  # stopped: the threshold was reached
            assert r["final_target_prob"] >= 0.75
        else:  # ran out of steps: the latent moved
            assert r["latent_l2"] > 0


def _codec_predictors(codec: L.LightningModule) -> LinearPredictors:
    data = RenderedDigits(256, split="train", mark_rate=0.5)
    targets = descriptor_targets(data)
    return fit_linear_predictors(encode_dataset(codec, data), targets.values, targets.kinds, targets.names, l2=1e-2)


def test_attack_stops_at_threshold_and_latents_are_attributable(codec_ckpt, cnn_ckpt, tmp_path):
    out = tmp_path / "attack"
    steps = 80  # the config's lr (0.1, the paper's MNIST setting)
    main(
        explain_args(
            cnn_ckpt,
            out,
            "explain/latent_attack.yaml",
            f"--model.init_args.generator={codec_ckpt}",
            f"--model.init_args.steps={steps}",
            "--num_queries=10",
            "--chunk_size=5",
        )
    )
    run = ExplainRun(out)
    stopped = [r for r in run.manifest if r["steps"] < steps]
    assert len(stopped) >= 8, [r["steps"] for r in run.manifest]
    for r in stopped:
        assert r["final_target_prob"] >= 0.75 and r["success"]
        # it stopped at the first step that reached the threshold: step 0 only if x0 already did
        assert (r["steps"] == 0) == (r["recon_target_prob"] >= 0.75)
    codec = load_module(codec_ckpt, L.LightningModule)
    torch.testing.assert_close(run.tensor("counterfactual"), codec.decode(run.tensor("latent")).clamp(0, 1))

    # attributions from the saved latents: nothing is re-encoded
    predictors = _codec_predictors(codec)
    res = attribute_run(run, predictors, k=3, n_boot=50)
    assert res["inputs"] == "latent"
    keep = [i for i, r in enumerate(run.manifest) if r["success"]]
    assert res["records"] == [run.manifest[i]["record"] for i in keep]
    torch.testing.assert_close(res["desc_query"], predictors.predict(run.tensor("latent_init")[keep]))
    torch.testing.assert_close(res["desc_cf"], predictors.predict(run.tensor("latent")[keep]))
    assert len(res["local"]) == len(keep) and all(len(row) == 3 for row in res["local"])
    assert {name for name, *_ in res["global"]} == set(predictors.names)
    assert set(res["per_class"]) == {run.manifest[i]["target"] for i in keep}


def test_linear_edit_walks_a_fixed_schedule_along_the_direction(codec_ckpt, cnn_ckpt, tmp_path):
    codec = load_module(codec_ckpt, L.LightningModule)
    direction = _codec_predictors(codec).save(tmp_path / "predictors.safetensors")
    out = tmp_path / "edit"
    steps, step_size = 12, 0.25
    main(
        explain_args(
            cnn_ckpt,
            out,
            "explain/latent_linear_edit.yaml",
            f"--model.init_args.generator={codec_ckpt}",
            f"--model.init_args.direction={direction}",
            "--model.init_args.descriptor=mark",
            f"--model.init_args.steps={steps}",
            f"--model.init_args.step_size={step_size}",
            "--num_queries=6",
        )
    )
    run = ExplainRun(out)
    unit = LinearPredictors.load(direction).direction("mark")
    unit = unit / unit.norm()
    latent, latent_init = run.tensor("latent"), run.tensor("latent_init")
    for i, r in enumerate(run.manifest):
        assert r["alpha"] == pytest.approx(r["steps"] * step_size, rel=1e-4, abs=1e-6)  # Adam: exactly lr per step, up to float32
        torch.testing.assert_close(latent[i] - latent_init[i], r["alpha"] * unit, atol=1e-5, rtol=1e-5)
        if r["steps"] < steps:
            assert r["final_target_prob"] >= 0.75
    torch.testing.assert_close(run.tensor("counterfactual"), codec.decode(latent).clamp(0, 1))
    assert len(run.meta["method"]["direction_sha256"]) == 64


def _expect_error(args: list[str], capsys, match: str, out: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists(), "a failed explain must leave no output behind"


def test_generator_without_encode_decode_is_a_clear_error(cnn_ckpt, tmp_path, capsys):
    out = tmp_path / "bad"
    config = "explain/latent_attack.yaml"
    _expect_error(explain_args(cnn_ckpt, out, config, f"--model.init_args.generator={cnn_ckpt}"), capsys, "no encode/decode", out)
    missing = tmp_path / "missing.ckpt"
    _expect_error(
        explain_args(cnn_ckpt, out, config, f"--model.init_args.generator={missing}"), capsys, "checkpoint not found", out
    )


def test_linear_edit_bad_direction_is_a_clear_error(codec_ckpt, cnn_ckpt, tmp_path, capsys):
    codec = load_module(codec_ckpt, L.LightningModule)
    direction = _codec_predictors(codec).save(tmp_path / "predictors.safetensors")
    out = tmp_path / "bad"
    args = explain_args(
        cnn_ckpt,
        out,
        "explain/latent_linear_edit.yaml",
        f"--model.init_args.generator={codec_ckpt}",
        f"--model.init_args.direction={direction}",
        "--model.init_args.descriptor=smile",
    )
    _expect_error(args, capsys, "no descriptor 'smile'", out)


# ----------------------------------------------------------------------------- engine properties
def test_same_image_in_two_chunks_gives_the_same_counterfactual(ae_ckpt, codec_ckpt, cnn_ckpt):
    images = queries(6)
    for generator in (codec_ckpt, ae_ckpt):
        method = LatentAttack(str(generator), steps=12, lr=0.05, threshold=0.999, log_every=0)
        method.attach(load_module(cnn_ckpt, ImageClassifier))
        a = method.optimise(make_batch(images[[0, 1, 2]], [3, 4, 5]))
        b = method.optimise(make_batch(images[[4, 0, 5]], [8, 3, 1]))
        torch.testing.assert_close(a["counterfactual"][0], b["counterfactual"][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["latent"][0], b["latent"][1], atol=1e-5, rtol=1e-5)
        assert int(a["steps"][0]) == int(b["steps"][1])
        assert not torch.allclose(a["latent"][0], a["latent_init"][0])  # it did move


def test_distance_switches_add_their_terms(codec_ckpt, cnn_ckpt):
    images = queries(4)
    batch = make_batch(images, [1, 2, 3, 4])
    clf = load_module(cnn_ckpt, ImageClassifier)
    results = {}
    for weight in (0.0, 5.0):
        method = LatentAttack(str(codec_ckpt), steps=15, lr=0.05, threshold=0.999, latent_weight=weight, log_every=0)
        method.attach(clf)
        latents = method.init_latents(batch)
        x = method.render(latents, batch)
        terms = method.loss_terms(x, method.classifier(x), latents, batch, 0)
        assert set(terms) == ({"attack", "latent"} if weight else {"attack"})
        assert terms["attack"].shape == (4,)
        if weight:  # zero at the start, positive once the latent moved
            assert torch.all(terms["latent"] == 0)
            moved = {"z": latents["z"] + 0.1}
            terms = method.loss_terms(x, method.classifier(x), moved, batch, 1)
            torch.testing.assert_close(terms["latent"], weight * torch.full((4,), 0.01 * latents["z"].shape[1]))
        results[weight] = method.optimise(batch)
    # the penalty keeps the counterfactual closer to the start code
    assert results[5.0]["latent_l2"].mean() < results[0.0]["latent_l2"].mean()


def test_pixel_term_reference_follows_original_prediction(codec_ckpt, cnn_ckpt):
    batch = make_batch(queries(3), [1, 2, 3])
    clf = load_module(cnn_ckpt, ImageClassifier)
    pixel = {}
    for mode in ("query", "reconstruction"):
        method = LatentAttack(str(codec_ckpt), pixel_weight=1.0, original_prediction=mode, log_every=0)
        method.attach(clf)
        latents = method.init_latents(batch)
        x = method.render(latents, batch)  # step 0: the reconstruction
        pixel[mode] = method.loss_terms(x, method.classifier(x), latents, batch, 0)["pixel"]
    assert torch.all(pixel["query"] > 0)  # the reconstruction is not the query
    assert torch.all(pixel["reconstruction"] == 0)


def test_pixel_norm_switches_between_squared_and_absolute_differences(codec_ckpt, cnn_ckpt):
    batch = make_batch(queries(3), [1, 2, 3])
    clf = load_module(cnn_ckpt, ImageClassifier)
    terms = {}
    for norm in ("l2", "l1"):
        method = LatentAttack(str(codec_ckpt), pixel_weight=2.0, pixel_norm=norm, log_every=0)
        method.attach(clf)
        latents = method.init_latents(batch)
        x = method.render(latents, batch)
        terms[norm] = method.loss_terms(x, method.classifier(x), latents, batch, 0)["pixel"]
        diff = x - batch["image"]  # original_prediction="query": the query is the reference
        expected = diff.abs() if norm == "l1" else diff.square()
        torch.testing.assert_close(terms[norm], 2.0 * expected.flatten(1).sum(1))
    assert not torch.allclose(terms["l1"], terms["l2"])
    with pytest.raises(ValueError, match="pixel_norm must be one of"):
        LatentAttack(str(codec_ckpt), pixel_norm="linf")


def test_decreasing_needs_a_binary_classifier_and_stops_on_the_source_probability(codec_ckpt, cnn_ckpt):
    method = LatentAttack(str(codec_ckpt), decreasing=True, threshold=0.75)
    # p_target 0.8 -> p_source 0.2 <= 0.25: reached; p_target 0.7 -> p_source 0.3: not yet
    assert method.target_reached(torch.tensor([0.8, 0.7])).tolist() == [True, False]
    with pytest.raises(UserError, match="binary classifier"):
        method.attach(load_module(cnn_ckpt, ImageClassifier))
    torch.manual_seed(0)
    binary = Classifier(ConvNet(1, (8, 16), 32), num_classes=2).eval()
    method.attach(binary)
    batch = make_batch(queries(3), [1, 0, 1])
    latents = method.init_latents(batch)
    x = method.render(latents, batch)
    logits = method.classifier(x)
    attack = method.loss_terms(x, logits, latents, batch, 0)["attack"]
    source = 1 - batch["target"]
    torch.testing.assert_close(attack, logits.softmax(-1).gather(1, source[:, None]).squeeze(1))  # minimise +p_source


def test_log_prob_loss_moves_codes_where_the_paper_loss_has_no_gradient(codec_ckpt, cnn_ckpt):
    """A classifier certain the image is not the target (p_target ~ 1e-20): -p has a vanishing
    gradient and Adam leaves the code where it is; -log p keeps moving it towards the target."""
    clf = load_module(cnn_ckpt, ImageClassifier)
    head = [m for m in clf.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # saturate the softmax
        head.weight.mul_(200.0)
        head.bias.mul_(200.0)
    images = queries(6)
    with torch.no_grad():
        logits = clf(images)
    targets = logits.argmin(-1).tolist()  # the least likely class of each image
    batch = make_batch(images, targets)
    out = {}
    for loss in ("prob", "log_prob"):
        method = LatentAttack(str(codec_ckpt), steps=20, lr=0.05, threshold=0.999, loss=loss, log_every=0)
        method.attach(clf)
        latents = method.init_latents(batch)
        x = method.render(latents, batch)
        start_logits = method.classifier(x)
        attack = method.loss_terms(x, start_logits, latents, batch, 0)["attack"]
        p0 = start_logits.softmax(-1).gather(1, batch["target"][:, None]).squeeze(1)
        assert float(p0.max()) < 1e-10, "the test needs saturated starts"
        if loss == "log_prob":
            torch.testing.assert_close(attack, -start_logits.log_softmax(-1).gather(1, batch["target"][:, None]).squeeze(1))
        else:
            torch.testing.assert_close(attack, -p0)
        out[loss] = method.optimise(batch)
    assert float(out["prob"]["latent_l2"].max()) < 1e-3
    assert float(out["log_prob"]["latent_l2"].min()) > 0.1
    # the log loss raised the target's log-probability of every image
    with torch.no_grad():
        before = clf(method.decode(out["log_prob"]["latent_init"])).log_softmax(-1)
        after = clf(method.decode(out["log_prob"]["latent"])).log_softmax(-1)
    idx = batch["target"][:, None]
    assert torch.all(after.gather(1, idx) > before.gather(1, idx) + 1.0)


def test_bad_settings_are_rejected(codec_ckpt):
    with pytest.raises(ValueError, match="threshold"):
        LatentAttack(str(codec_ckpt), threshold=1.0)
    with pytest.raises(ValueError, match="original_prediction"):
        LatentAttack(str(codec_ckpt), original_prediction="both")
    with pytest.raises(ValueError, match="loss must be one of"):
        LatentAttack(str(codec_ckpt), loss="ce")
    with pytest.raises(ValueError, match="sign"):
        LatentLinearEdit(str(codec_ckpt), direction="x.safetensors", descriptor="mark", sign=0.5)
