"""FastDiME / DiME on a tiny stand-in denoiser: mask, retries, clean estimates, independence, seeds, bad settings."""

from __future__ import annotations

import pytest
import torch

from lit_cf.errors import UserError
from lit_cf.explainers.diffusion_ops import difference_mask, mask_to_model, stream_noise
from lit_cf.explainers.fastdime import FastDiME
from tests.explainers.diffusion_fakes import SIZE, PaddingDenoiser, TinyDenoiser, batch, tiny_classifier, wire

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models():
    return TinyDenoiser(), tiny_classifier()


@pytest.fixture(scope="module")
def queries(models):
    _, clf = models
    torch.manual_seed(0)
    x = torch.rand(6, 1, SIZE, SIZE)
    runner_up = clf(x).argsort(-1, descending=True)[:, 1]
    return x, runner_up.tolist()


def fastdime(models, **kw) -> FastDiME:
    settings = dict(tau=0.1, num_steps=6, class_scales=[1.0, 2.0, 4.0], mask_from=None)
    settings.update(kw)
    return wire(FastDiME("unused.ckpt", **settings), *models)


# ----------------------------------------------------------------------------- mask
def test_difference_mask_by_hand():
    x = torch.zeros(2, 2, 5, 5)
    y = x.clone()
    y[0, 0, 2, 2], y[0, 1, 2, 2] = 0.6, -0.4  # |diff| summed over channels: 1.0 at the centre
    y[0, 0, 0, 4] = 0.1  # 0.1 after normalising: below the threshold, and so is its dilation
    y[0, 1, 4, 0] = 0.2  # 0.2: above
    mask = difference_mask(x, y, kernel=3, threshold=0.15)
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1  # the centre dilated by a 3x3 kernel
    expected[3:5, 0:2] = 1  # the corner pixel dilated, clipped at the border
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask[0, 0], expected)
    assert mask[1].sum() == 0  # identical images: empty mask
    no_dilation = difference_mask(x, y, kernel=1, threshold=0.15)[0, 0]
    assert no_dilation.sum() == 2 and no_dilation[2, 2] == 1 and no_dilation[4, 0] == 1
    # scale-free: the same difference at 10x the magnitude gives the same mask
    assert torch.equal(difference_mask(x, 10 * y, kernel=3, threshold=0.15), mask)


def test_mask_lifted_to_a_padded_denoiser_space():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1:3, 0] = 1
    lifted = mask_to_model(PaddingDenoiser(pad=2, size=4), mask, channels=1)
    assert lifted.shape == (1, 1, 8, 8)
    assert torch.equal(lifted[0, 0, 2:6, 2:6], mask[0, 0]) and lifted.sum() == mask.sum()


def test_padded_denoiser_keeps_the_query_outside_the_mask(queries):
    x, targets = queries
    models = (PaddingDenoiser(pad=2), tiny_classifier())
    method = fastdime(models, mask_from=0.0, mask_kernel=1, mask_threshold=0.3, class_scales=[2.0])
    cf, extras = method.generate(batch(x, targets, list(range(6))))
    mask = difference_mask(x, extras["stages"][:, -1], 1, 0.3)
    outside = mask.expand_as(x) == 0
    assert cf.shape == x.shape and 0 < extras["mask_fraction"].mean() < 1
    torch.testing.assert_close(cf[outside], x[outside], atol=1e-6, rtol=0)


def test_stream_noise_rows_depend_on_their_own_seed_only():
    a = stream_noise(torch.tensor([5, 6, 7]), (1, 2), (1, 3, 3), 4, torch.device("cpu"))
    b = stream_noise(torch.tensor([9, 6]), (1, 2), (1, 3, 3), 4, torch.device("cpu"))
    assert a.shape == (4, 3, 1, 3, 3)
    assert torch.equal(a[:, 1], b[:, 1])
    other_stream = stream_noise(torch.tensor([6]), (1, 3), (1, 3, 3), 4, torch.device("cpu"))
    assert not torch.allclose(other_stream[:, 0], a[:, 1])


