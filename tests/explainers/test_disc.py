"""DISC: priors, loss switches, manifold consistency, progressive stages, data-free explain."""

from __future__ import annotations

import json

import pytest
import torch

from lit_cf.cli import main
from lit_cf.data.rendered import RenderedDigits
from lit_cf.errors import UserError
from lit_cf.explainers import DISCCounterfactual, ExplainRun
from lit_cf.explainers.priors import DIPPrior, INRPrior, fixed_entries, grouped_conv, psnr
from lit_cf.models import Classifier, ConvNet, DUQClassifier
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("single_thread")


def digits(n: int, size: int = 28) -> torch.Tensor:
    ds = RenderedDigits(n, split="test", seed=1)
    x = torch.stack([ds[i]["image"] for i in range(n)])
    return x if size == 28 else torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)


def batch_of(x: torch.Tensor, target: int | list[int] = 3) -> dict[str, torch.Tensor]:
    n = len(x)
    t = torch.tensor(target).expand(n).clone() if isinstance(target, int) else torch.tensor(target)
    return {"image": x, "target": t, "seed": torch.arange(n) * 17 + 5}


def tiny_cnn(seed: int = 0, size: int = 28) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ConvNet(channels=(4, 8), hidden=16, image_size=size), num_classes=10).eval()


def tiny_duq(seed: int = 0) -> DUQClassifier:
    torch.manual_seed(seed)
    duq = DUQClassifier(ConvNet(channels=(4, 8), hidden=16), num_classes=10, embedding_size=8, length_scale=0.5).eval()
    with torch.no_grad():  # distinct class centroids, as after training (fresh ones all sit at the origin)
        duq.m.copy_(torch.randn_like(duq.m) * 0.5 * duq.N)
    return duq


# ----------------------------------------------------------------------------- priors
@pytest.mark.parametrize("impl", ["grouped", "unfold"])
def test_grouped_conv_matches_per_image_conv(impl):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 9, 9, generator=g), torch.randn(3, 4, 5, 3, 3, generator=g), torch.randn(3, 4, generator=g)
    for stride in (1, 2):
        ref = torch.cat([torch.nn.functional.conv2d(x[i : i + 1], w[i], b[i], stride=stride, padding=1) for i in range(3)])
        assert torch.allclose(grouped_conv(x, w, b, stride, impl), ref, atol=1e-5)
    with pytest.raises(ValueError, match="conv impl"):
        grouped_conv(x, w, b, 1, "fft")


def test_dip_renders_the_same_image_with_either_convolution():
    x = digits(3, size=16)
    params = DIPPrior(channels=8).init(x, torch.arange(3))
    a, b = DIPPrior(channels=8, conv="grouped").render(params), DIPPrior(channels=8, conv="unfold").render(params)
    assert a.shape == x.shape and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("prior", ["dip", "inr"])
def test_network_priors_reproduce_the_query(prior):
    x = digits(4, size=16)
    method = DISCCounterfactual(prior=prior, fit_steps=400, fit_psnr=28.0, feature_weight=0.0, dip_channels=16, inr_hidden=32)
    method.attach(tiny_cnn(size=16))
    method.init_latents(batch_of(x))
    fitted = method._chunk["psnr"]
    assert fitted.shape == (4,) and (fitted >= 28.0).all(), fitted
    # the fit stops per image once the threshold is met
    assert (method._chunk["fit_steps"] < 400).all()
    # and an unfitted prior is far from the query
    unfit = DISCCounterfactual(prior=prior, fit_steps=0, feature_weight=0.0, dip_channels=16, inr_hidden=32)
    unfit.attach(tiny_cnn(size=16))
    unfit.init_latents(batch_of(x))
    assert (unfit._chunk["psnr"] < 20).all()


def test_pixel_prior_is_the_query_exactly():
    x = digits(3)
    method = DISCCounterfactual(prior="pixels", feature_weight=0.0)
    method.attach(tiny_cnn())
    latents = method.init_latents(batch_of(x))
    assert torch.equal(method.render(latents, batch_of(x)), x)
    assert (method._chunk["psnr"] == 100.0).all()


@pytest.mark.parametrize("prior", [DIPPrior(channels=8), INRPrior(hidden=16), INRPrior(hidden=16, activation="relu")])
def test_priors_are_per_image_independent_of_chunk_mates(prior):
    x = digits(4, size=12)
    seeds = torch.tensor([11, 12, 13, 14])
    together = prior.render(prior.init(x, seeds))
    alone = prior.render(prior.init(x[2:3], seeds[2:3]))
    assert together.shape == x.shape
    assert torch.allclose(together[2:3], alone, atol=1e-5)
    assert ((together > 0) & (together < 1)).all()
    # other seeds give other networks
    assert not torch.allclose(prior.render(prior.init(x[2:3], seeds[:1])), alone)


