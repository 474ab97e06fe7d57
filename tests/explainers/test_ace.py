"""ACE on a tiny stand-in denoiser: gradient through the filter, per-image PGD, masked refinement, seeds."""

from __future__ import annotations

import pytest
import torch

from lit_cf.errors import UserError
from lit_cf.explainers.ace import ACE, diffusion_filter
from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.diffusion_ops import CountedDenoiser, difference_mask
from tests.explainers.diffusion_fakes import SIZE, TinyDenoiser, batch, tiny_classifier, wire

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


def ace(models, **kw) -> ACE:
    settings = dict(tau=0.05, num_steps=3, iterations=15, step_size=0.02, mask_kernel=3)
    settings.update(kw)
    return wire(ACE("unused.ckpt", **settings), *models)


class _Recording:
    """A denoiser that keeps every noise prediction it returns, with its gradient."""

    def __init__(self, inner: TinyDenoiser) -> None:
        self.inner, self.outputs = inner, []
        self.alphas_cumprod = inner.alphas_cumprod.double()

    def eps(self, x_t, t):
        out = self.inner.eps(x_t, t)
        out.retain_grad()
        self.outputs.append(out)
        return out

    def to_model(self, x):
        return x * 2 - 1

    def to_image(self, x):
        return (x + 1) / 2