def test_mask_keeps_the_query_outside_and_edits_inside(models, queries):
    x, targets = queries
    method = fastdime(models, mask_from=0.0, mask_kernel=1, mask_threshold=0.3, class_scales=[2.0])
    cf, extras = method.generate(batch(x, targets, list(range(6))))
    frac = extras["mask_fraction"]
    assert (frac > 0).all() and (frac < 1).all()
    # the final mask, recomputed from the last clean estimate (the last stage) and the query
    last = extras["stages"][:, -1]
    mask = difference_mask(x * 2 - 1, last * 2 - 1, 1, 0.3)
    torch.testing.assert_close(mask.flatten(1).mean(1), frac)
    outside = mask.expand_as(x) == 0
    torch.testing.assert_close(cf[outside], x[outside], atol=1e-6, rtol=0)
    assert (cf - x).abs()[~outside].max() > 1e-3
    # without the mask the whole image changes
    free, free_extras = fastdime(models, class_scales=[2.0]).generate(batch(x, targets, list(range(6))))
    assert (free - x).abs()[outside].max() > 1e-3 and (free_extras["mask_fraction"] == 1).all()


# ----------------------------------------------------------------------------- retries
def test_retries_rerun_only_unflipped_images(models, queries):
    x, runner_up = queries
    _, clf = models
    # targets: the current prediction for three images (kept at the first scale), a far class for three
    pred = clf(x).argmax(-1)
    least = clf(x).argmin(-1)
    targets = [int(pred[i]) if i % 2 == 0 else int(least[i]) for i in range(6)]
    # a low noise level keeps the outputs near the queries, so only the guidance decides a flip
    method = fastdime(models, tau=0.02, class_scales=[0.01, 0.02, 0.03])
    cf, extras = method.generate(batch(x, targets, list(range(6))))
    final = clf(cf).argmax(-1)
    flipped_first = extras["attempt"] == 1
    assert flipped_first[0::2].all(), "the images whose target is their prediction should pass at once"
    assert (extras["attempt"][1::2] == 3).all(), "far targets at tiny scales should use every scale"
    assert (final[flipped_first] == torch.tensor(targets)[flipped_first]).all()
    # the denoiser ran num_steps times per attempt, per image: the flipped ones were not rerun
    assert torch.equal(extras["denoiser_calls"], extras["attempt"] * 6)
    assert torch.equal(extras["class_scale"], torch.tensor([0.01, 0.02, 0.03])[extras["attempt"] - 1])
    # images flipped at the first scale are bit-identical to a run with only that scale
    single, _ = fastdime(models, tau=0.02, class_scales=[0.01]).generate(batch(x, targets, list(range(6))))
    assert torch.equal(cf[flipped_first], single[flipped_first])
    assert not torch.equal(cf[~flipped_first], single[~flipped_first])


