"""Counterfactual attributions: descriptor predictors, local / global scores, and ground truth.

The ground-truth tests plant a shortcut (the corner mark <=> class 7 in training), explain
non-7 digits towards 7 with pixel counterfactuals or with LatentAttack, and rank the descriptors
a factor regressor reads off queries and counterfactuals: for the shortcut classifier ``mark``
must come first, for a classifier trained on clean data it must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_cf.attribution import (
    MNIST_DESCRIPTOR_NAMES,
    LinearPredictors,
    attribute_run,
    descriptor_targets,
    encode_dataset,
    fit_linear_predictors,
    global_attribution,
    local_attributions,
    mnist_descriptors,
)
from lit_cf.cli import main
from lit_cf.data.rendered import FACTOR_NAMES, RenderedDigits, normalize_factors
from lit_cf.errors import UserError
from lit_cf.explainers import ExplainRun
from lit_cf.models import DescriptorPredictor
from lit_cf.utils.checkpoint import load_module
from tests.conftest import CONFIGS, fit_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features on very different scales and offsets; a linear and a logistic descriptor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 5.0]) + torch.tensor([0, 5.0, -2, 0, 1, 0])
    w = torch.tensor([1.0, 0.2, -10.0, 0.0, 0.5, 0.1])
    cont = x @ w + 3.0 + 0.05 * torch.randn(n, generator=g)
    logits = 3 * (x @ torch.tensor([2.0, 0.0, 0.0, -0.5, 0.0, 0.2]) - 1.0)
    binary = torch.bernoulli(logits.sigmoid(), generator=g)
    return x, torch.stack([cont, binary, -cont], 1)


KINDS = ["continuous", "binary", "continuous"]
NAMES = ["linear", "logistic", "negated"]


# ----------------------------------------------------------------------------- predictors
@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_predictors_recover_linear_and_logistic_relations(solver):
    x, y = synthetic(3000, seed=0)
    xt, yt = synthetic(1000, seed=1)
    pred = fit_linear_predictors(x, y, KINDS, NAMES, l2=1e-4, solver=solver)
    quality = pred.quality(xt, yt)
    assert quality["linear"] > 0.95 and quality["negated"] > 0.95
    assert quality["logistic"] > 0.9
    out = pred.predict(xt)
    assert out.shape == (1000, 3) and ((out[:, 1] >= 0) & (out[:, 1] <= 1)).all()
    # directions live in the original feature space: the true coefficients, up to scale
    cos = torch.nn.functional.cosine_similarity
    assert cos(pred.direction("linear"), torch.tensor([1.0, 0.2, -10.0, 0.0, 0.5, 0.1]), dim=0) > 0.99
    assert cos(pred.direction("logistic"), torch.tensor([2.0, 0.0, 0.0, -0.5, 0.0, 0.2]), dim=0) > 0.95
    torch.testing.assert_close(pred.direction("negated"), -pred.direction("linear"), atol=1e-4, rtol=1e-3)


def test_newton_and_lbfgs_agree():
    x, y = synthetic(500, seed=2)
    a = fit_linear_predictors(x, y, KINDS, NAMES, solver="newton")
    b = fit_linear_predictors(x, y, KINDS, NAMES, solver="lbfgs", steps=200)
    torch.testing.assert_close(a.predict(x), b.predict(x), atol=2e-3, rtol=0)


def test_separable_binary_descriptor_stays_finite():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 3, generator=g)
    y = (x[:, :1] > 0).float()
    pred = fit_linear_predictors(x, y, ["binary"], ["sign"], l2=1e-6)
    assert torch.isfinite(pred.weight).all()
    assert pred.quality(x, y)["sign"] == 1.0


def test_save_load_roundtrip(tmp_path):
    x, y = synthetic(300, seed=3)
    pred = fit_linear_predictors(x, y, KINDS, NAMES)
    path = pred.save(tmp_path / "p.safetensors")
    back = LinearPredictors.load(path)
    for key in ("weight", "bias", "mean", "std"):
        assert torch.equal(getattr(back, key), getattr(pred, key))
    assert back.names == NAMES and back.kinds == KINDS
    assert torch.equal(back.predict(x), pred.predict(x))
    with pytest.raises(UserError, match="not found"):
        LinearPredictors.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="cannot read"):
        LinearPredictors.load(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="no descriptor"):
        pred.direction("smile")


def test_fit_rejects_bad_input():
    x, y = synthetic(50, seed=4)
    with pytest.raises(ValueError, match="kinds"):
        fit_linear_predictors(x, y, ["binary", "ordinal", "continuous"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_linear_predictors(x, y, ["binary", "binary", "continuous"])  # column 0 is not a label
    with pytest.raises(ValueError, match="targets"):
        fit_linear_predictors(x, y[:, :2], KINDS)


def test_constant_feature_and_dataset_helpers():
    data = RenderedDigits(64, split="train", mark_rate=0.5)
    targets = descriptor_targets(data)
    assert targets.names == list(FACTOR_NAMES)
    assert targets.kinds == ["continuous"] * 6 + ["binary"]
    torch.testing.assert_close(targets.values, normalize_factors(data.factors))

    class Flatten(torch.nn.Module):  # a "generator" whose code has a constant column
        def encode(self, x):
            return torch.cat([x.flatten(1)[:, ::16], torch.ones(len(x), 1)], 1)

    codes = encode_dataset(Flatten(), data, batch_size=16)
    assert codes.shape == (64, 50)
    pred = fit_linear_predictors(codes, targets.values, targets.kinds, targets.names)
    assert pred.std[-1] == 1 and torch.isfinite(pred.predict(codes)).all()


# ----------------------------------------------------------------------------- image descriptors
def bar(width: int, height: int, shear: float = 0.0, value: float = 1.0) -> torch.Tensor:
    """A vertical bar centred on a 28x28 canvas; ``shear`` > 0 leans its top to the right."""
    img = torch.zeros(1, 28, 28)
    for row in range(14 - height // 2, 14 - height // 2 + height):
        shift = round(-shear * (row - 13.5))
        left = 14 - width // 2 + shift
        img[0, row, left : left + width] = value
    return img


def test_mnist_descriptors_on_synthetic_shapes():
    idx = {n: i for i, n in enumerate(MNIST_DESCRIPTOR_NAMES)}
    thin, thick = bar(2, 18), bar(5, 18)
    lean_right, lean_left = bar(3, 18, shear=0.3), bar(3, 18, shear=-0.3)
    narrow, wide = bar(4, 10), bar(12, 10)
    d = mnist_descriptors(torch.stack([thin, thick, lean_right, lean_left, narrow, wide, torch.zeros(1, 28, 28)]))
    assert d.shape == (7, 5)
    assert d[1, idx["thickness"]] > d[0, idx["thickness"]]
    assert d[0, idx["thickness"]] == pytest.approx(2 * 36 / (2 * 18 + 2 * 2))  # 2 m / perimeter
    assert d[2, idx["slant"]] > 0.2 and d[3, idx["slant"]] < -0.2 and abs(d[0, idx["slant"]]) < 1e-6
    assert d[5, idx["width"]] == 12 and d[4, idx["width"]] == 4 and d[4, idx["height"]] == 10
    assert d[1, idx["area"]] == 5 * 18
    assert torch.all(d[6] == 0)  # an empty image
    # the stroke width estimate does not depend on the ink intensity
    dim, bright = mnist_descriptors(torch.stack([bar(4, 18, value=0.5), bar(4, 18)]))
    assert dim[idx["thickness"]] == pytest.approx(float(bright[idx["thickness"]]))


# ----------------------------------------------------------------------------- scores
def test_local_attributions_signs_and_order():
    q = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.0, 0.0, 0.0, 0.0]])
    cf = torch.tensor([[0.8, 0.4, 0.2, 0.3], [0.1, -0.3, 0.2, 0.0]])
    out = local_attributions(q, cf, ["a", "b", "c", "d"], k=3)
    assert [n for n, _ in out[0]] == ["a", "c", "b"]  # |0.7| = |-0.7| keeps column order, then 0.1
    assert [round(s, 6) for _, s in out[0]] == [0.7, -0.7, -0.1]
    assert [n for n, _ in out[1]] == ["b", "c", "a"] and out[1][0][1] == pytest.approx(-0.3)


def test_global_attribution_mean_and_ci_cover_the_truth():
    g = torch.Generator().manual_seed(0)
    n, true = 400, torch.tensor([0.3, -0.05, 0.0, 0.6])
    q = torch.rand(n, 4, generator=g)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cf = q + signs[:, None] * (true + 0.2 * torch.randn(n, 4, generator=g))
    names = ["a", "b", "c", "d"]
    ranking = global_attribution(q, cf, signs, names, n_boot=500, seed=1)
    assert [r[0] for r in ranking] == ["d", "a", "b", "c"]
    contrib = signs[:, None] * (cf - q)
    for name, score, lo, hi in ranking:
        j = names.index(name)
        assert score == pytest.approx(float(contrib[:, j].double().mean()), abs=1e-9)
        assert lo < true[j] < hi and lo < score < hi
        assert hi - lo < 0.1  # about 2 * 1.96 * 0.2 / sqrt(400) = 0.04
    # deterministic per seed, different with another seed
    assert global_attribution(q, cf, signs, names, n_boot=500, seed=1) == ranking
    assert global_attribution(q, cf, signs, names, n_boot=500, seed=2) != ranking
    with pytest.raises(ValueError, match="signs"):
        global_attribution(q, cf, torch.zeros(n), names)


def test_global_attribution_per_class():
    q = torch.zeros(6, 2)
    cf = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -5.0], [0.0, 2.0]])
    group = torch.tensor([7, 7, 7, 1, 1, 1])
    signs = torch.tensor([1.0, 1, 1, 1, -1, 1])
    out = global_attribution(q, cf, signs, ["x", "y"], n_boot=100, seed=0, group=group)
    assert set(out) == {1, 7}
    assert out[7][0][:2] == ("x", pytest.approx(2.0)) and out[7][1][1] == 0
    assert out[1][0][:2] == ("y", pytest.approx(8.0 / 3)) and out[1][1][1] == 0
    # each class is resampled on its own: adding another class does not change class 7
    more = global_attribution(
        torch.zeros(8, 2),
        torch.cat([cf, torch.ones(2, 2)]),
        torch.cat([signs, torch.ones(2)]),
        ["x", "y"],
        n_boot=100,
        seed=0,
        group=torch.cat([group, torch.tensor([3, 3])]),
    )
    assert more[7] == out[7]


# ----------------------------------------------------------------------------- ground truth
EXPLAIN_DATA = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=64",
    "--data.init_args.test_size=128",
]


def explain_towards_7(classifier: Path, out: Path, num_queries: int, l1_weight: float) -> ExplainRun:
    """Pixel counterfactuals towards 7 that only just cross the boundary (stop at 0.5), with an
    L1 term. The L1 weight has to suit the classifier's gradient scale: without it (or too
    small) Adam moves most pixels by about lr per step and the diffuse edits, which the
    regressor reads as thicker, dimmer strokes, outrank the mark for both classifiers; too
    large and most counterfactuals never reach the target."""
    main(
        [
            "explain",
            *EXPLAIN_DATA,
            f"--config={CONFIGS / 'explain/pixel.yaml'}",
            "--model.init_args.steps=300",
            "--model.init_args.lr=0.01",
            f"--model.init_args.l1_weight={l1_weight}",
            "--model.init_args.stop_probability=0.5",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out.parent}",
            f"--classifier={classifier}",
            f"--output_dir={out}",
            f"--num_queries={num_queries}",
            f"--chunk_size={num_queries}",
            "--target=7",
            "--on_source_equals_target=skip",
        ]
    )
    return ExplainRun(out)


def fit_regressor(workdir: Path, epochs: int) -> Path:
    # the auxiliary descriptor data is balanced for the mark (rate 0.5): few marked images
    # (rate 0.1) leave a regressor that barely reads the mark after a few dozen steps
    return fit_checkpoint(
        workdir,
        "model/factor_regressor.yaml",
        "--data.init_args.mark_rate=0.5",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_val_batches=0",
    )


def mark_ranking(run: ExplainRun, regressor, inputs: str = "image", names=None) -> list[tuple[str, float, float, float]]:
    res = attribute_run(run, regressor, names=names, inputs=inputs, k=3, n_boot=500, seed=0)
    assert res["inputs"] == inputs
    assert set(res["per_class"]) == {7}
    return res["per_class"][7]


def check_ground_truth(
    shortcut: ExplainRun, clean: ExplainRun, regressor, ci_separation: bool, inputs: str = "image", names=None
) -> dict:
    """``regressor``: a DescriptorPredictor on images, or (``inputs="latent"``) a function of codes."""
    ranked_shortcut = mark_ranking(shortcut, regressor, inputs, names)
    ranked_clean = mark_ranking(clean, regressor, inputs, names)
    report = {"shortcut": ranked_shortcut, "clean": ranked_clean}
    for name, ranking in report.items():  # shown with pytest -s
        print(name, " | ".join(f"{n} {s:+.3f} [{lo:+.3f}, {hi:+.3f}]" for n, s, lo, hi in ranking))
    assert ranked_shortcut[0][0] == "mark", report
    assert ranked_shortcut[0][1] > 0, report  # towards 7 means adding the mark
    assert ranked_clean[0][0] != "mark", report
    mark_clean = next(r for r in ranked_clean if r[0] == "mark")
    assert ranked_shortcut[0][1] > 1.5 * mark_clean[1], report
    if ci_separation:  # mark's interval lies above every other descriptor's score
        assert ranked_shortcut[0][2] > abs(ranked_shortcut[1][1]), report
    return report


@pytest.fixture(scope="module")
def shortcut_ckpt(tmp_path_factory) -> Path:
    """The conftest CNN recipe on the shortcut split (mark <=> 7 in training)."""
    return fit_checkpoint(tmp_path_factory.mktemp("shortcut"), "model/cnn.yaml", data_config="data/rendered_shortcut.yaml")


@pytest.fixture(scope="module")
def regressor(tmp_path_factory) -> DescriptorPredictor:
    return load_module(fit_regressor(tmp_path_factory.mktemp("regressor"), epochs=6), DescriptorPredictor)


def test_shortcut_mark_ranks_first_only_for_the_shortcut_classifier(cnn_ckpt, shortcut_ckpt, regressor, tmp_path):
    shortcut = explain_towards_7(shortcut_ckpt, tmp_path / "run_shortcut", 30, l1_weight=0.1)
    clean = explain_towards_7(cnn_ckpt, tmp_path / "run_clean", 30, l1_weight=0.1)
    assert len(shortcut) >= 20 and len(clean) >= 20
    assert all(r["source_label"] != 7 or r["orig_pred"] != 7 for r in shortcut.manifest)
    check_ground_truth(shortcut, clean, regressor, ci_separation=True)


@pytest.mark.slow
def test_shortcut_ground_truth_at_larger_scale(tmp_path):
    more = ["--data.init_args.train_size=2048", "--trainer.max_epochs=4", "--trainer.limit_train_batches=32"]
    shortcut_ckpt = fit_checkpoint(tmp_path / "shortcut", "model/cnn.yaml", *more, data_config="data/rendered_shortcut.yaml")
    clean_ckpt = fit_checkpoint(tmp_path / "clean", "model/cnn.yaml", *more)
    regressor = load_module(fit_regressor(tmp_path / "regressor", epochs=20), DescriptorPredictor)
    # better-trained classifiers have larger input gradients: a stronger L1 term keeps the edits sparse
    shortcut = explain_towards_7(shortcut_ckpt, tmp_path / "run_shortcut", 120, l1_weight=0.4)
    clean = explain_towards_7(clean_ckpt, tmp_path / "run_clean", 120, l1_weight=0.4)
    check_ground_truth(shortcut, clean, regressor, ci_separation=True)


# ----------------------------------------------------------------------------- ground truth: LatentAttack
def tiny_autoencoder(workdir: Path) -> Path:
    """A small autoencoder (8/16/32 channels, 32-d code, identity output) for 500 steps of 32
    images, on data where half of the images carry the mark, so the decoder can draw it
    (~15 s on one core).

    The identity output matters: with the sigmoid output the empty corner sits where the
    sigmoid is flat, and a gradient attack does not reach the mark (``lit_cf.models.AutoEncoder``).
    The repo's autoencoder recipe (16/32/64, 64-d, Adam 1e-3) needs about 600 steps of 64 images
    to reconstruct the digits; at lr 2e-3 and above it sometimes collapses to a constant image
    in the first steps (the seeds used here do not)."""
    return fit_checkpoint(
        workdir,
        "model/autoencoder.yaml",
        "--data.init_args.mark_rate=0.5",
        "--data.init_args.train_size=4096",
        "--data.init_args.batch_size=32",
        "--trainer.max_epochs=4",
        "--trainer.limit_train_batches=125",
        "--trainer.limit_val_batches=0",
        "--model.init_args.channels=[8,16,32]",
        "--model.init_args.latent_dim=32",
        "--model.init_args.optimizer.init_args.lr=0.002",
        "--model.init_args.output_activation=identity",
    )


def latent_attack_towards_7(classifier: Path, generator: Path, out: Path, num_queries: int) -> ExplainRun:
    """LatentAttack with the paper's Adam lr (0.1), stopping at p(7) >= 0.5 (these few-step
    classifiers rarely reach the paper's 0.75: their top probability averages about 0.4), the
    loss ``-log p`` and a pixel proximity term ``0.1 * ||x' - decode(z0)||^2``: the settings of
    the ground-truth study, ``docs/results/ground_truth.md``, with a pixel weight suited to these weakly confident
    classifiers (the script's 1.5 suits its confident ones)."""
    main(
        [
            "explain",
            *EXPLAIN_DATA,
            f"--config={CONFIGS / 'explain/latent_attack.yaml'}",
            f"--model.init_args.generator={generator}",
            "--model.init_args.steps=200",
            "--model.init_args.threshold=0.5",
            "--model.init_args.loss=log_prob",
            "--model.init_args.pixel_weight=0.1",
            "--model.init_args.original_prediction=reconstruction",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out.parent}",
            f"--classifier={classifier}",
            f"--output_dir={out}",
            f"--num_queries={num_queries}",
            f"--chunk_size={num_queries}",
            "--target=7",
            "--on_source_equals_target=skip",
        ]
    )
    return ExplainRun(out)