def test_fixed_entries_are_never_optimised():
    x = digits(2, size=12)
    method = DISCCounterfactual(prior="dip", fit_steps=3, feature_weight=0.0, dip_channels=8)
    method.attach(tiny_cnn(size=12))
    latents = method.init_latents(batch_of(x))
    assert "noise" not in latents and "noise" in method._chunk["fixed"]
    assert fixed_entries(INRPrior().init(x, torch.arange(2))) == {"_shape"}


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[1] += 0.1
    assert psnr(x, y).tolist() == pytest.approx([100.0, 20.0], abs=1e-3)


# ----------------------------------------------------------------------------- loss switches
def loss_keys(**kwargs) -> set[str]:
    x = digits(2)
    method = DISCCounterfactual(prior="pixels", **kwargs)
    classifier = tiny_duq() if kwargs.get("duq") == "self" else tiny_cnn()
    method.attach(classifier)
    batch = batch_of(x)
    latents = method.init_latents(batch)
    x_cf = method.render(latents, batch)
    terms = method.loss_terms(x_cf, method.classifier(x_cf), latents, batch, 0)
    assert all(v.shape == (2,) for v in terms.values())
    return set(terms)


def test_switches_really_switch():
    assert loss_keys() == {"cf", "feature"}
    assert loss_keys(feature_weight=0.0) == {"cf"}
    assert loss_keys(feature_weight=0.0, tv_weight=0.1, l2_weight=0.1) == {"cf", "tv", "l2"}
    assert loss_keys(duq="self", mc_weight=1.0) == {"cf", "feature", "mc"}
    assert loss_keys(duq="self", mc_weight=0.0) == {"cf", "feature"}
    assert loss_keys(cf_weight=0.0, feature_weight=0.0, duq="self", mc_weight=1.0, mc_loss="bce") == {"mc"}


def test_feature_term_is_zero_at_the_query_and_grows_with_the_edit():
    x = digits(2)
    for distance in ("mse", "relative_mse", "cosine"):
        method = DISCCounterfactual(prior="pixels", feature_distance=distance, feature_layers=["backbone.features.0"])
        method.attach(tiny_cnn())
        batch = batch_of(x)
        latents = method.init_latents(batch)
        at_query = method.loss_terms(x, method.classifier(x), latents, batch, 0)["feature"]
        moved = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
        away = method.loss_terms(moved, method.classifier(moved), latents, batch, 0)["feature"]
        assert at_query.abs().max() < 1e-5 and (away > 1e-4).all(), (distance, at_query, away)