# ----------------------------------------------------------------------------- clean estimates
def test_chain_estimate_differs_and_costs_more_denoiser_calls(models, queries):
    x, targets = queries
    den, _ = models
    n = 6
    fast = fastdime(models, class_scales=[3.0], clean_estimate="x0")
    chain = fastdime(models, class_scales=[3.0], clean_estimate="chain")
    den.calls = 0
    cf_fast, ex_fast = fast.generate(batch(x, targets, list(range(6))))
    fast_calls = den.calls
    den.calls = 0
    cf_chain, ex_chain = chain.generate(batch(x, targets, list(range(6))))
    chain_calls = den.calls
    assert (ex_fast["denoiser_calls"] == n).all()
    assert (ex_chain["denoiser_calls"] == n * (n + 1) // 2).all()  # a full chain per step
    assert fast_calls == 6 * n and chain_calls == 6 * n * (n + 1) // 2  # counted inside the denoiser too
    assert not torch.allclose(cf_fast, cf_chain, atol=1e-3)
    assert not torch.allclose(ex_fast["stages"], ex_chain["stages"], atol=1e-3)


# ----------------------------------------------------------------------------- independence and seeds
@pytest.mark.parametrize("clean_estimate", ["x0", "chain"])
def test_counterfactual_does_not_depend_on_chunk_mates(models, queries, clean_estimate):
    x, targets = queries
    method = fastdime(models, clean_estimate=clean_estimate, mask_from=0.5, mask_kernel=3, num_steps=4, perceptual_weight=5.0)
    a_cf, a = method.generate(batch(x[[0, 1, 2]], [targets[0], 3, 4], [10, 11, 12]))
    b_cf, b = method.generate(batch(x[[4, 0]], [7, targets[0]], [14, 10]))
    torch.testing.assert_close(a_cf[0], b_cf[1], atol=1e-5, rtol=1e-5)
    for key in ("stages", "mask_fraction"):
        torch.testing.assert_close(a[key][0], b[key][1], atol=1e-5, rtol=1e-5)
    for key in ("attempt", "denoiser_calls"):
        assert a[key][0] == b[key][1]
    assert (a_cf[0] - x[0]).abs().max() > 1e-3  # it did change


def test_float64_runs_stay_float64_and_are_independent_to_rounding(queries):
    # bench_diffusion's --precision 64: float64 in, float64 out, chunk-mates change nothing
    x, targets = queries
    models = (TinyDenoiser().double(), tiny_classifier().double())
    method = fastdime(models, mask_from=0.5, mask_kernel=3, num_steps=4, perceptual_weight=5.0)
    a_cf, a = method.generate(batch(x[[0, 1, 2]].double(), [targets[0], 3, 4], [10, 11, 12]))
    b_cf, b = method.generate(batch(x[[4, 0]].double(), [7, targets[0]], [14, 10]))
    assert a_cf.dtype == torch.float64 and a["mask_fraction"].dtype == torch.float64
    torch.testing.assert_close(a_cf[0], b_cf[1], atol=1e-12, rtol=0)


def test_same_seed_same_output_and_other_seed_differs(models, queries):
    x, targets = queries
    method = fastdime(models, mask_from=0.5, perceptual_weight=5.0)
    first, ex1 = method.generate(batch(x, targets, list(range(6))))
    second, ex2 = method.generate(batch(x, targets, list(range(6))))
    assert torch.equal(first, second) and torch.equal(ex1["stages"], ex2["stages"])
    other, _ = method.generate(batch(x, targets, list(range(100, 106))))
    assert not torch.allclose(first, other, atol=1e-3)


def test_perceptual_and_l1_terms_pull_towards_the_query(models, queries):
    x, targets = queries
    seeds = list(range(6))
    free, _ = fastdime(models, class_scales=[20.0], l1_weight=0.0, perceptual_weight=0.0).generate(batch(x, targets, seeds))
    held, _ = fastdime(models, class_scales=[20.0], l1_weight=5.0, perceptual_weight=0.0).generate(batch(x, targets, seeds))
    assert (held - x).abs().mean() < (free - x).abs().mean()
    perc, _ = fastdime(models, class_scales=[20.0], l1_weight=0.0, perceptual_weight=50.0).generate(batch(x, targets, seeds))
    assert not torch.allclose(perc, free, atol=1e-3)


def test_outputs_and_stages_are_images(models, queries):
    x, targets = queries
    method = fastdime(models, num_stages=4)
    out = method.optimise(batch(x, targets, list(range(6))))
    assert out["counterfactual"].shape == x.shape
    assert out["stages"].shape == (6, 4, 1, SIZE, SIZE)
    assert out["stages"].min() >= 0 and out["stages"].max() <= 1
    assert out["final_probs"].shape == (6, 10)


# ----------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"num_stages": -1}, "num_stages"),
        ({"l1_weight": -1.0}, "l1_weight"),
        ({"perceptual_weight": -0.1}, "perceptual_weight"),
        ({"class_scales": [8, 8, 15]}, "strictly increasing"),
        ({"class_scales": []}, "strictly increasing"),
        ({"class_scales": [-1, 2]}, "positive"),
        ({"clean_estimate": "full"}, "clean_estimate"),
        ({"mask_kernel": 4}, "mask_kernel"),
        ({"mask_from": 1.5}, "mask_from"),
        ({"mask_threshold": 1.0}, "mask_threshold"),
    ],
)
def test_bad_settings_raise_one_clear_error(kw, match):
    method = FastDiME("unused.ckpt", **kw)  # building never fails (LightningCLI would print a traceback)
    with pytest.raises(UserError, match=match):
        method.validate_settings()  # describe() and attach() call it before any output exists


def test_generate_refuses_bad_settings(models, queries):
    x, targets = queries
    with pytest.raises(UserError, match="strictly increasing"):
        fastdime(models, class_scales=[15, 10, 8]).generate(batch(x, targets, list(range(6))))


def test_more_steps_than_the_schedule_is_a_clear_error(models, queries):
    x, targets = queries
    method = fastdime(models, tau=0.01, num_steps=50)  # checked against the DDPM's schedule (explain: before any output)
    with pytest.raises(UserError, match="num_steps"):
        method.generate(batch(x, targets, list(range(6))))