def test_gradient_flows_through_every_denoiser_call():
    inner = TinyDenoiser(size=4).double()
    den = _Recording(inner)
    counted = CountedDenoiser(den, 2)
    timesteps = [150, 80, 20]
    noise = torch.randn(3, 2, 1, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(2)
    x = torch.rand(2, 1, 4, 4, dtype=torch.double, requires_grad=True)
    out = diffusion_filter(counted, x, timesteps, noise, rows, clip_denoised=False)
    out.square().sum().backward()
    assert len(den.outputs) == 3 and all(o.grad is not None and o.grad.abs().sum() > 0 for o in den.outputs)
    # the analytic gradient through the whole chain equals finite differences
    assert torch.autograd.gradcheck(
        lambda inp: diffusion_filter(counted, inp, timesteps, noise, rows, clip_denoised=False), (x,), eps=1e-6, atol=1e-5
    )
    # and it is not the gradient of the chain with the denoiser held constant

    class _Constant(_Recording):
        def eps(self, x_t, t):
            return self.inner.eps(x_t, t).detach()

    x.grad = None
    diffusion_filter(
        CountedDenoiser(_Constant(inner), 2), x, timesteps, noise, rows, clip_denoised=False
    ).square().sum().backward()
    constant_grad = x.grad.clone()
    x.grad = None
    diffusion_filter(counted, x, timesteps, noise, rows, clip_denoised=False).square().sum().backward()
    assert not torch.allclose(constant_grad, x.grad)


def test_pgd_stops_per_image_and_counts_calls(models, queries):
    x, targets = queries
    _, clf = models
    pred = clf(x).argmax(-1).tolist()
    targets = [pred[0], *targets[1:]]  # image 0: the filter alone keeps its prediction -> no PGD step
    method = ace(models, refine=False, tau=0.01)  # a light filter: it keeps image 0's prediction
    cf, extras = method.generate(batch(x, targets, list(range(6))))
    steps = extras["steps"]
    assert steps[0] == 0
    assert steps.max() > steps.min()
    # one filter pass (num_steps calls) per iteration, plus the final pass that saw the flip
    assert torch.equal(extras["denoiser_calls"], (steps + 1) * 3)
    # without refinement the counterfactual is the pre-explanation, which the classifier assigns to the target
    assert torch.equal(cf, extras["stages"][:, 0])
    stopped = steps < 15
    assert (clf(cf).argmax(-1)[stopped] == torch.tensor(targets)[stopped]).all()


def test_refinement_keeps_the_query_outside_the_mask(models, queries):
    x, targets = queries
    method = ace(models, mask_kernel=1, mask_threshold=0.3)
    cf, extras = method.generate(batch(x, targets, list(range(6))))
    pre = extras["stages"][:, 0]
    mask = difference_mask(x * 2 - 1, pre * 2 - 1, 1, 0.3)
    torch.testing.assert_close(mask.flatten(1).mean(1), extras["mask_fraction"])
    assert (extras["mask_fraction"] < 1).all() and (extras["mask_fraction"] > 0).all()
    outside = mask.expand_as(x) == 0
    torch.testing.assert_close(cf[outside], x[outside], atol=1e-6, rtol=0)
    assert (cf - pre).abs()[~outside].max() > 1e-3  # the masked region was re-denoised
    assert extras["stages"].shape[1] == 4  # the pre-explanation + one x0-hat per refinement step
    assert torch.equal(extras["denoiser_calls"], (extras["steps"] + 1) * 3 + 3)


def test_adversarial_pre_explanation_switch(models, queries):
    x, targets = queries
    filtered, ex_f = ace(models, refine=False).generate(batch(x, targets, list(range(6))))
    adversarial, ex_a = ace(models, refine=False, pre_explanation="adversarial").generate(batch(x, targets, list(range(6))))
    assert torch.equal(ex_f["steps"], ex_a["steps"])
    assert not torch.allclose(filtered, adversarial)
    # the adversarial image moved by sign steps of 0.02 from the query, at most that per step
    assert ((adversarial - x).abs().amax((1, 2, 3)) <= ex_a["steps"] * 0.02 + 1e-6).all()


def test_attack_confidence_runs_pgd_on_until_the_target_probability_is_reached(models, queries):
    x, targets = queries
    _, clf = models
    records = batch(x, targets, list(range(6)))
    first, ex_first = ace(models, refine=False, iterations=60).generate(records)
    sure, ex_sure = ace(models, refine=False, iterations=60, attack_confidence=0.6).generate(records)
    # the same noise per iteration: both attacks agree up to the first top-1, then the margin goes on
    assert (ex_sure["steps"] >= ex_first["steps"]).all() and (ex_sure["steps"] > ex_first["steps"]).any()
    p_first = clf(first).softmax(-1)[torch.arange(6), targets]
    p_sure = clf(sure).softmax(-1)[torch.arange(6), targets]
    stopped = ex_sure["steps"] < 60
    assert stopped.sum() >= 3
    assert (p_sure[stopped] >= 0.6).all()
    assert (p_first < 0.6).any()  # the first top-1 alone leaves images below the margin
    assert torch.equal(ex_sure["denoiser_calls"], (ex_sure["steps"] + 1) * 3)
    # recorded only off its default, so runs made before the setting existed keep their fingerprint
    # (the base's record; ACE's own adds the DDPM's checksum, which needs a real checkpoint)
    assert "attack_confidence" not in CounterfactualMethod.describe(ace(models))
    assert CounterfactualMethod.describe(ace(models, attack_confidence=0.9))["attack_confidence"] == 0.9
    assert "p(target) >= 0.9" in ace(models, attack_confidence=0.9).stopping_rule()


def test_independence_and_same_seed(models, queries):
    x, targets = queries
    method = ace(models, epsilon=0.1)
    a_cf, a = method.generate(batch(x[[0, 1, 2]], [targets[0], 3, 4], [10, 11, 12]))
    b_cf, b = method.generate(batch(x[[4, 0]], [7, targets[0]], [14, 10]))
    torch.testing.assert_close(a_cf[0], b_cf[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["stages"][0], b["stages"][1], atol=1e-5, rtol=1e-5)
    assert a["steps"][0] == b["steps"][1]
    again, _ = method.generate(batch(x[[0, 1, 2]], [targets[0], 3, 4], [10, 11, 12]))
    assert torch.equal(a_cf, again)
    other, _ = method.generate(batch(x[[0, 1, 2]], [targets[0], 3, 4], [20, 21, 22]))
    assert not torch.allclose(a_cf, other, atol=1e-3)


def test_float64_runs_stay_float64_and_are_independent_to_rounding(queries):
    x, targets = queries
    models = (TinyDenoiser().double(), tiny_classifier().double())
    method = ace(models, epsilon=0.1)
    a_cf, a = method.generate(batch(x[[0, 1, 2]].double(), [targets[0], 3, 4], [10, 11, 12]))
    b_cf, b = method.generate(batch(x[[4, 0]].double(), [7, targets[0]], [14, 10]))
    assert a_cf.dtype == torch.float64 and a["stages"].dtype == torch.float64
    torch.testing.assert_close(a_cf[0], b_cf[1], atol=1e-12, rtol=0)
    assert a["steps"][0] == b["steps"][1]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.01}, "tau"),
        ({"num_stages": -1}, "num_stages"),
        ({"iterations": -1}, "iterations"),
        ({"step_size": 0.0}, "step_size"),
        ({"l1_weight": -0.001}, "l1_weight"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"attack_confidence": 1.0}, "attack_confidence"),
        ({"attack_confidence": -0.1}, "attack_confidence"),
        ({"pre_explanation": "both"}, "pre_explanation"),
        ({"mask_kernel": 0}, "mask_kernel"),
    ],
)
def test_bad_settings_raise_one_clear_error(kw, match):
    method = ACE("unused.ckpt", **kw)  # building never fails (LightningCLI would print a traceback)
    with pytest.raises(UserError, match=match):
        method.validate_settings()  # describe() and attach() call it before any output exists


def test_more_steps_than_the_schedule_is_a_clear_error(models, queries):
    x, targets = queries
    method = ace(models, tau=0.004, num_steps=5)  # checked against the DDPM's schedule (explain: before any output)
    with pytest.raises(UserError, match="num_steps"):
        method.generate(batch(x, targets, list(range(6))))


def test_clipping_in_the_filter_keeps_the_gradient_of_saturated_pixels():
    den = TinyDenoiser(size=4)
    counted = CountedDenoiser(den, 1)
    noise = torch.zeros(2, 1, 1, 4, 4)  # no noise: a black image stays at the clamp boundary
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    out = diffusion_filter(counted, x, [30, 10], noise, torch.arange(1), clip_denoised=True)
    assert (out.detach() <= 1).all() and (out.detach() >= 0).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert (grad != 0).all()