def test_latent_attack_finds_the_shortcut_at_small_scale(cnn_ckpt, shortcut_ckpt, regressor, tmp_path):
    """The ground-truth check for LatentAttack at test scale (about 60 s on one core), on the
    edit the attack made (the factor regressor on ``decode(z0)`` and ``decode(z)``: the verdict
    of the ground-truth study, ``docs/results/ground_truth.md``) and on query and counterfactual (as for the pixel method).

    Measured, not a property this test can guarantee: with these settings the check passed on
    both attributions for autoencoder seeds 0 (this one), 1 and 2. Without the pixel term the
    outcome depended on the seed: with the identity output the regressor on query and
    counterfactual ranked the mark first for one of the three seeds (the drift of an
    unpenalised attack dims the strokes for both classifiers); with the sigmoid output and the
    paper's loss two of six autoencoders passed. With the pixel weight at 0.3 or 1.0 many
    attacks on these weakly confident classifiers stop short of p(7) = 0.5 (at 1.0: at most 1
    of 27 succeeds).
    """
    import lightning as L

    generator = tiny_autoencoder(tmp_path / "ae")
    shortcut = latent_attack_towards_7(shortcut_ckpt, generator, tmp_path / "run_shortcut", 30)
    clean = latent_attack_towards_7(cnn_ckpt, generator, tmp_path / "run_clean", 30)
    assert sum(r["success"] for r in shortcut.manifest) >= 20 and sum(r["success"] for r in clean.manifest) >= 20
    assert all(r["source_label"] != 7 or r["orig_pred"] != 7 for r in shortcut.manifest)
    for run in (shortcut, clean):  # the start and final codes are saved (latent attributions need them)
        assert run.tensor("latent").shape == run.tensor("latent_init").shape == (len(run), 32)
    ae = load_module(generator, L.LightningModule).eval()

    def edit_descriptors(z: torch.Tensor) -> torch.Tensor:
        return regressor.predict_descriptors(ae.decode(z).clamp(0, 1))

    with torch.no_grad():
        check_ground_truth(shortcut, clean, edit_descriptors, ci_separation=True, inputs="latent", names=list(regressor.names))
        check_ground_truth(shortcut, clean, regressor, ci_separation=True)