def test_relative_mse_is_invariant_to_the_scale_of_the_activations():
    """relative_mse = ||F(x') - F(x)||^2 / ||F(x)||^2: scaling the layer's output by 10 scales
    mse by 100 and leaves relative_mse unchanged."""
    x = digits(3)
    moved = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    values = {}
    for scale in (1.0, 10.0):
        clf = tiny_cnn()
        first = clf.backbone.features[0]
        with torch.no_grad():
            first.weight.mul_(scale)
            first.bias.mul_(scale)
        for distance in ("mse", "relative_mse"):
            method = DISCCounterfactual(prior="pixels", feature_distance=distance, feature_layers=["backbone.features.0"])
            method.attach(clf)
            batch = batch_of(x)
            latents = method.init_latents(batch)
            values[distance, scale] = method.loss_terms(moved, method.classifier(moved), latents, batch, 0)["feature"]
            feats = [first(moved).flatten(1), first(x).flatten(1)]
            if distance == "relative_mse":
                expect = (feats[0] - feats[1]).square().sum(1) / feats[1].square().sum(1)
                torch.testing.assert_close(values[distance, scale], expect.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(values["mse", 10.0], 100 * values["mse", 1.0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(values["relative_mse", 10.0], values["relative_mse", 1.0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mc_loss", ["log_kernel", "bce"])
def test_manifold_consistency_raises_the_target_kernel_value(mc_loss):
    duq = tiny_duq()
    x = digits(4)
    batch = batch_of(x, target=[0, 1, 2, 3])

    def kernel_values(images):
        k = duq.kernel(images)
        kt = k.gather(1, batch["target"][:, None]).squeeze(1)
        return kt, (k.sum(1) - kt) / (k.shape[1] - 1)  # the target's and the mean of the others

    with torch.no_grad():
        before, others_before = kernel_values(x)
        loss_before = DISCCounterfactual(duq="self", mc_weight=1.0, mc_loss=mc_loss).manifold_loss(x, duq(x), batch["target"])
    # only the manifold term, no stopping: the kernel value of the target must rise
    method = DISCCounterfactual(
        prior="pixels",
        cf_weight=0.0,
        feature_weight=0.0,
        duq="self",
        mc_weight=1.0,
        mc_loss=mc_loss,
        progressive=False,
        stages=[0.999],
        steps=10,
        lr=0.02,
    )
    method.attach(duq)
    out = method.optimise(batch)
    with torch.no_grad():
        after, others_after = kernel_values(out["counterfactual"])
        loss_after = method.manifold_loss(out["counterfactual"], duq(out["counterfactual"]), batch["target"])
    assert (loss_after < loss_before).all(), (loss_before, loss_after)
    # -log K_target raises the target's kernel value; the BCE, dominated by the nine other
    # classes here (all kernel values start high on an untrained model), pushes theirs down
    if mc_loss == "log_kernel":
        assert (after > before).all(), (before, after)
    else:
        assert (others_after < others_before).all(), (others_before, others_after)
    # the loss is -log K_target (log_kernel) / the DUQ BCE (bce), computed from the log-kernel
    loss = method.manifold_loss(x, duq(x), batch["target"])
    k = duq.kernel(x).detach()
    onehot = torch.nn.functional.one_hot(batch["target"], 10).float()
    if mc_loss == "log_kernel":
        expected = -k.gather(1, batch["target"][:, None]).squeeze(1).log()
    else:
        expected = torch.nn.functional.binary_cross_entropy(k, onehot, reduction="none").sum(1)
    assert torch.allclose(loss.detach(), expected, rtol=1e-4, atol=1e-4)


def test_auxiliary_duq_model_is_loaded_and_used(cnn_ckpt, duq_ckpt):
    from lit_cf.utils.checkpoint import load_module

    method = DISCCounterfactual(prior="pixels", duq=str(duq_ckpt), mc_weight=1.0, feature_weight=0.0)
    assert "duq_sha256" in method.describe()
    method.attach(load_module(cnn_ckpt, Classifier))
    assert isinstance(method.duq_model, DUQClassifier) and not method.duq_model.training
    x = digits(2)
    batch = batch_of(x)
    expected = -method.duq_model(x).gather(1, batch["target"][:, None]).squeeze(1)
    assert torch.allclose(method.manifold_loss(x, method.classifier(x), batch["target"]), expected)


def test_bad_settings_are_refused(cnn_ckpt):
    from lit_cf.utils.checkpoint import load_module

    with pytest.raises(ValueError, match="needs a DUQ model"):
        DISCCounterfactual(mc_weight=1.0, duq=None)
    with pytest.raises(ValueError, match="strictly increasing"):
        DISCCounterfactual(stages=[0.5, 0.4])
    with pytest.raises(ValueError, match="prior must be"):
        DISCCounterfactual(prior="gan")
    method = DISCCounterfactual(duq="self", mc_weight=1.0)
    with pytest.raises(UserError, match="duq: self needs the explained classifier to be a DUQClassifier"):
        method.attach(tiny_cnn())
    with pytest.raises(UserError, match="not a DUQClassifier"):
        DISCCounterfactual(duq=str(cnn_ckpt), mc_weight=1.0).describe()
    with pytest.raises(UserError, match="feature_layers"):
        DISCCounterfactual(feature_layers=["nope"]).attach(load_module(cnn_ckpt, Classifier))


# ----------------------------------------------------------------------------- end to end
EXPLAIN = [
    "explain",
    "--data=tests.explainers.broken_data.TrainSplitForbidden",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=16",
    "--data.init_args.test_size=32",
    f"--config={CONFIGS / 'explain/disc.yaml'}",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.duq=null",
    "--model.init_args.mc_weight=0",
    "--model.init_args.steps=40",
    "--model.init_args.lr=0.05",
    "--model.init_args.fit_steps=100",
    "--model.init_args.dip_channels=8",
    "--num_queries=8",
    "--chunk_size=8",
]


OLD_RULE = ["--model.init_args.stage_rule=threshold", "--model.init_args.stages=[0.2,0.4,0.6,0.8]"]


def test_progressive_explain_is_data_free_monotone_and_reproducible(cnn_ckpt, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        # the datamodule raises if explain reads its training split
        main(
            [*EXPLAIN, *OLD_RULE, f"--classifier={cnn_ckpt}", f"--output_dir={out}", "--model.init_args.prior=pixels", "--seed=4"]
        )
        runs.append(ExplainRun(out))
    run = runs[0]
    stages = run.tensor("stages")
    probs = run.tensor("stage_target_prob")
    assert stages.shape == (8, 4, 1, 28, 28) and probs.shape == (8, 4)
    assert torch.equal(stages[:, -1], run.tensor("counterfactual"))
    # every strip is non-decreasing in target probability, and a reached stage meets its value
    assert (probs[:, 1:] >= probs[:, :-1] - 1e-6).all(), probs
    thresholds = torch.tensor([0.2, 0.4, 0.6, 0.8])
    reached = probs >= thresholds
    assert reached[:, 0].float().mean() >= 0.5, probs
    for r, row in enumerate(run.manifest):
        assert row["success"] == (row["final_pred"] == row["target"])
        assert row["prior_psnr"] == 100.0
        assert row["steps"] == int(run.tensor("stage_steps")[r].sum())
    # the same seed gives the same counterfactuals on CPU
    assert torch.equal(run.tensor("counterfactual"), runs[1].tensor("counterfactual"))
    assert (run.dir.root / "grids" / "progression-000.png").stat().st_size > 0  # the progression strip
    meta = json.loads((run.dir.root / "run.json").read_text())
    assert meta["method"]["class_path"].endswith("DISCCounterfactual")


def test_dip_explain_records_fit_quality_and_non_progressive_has_no_stages(cnn_ckpt, tmp_path):
    out = tmp_path / "dip"
    main(
        [
            *EXPLAIN,
            f"--classifier={cnn_ckpt}",
            f"--output_dir={out}",
            "--model.init_args.progressive=false",
            "--model.init_args.lr=0.005",
            "--model.init_args.fit_steps=300",
            "--model.init_args.fit_psnr=25",
            "--model.init_args.dip_channels=16",
            "--num_queries=4",
            "--chunk_size=4",
        ]
    )
    run = ExplainRun(out)
    assert len(run) == 4
    fits = [(r["prior_psnr"], r["prior_fit_steps"]) for r in run.manifest]
    assert all(25.0 <= q < 100.0 and 0 < n < 300 for q, n in fits), fits  # fitted per image, stopped at 25 dB
    assert all(r["steps"] == 160 for r in run.manifest)  # one stage, its whole budget (steps x 4), no early stop
    assert run.meta["method"]["stopping"] == "none: every image runs 160 steps (one stage, soft target 1)"
    assert run.meta["method"]["manifold_consistency"] == "off (mc_weight: 0)"
    assert not list((out / "grids").glob("progression-*"))
    with pytest.raises(UserError, match="no tensor 'stages'"):
        run.tensor("stages")
    cf = run.tensor("counterfactual")
    assert cf.shape == (4, 1, 28, 28) and cf.min() >= 0 and cf.max() <= 1
    # the fitted prior's image is saved: its PSNR to the query is the recorded one
    prior, query = run.tensor("prior_image"), run.tensor("query")
    assert prior.shape == cf.shape
    measured = -10 * torch.log10((prior - query).square().flatten(1).mean(1))
    torch.testing.assert_close(measured, torch.tensor([r["prior_psnr"] for r in run.manifest]), atol=0.3, rtol=0)
    # attributions can score the edit from it instead of from the query
    from lit_cf.attribution import attribute_run

    def brightness(x):
        return x.flatten(1).mean(1, keepdim=True)

    res = attribute_run(run, brightness, names=["brightness"], successful_only=False, n_boot=0, before="prior_image")
    torch.testing.assert_close(res["desc_query"], brightness(prior))
    torch.testing.assert_close(res["desc_cf"], brightness(cf))
    with pytest.raises(UserError, match="no tensor 'stages' to compare"):
        attribute_run(run, brightness, names=["brightness"], successful_only=False, n_boot=0, before="stages")


# ----------------------------------------------------------------------------- stopping and stages
def trained(ckpt) -> Classifier:
    from lit_cf.utils.checkpoint import load_module

    return load_module(ckpt, Classifier).eval()


def test_default_runs_the_full_budget_where_the_old_rule_stops_early(cnn_ckpt):
    """The old rule (stage_rule: threshold) stops each image a few steps past the stage values;
    the default runs every stage's steps for every image and ends far more confident."""
    x = digits(4)
    classifier = trained(cnn_ckpt)
    batch = {**batch_of(x, target=[3, 5, 7, 1]), "orig_pred": classifier(x).argmax(-1)}
    common = dict(prior="pixels", feature_weight=0.1, steps=15, lr=0.05)
    old = DISCCounterfactual(**common, stage_rule="threshold", stages=[0.2, 0.4, 0.6, 0.8])
    old.attach(classifier)
    out_old = old.optimise(batch)
    p_old = out_old["final_probs"].gather(1, batch["target"][:, None]).squeeze(1)
    assert (out_old["steps"] < 4 * 15).all() and (p_old >= 0.8).all(), (out_old["steps"], p_old)  # crossed, then stopped
    new = DISCCounterfactual(**common)
    assert new.stage_rule == "steps" and new.stop_probability is None and new.stages == [0.25, 0.5, 0.75, 1.0]
    new.attach(classifier)
    out_new = new.optimise(batch)
    assert (out_new["steps"] == 4 * 15).all() and (out_new["stage_steps"] == 15).all()
    p_new = out_new["final_probs"].gather(1, batch["target"][:, None]).squeeze(1)
    assert (p_new > p_old).all(), (p_old, p_new)
    # the strip rises stage by stage towards the raised soft targets
    strip = out_new["stage_target_prob"]
    assert (strip[:, -1] > strip[:, 0]).all(), strip
    # the rule is recorded in words
    assert new.describe()["stopping"].startswith("none: every image runs 15 steps per stage")
    assert old.describe()["stopping"].startswith("per image at each stage's target probability (0.2, 0.4, 0.6, 0.8)")


def test_stop_probability_stops_an_image_for_good(cnn_ckpt):
    x = digits(4)
    classifier = trained(cnn_ckpt)
    batch = {**batch_of(x, target=[3, 5, 7, 1]), "orig_pred": classifier(x).argmax(-1)}
    method = DISCCounterfactual(prior="pixels", feature_weight=0.0, steps=30, lr=0.05, progressive=False, stop_probability=0.6)
    method.attach(classifier)
    out = method.optimise(batch)
    p = out["final_probs"].gather(1, batch["target"][:, None]).squeeze(1)
    stopped = out["steps"] < 120
    assert stopped.any(), out["steps"]
    assert (p[stopped] >= 0.6).all() and (p[stopped] < 0.95).all(), p  # stopped right past the threshold
    assert "p(target) >= 0.6" in method.describe()["stopping"]


def test_soft_cross_entropy():
    from lit_cf.explainers.disc import soft_cross_entropy

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    log_p = logits.log_softmax(-1)
    target, source = torch.tensor([1, 2]), torch.tensor([0, 2])
    out = soft_cross_entropy(logits, target, source, 0.25)
    expected = torch.stack([-(0.25 * log_p[0, 1] + 0.75 * log_p[0, 0]), -log_p[1, 2]])  # source == target: one-hot
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(soft_cross_entropy(logits, target, source, 1.0), -log_p.gather(1, target[:, None]).squeeze(1))


def test_duq_auto_uses_a_duq_classifier_and_records_which_model():
    x = digits(2)
    batch = batch_of(x)
    on = DISCCounterfactual(prior="pixels", mc_weight=0.5)  # duq: auto is the default
    on.prepare(tiny_duq())
    assert on.describe()["manifold_consistency"].startswith("on: the explained classifier")
    on.attach(tiny_duq())
    latents = on.init_latents(batch)
    x_cf = on.render(latents, batch)
    assert "mc" in on.loss_terms(x_cf, on.classifier(x_cf), latents, batch, 0)
    off = DISCCounterfactual(prior="pixels", mc_weight=0.5)
    off.prepare(tiny_cnn())
    assert off.describe()["manifold_consistency"].startswith("off (duq: auto, and the explained classifier is not a DUQ model")
    off.attach(tiny_cnn())
    latents = off.init_latents(batch)
    x_cf = off.render(latents, batch)
    assert "mc" not in off.loss_terms(x_cf, off.classifier(x_cf), latents, batch, 0)
    with pytest.raises(ValueError, match=r"stages must be strictly increasing probabilities in \(0, 1\) \(stage_rule: threshold"):
        DISCCounterfactual(stage_rule="threshold", stages=[0.5, 1.0])
    with pytest.raises(ValueError, match="stage_rule must be"):
        DISCCounterfactual(stage_rule="never")
