"""DVCE and the shared diffusion sampler: cone, gradient paths, independence, seeds, bad settings, CLI."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.explainers import DVCE, ExplainRun
from lit_cf.explainers.diffusion_sampler import (
    GuidanceStep,
    NoiseStream,
    guided_sample,
    load_diffusion,
    record_noise,
    respaced_timesteps,
    stage_indices,
    x0_from_eps,
)
from lit_cf.explainers.dvce import cone_project
from lit_cf.models.base import ImageClassifier
from lit_cf.runs import RunDir
from lit_cf.utils.checkpoint import load_module
from tests.conftest import CONFIGS
from tests.fixtures import write_idx_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

RENDERED = [
    f"--config={CONFIGS / 'data/rendered.yaml'}",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=64",
    "--data.init_args.test_size=128",
]


def explain_args(classifier: Path, out: Path, *extra: str, data: list[str] = RENDERED) -> list[str]:
    return [
        "explain",
        *data,
        f"--config={CONFIGS / 'explain/dvce.yaml'}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out.parent}",
        f"--classifier={classifier}",
        f"--output_dir={out}",
        *extra,
    ]


def attached(ddpm_ckpt: Path, cnn_ckpt: Path, **kwargs) -> DVCE:
    kwargs.setdefault("num_steps", 6)
    method = DVCE(diffusion=str(ddpm_ckpt), **kwargs)
    method.attach(load_module(cnn_ckpt, ImageClassifier))
    return method


def batch_of(images: torch.Tensor, targets: list[int], seeds: list[int]) -> dict[str, torch.Tensor]:
    return {"image": images, "target": torch.tensor(targets), "seed": torch.tensor(seeds)}


def queries(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.2
    for i in range(n):
        x[i, :, 4 + 2 * i : 7 + 2 * i, 4:24] = 1.0
    return x


# ----------------------------------------------------------------------------- cone
def test_cone_projection_matches_a_hand_computation():
    g = torch.tensor([[2.0, 0.0, 0.0]]).view(1, 3, 1, 1)
    # inside the cone (20 < 30 degrees): unchanged, whatever r's norm
    r_in = torch.tensor([[math.cos(math.radians(20)), math.sin(math.radians(20)), 0.0]]).view(1, 3, 1, 1) * 5
    torch.testing.assert_close(cone_project(g, r_in, 30.0), g)
    # outside (90 degrees): exactly 30 degrees from g, towards r, in the plane of both, norm of g
    r_out = torch.tensor([[0.0, 3.0, 3.0]]).view(1, 3, 1, 1)
    out = cone_project(g, r_out, 30.0).flatten()
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    torch.testing.assert_close(out, torch.tensor([2 * c, 2 * s / math.sqrt(2), 2 * s / math.sqrt(2)]))
    # a batch: each image on its own; an obtuse r (120 degrees) also lands at exactly 30 degrees
    r_obtuse = torch.tensor([[-1.0, math.sqrt(3), 0.0]]).view(1, 3, 1, 1)
    both = cone_project(torch.cat([g, g]), torch.cat([r_in, r_obtuse]), 30.0)
    torch.testing.assert_close(both[0], g[0])
    torch.testing.assert_close(both[1].flatten(), torch.tensor([2 * c, 2 * s, 0.0]))
    cos = torch.nn.functional.cosine_similarity(both[1].flatten(), g.flatten(), dim=0)
    assert float(cos) == pytest.approx(c, abs=1e-6)


# ----------------------------------------------------------------------------- noise
def test_record_noise_rows_depend_only_on_their_seed():
    a = record_noise(torch.tensor([3, 7, 11]), (1, 4, 4), draws=3, device="cpu")
    b = record_noise(torch.tensor([7, 99]), (1, 4, 4), draws=3, device="cpu")
    assert a.shape == (3, 3, 1, 4, 4)
    torch.testing.assert_close(a[:, 1], b[:, 0], rtol=0, atol=0)
    assert not torch.equal(a[0, 0], a[1, 0])  # draws differ
    stream = NoiseStream(torch.tensor([3, 7, 11]), (1, 4, 4), "cpu")
    torch.testing.assert_close(torch.stack([stream.normal() for _ in range(3)]), a, rtol=0, atol=0)
    assert stage_indices(100, 5) == [19, 39, 59, 79, 99] and stage_indices(5, 5) == [0, 1, 2, 3, 4]
    assert stage_indices(3, 5) == [0, 1, 2] and stage_indices(3, 0) == []


def test_unguided_sampler_matches_the_models_own_chains(ddpm_ckpt):
    d = load_diffusion(ddpm_ckpt)
    ts = respaced_timesteps(d.num_train_timesteps, 0.5, 5)
    seeds = torch.tensor([1, 2, 3])
    x = torch.randn(3, *d.model_shape, generator=torch.Generator().manual_seed(0))
    ddim, stages = guided_sample(d, x, ts, None, NoiseStream(seeds, d.model_shape, "cpu"), sampler="ddim", num_stages=2)
    torch.testing.assert_close(ddim, d.denoise(x, ts), atol=1e-5, rtol=1e-5)
    assert stages.shape == (3, 2, *d.model_shape)
    torch.testing.assert_close(stages[:, -1], ddim.clamp(-1, 1))
    ddpm, _ = guided_sample(d, x, ts, None, NoiseStream(seeds, d.model_shape, "cpu"), sampler="ddpm")
    draws = record_noise(seeds, d.model_shape, len(ts), "cpu")
    torch.testing.assert_close(ddpm, d.denoise(x, ts, noise_fn=lambda k: draws[k]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ddpm, ddim, atol=1e-3)


def test_ddim_dvce_is_deterministic_given_the_seed(ddpm_ckpt, cnn_ckpt):
    method = attached(ddpm_ckpt, cnn_ckpt, sampler="ddim", normalisation="unit", distance="l2")
    batch = batch_of(queries(2), [1, 2], [10, 11])
    a, b = method.optimise(batch), method.optimise(batch)
    assert torch.equal(a["counterfactual"], b["counterfactual"])
    assert a["counterfactual"].min() >= 0 and a["counterfactual"].max() <= 1


# ----------------------------------------------------------------------------- gradient paths
def test_x0_prediction_switch_differentiates_through_the_denoiser_or_at_x0_hat(ddpm_ckpt, cnn_ckpt):
    through = attached(ddpm_ckpt, cnn_ckpt, x0_prediction=True)
    direct = attached(ddpm_ckpt, cnn_ckpt, x0_prediction=False)
    d = through.diffusion
    query, target = queries(2), torch.tensor([3, 5])
    t = torch.tensor([40, 40])
    x_t = d.to_model(query) * 0.7 + 0.3 * torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def step() -> GuidanceStep:
        x = x_t.clone().requires_grad_(True)
        eps = d.eps(x, t)
        x0 = x0_from_eps(x, eps, t, d.alphas_cumprod)
        return GuidanceStep(0, t, t - 1, x, eps, x0, torch.zeros_like(x), torch.zeros(2, 1, 1, 1))

    s_direct = step()
    g_c_direct, g_d_direct, _ = direct.guidance_terms(s_direct, query, target, None)
    # off: the gradient of log p(target | C(x0-hat)) taken at x0-hat itself, by hand
    x0 = s_direct.x0_hat.detach().requires_grad_(True)
    logp = direct.classifier(direct.classifier_input(x0)).log_softmax(-1).gather(1, target[:, None]).sum()
    torch.testing.assert_close(g_c_direct, torch.autograd.grad(logp, x0)[0])
    # on: the same gradient pulled back through the denoiser (vector-Jacobian product of x0-hat(x_t))
    s_through = step()
    g_c_through, g_d_through, _ = through.guidance_terms(s_through, query, target, None)
    s_ref = step()
    vjp_c = torch.autograd.grad(s_ref.x0_hat, s_ref.x_t, grad_outputs=g_c_direct, retain_graph=True)[0]
    vjp_d = torch.autograd.grad(s_ref.x0_hat, s_ref.x_t, grad_outputs=g_d_direct)[0]
    torch.testing.assert_close(g_c_through, vjp_c, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g_d_through, vjp_d, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(g_c_through, g_c_direct, atol=1e-6)


def test_x0_off_input_x_t_guides_with_the_classifier_on_the_noisy_sample(ddpm_ckpt, cnn_ckpt):
    noisy = attached(ddpm_ckpt, cnn_ckpt, x0_prediction=False, x0_off_input="x_t")
    at_x0 = attached(ddpm_ckpt, cnn_ckpt, x0_prediction=False)
    d = noisy.diffusion
    query, target = queries(2), torch.tensor([3, 5])
    t = torch.tensor([40, 40])
    x_t = d.to_model(query) * 0.7 + 0.3 * torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = d.eps(x_t, t)
        x0_hat = x0_from_eps(x_t, eps, t, d.alphas_cumprod)
    step = GuidanceStep(0, t, t - 1, x_t, eps, x0_hat, torch.zeros_like(x_t), torch.zeros(2, 1, 1, 1))
    g_c, g_d, terms = noisy.guidance_terms(step, query, target, None)
    # by hand: log p(target | C(x_t in image space)) differentiated at x_t (no denoiser involved)
    x = x_t.clone().requires_grad_(True)
    logp = noisy.classifier(noisy.classifier_input(x)).log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(g_c, torch.autograd.grad(logp.sum(), x)[0])
    torch.testing.assert_close(terms["log_prob"], logp.detach())
    # the distance term is the x0-hat reading's: only the classifier's input changed
    g_c_x0, g_d_x0, _ = at_x0.guidance_terms(step, query, target, None)
    torch.testing.assert_close(g_d, g_d_x0)
    assert not torch.allclose(g_c, g_c_x0, atol=1e-6)
    # recorded only when it is not the default, so runs made before the switch keep their fingerprint
    assert noisy.describe()["x0_off_input"] == "x_t"
    assert "x0_off_input" not in at_x0.describe()
    with pytest.raises(UserError, match="x0_off_input must be one of"):
        DVCE(diffusion=str(ddpm_ckpt), x0_off_input="noisy", num_steps=5).describe()


# ----------------------------------------------------------------------------- independence and seeds
def test_counterfactual_does_not_depend_on_chunk_mates_and_seed_reproduces(ddpm_ckpt, cnn_ckpt):
    method = attached(ddpm_ckpt, cnn_ckpt, augment=2)
    x = queries(4)
    full = method.optimise(batch_of(x, [1, 2, 3, 4], [10, 11, 12, 13]))
    alone = method.optimise(batch_of(x[2:3], [3], [12]))
    mixed = method.optimise(batch_of(torch.stack([x[0], x[2]]), [7, 3], [99, 12]))
    torch.testing.assert_close(alone["counterfactual"][0], full["counterfactual"][2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed["counterfactual"][1], full["counterfactual"][2], atol=1e-5, rtol=0)
    again = method.optimise(batch_of(x, [1, 2, 3, 4], [10, 11, 12, 13]))
    assert torch.equal(again["counterfactual"], full["counterfactual"])
    other_seed = method.optimise(batch_of(x[2:3], [3], [13]))
    assert not torch.allclose(other_seed["counterfactual"][0], alone["counterfactual"][0])
    assert full["stages"].shape == (4, 5, 1, 28, 28)
    torch.testing.assert_close(full["stages"][:, -1], full["counterfactual"])
    assert full["steps"].tolist() == [6] * 4 and full["final_probs"].shape == (4, 10)


def test_float64_runs_stay_float64_and_are_independent_to_rounding(ddpm_ckpt, cnn_ckpt):
    # what bench_diffusion's --precision 64 relies on to tell rounding from a real dependence
    method = attached(ddpm_ckpt, cnn_ckpt, num_steps=20, classifier_weight=0.5).double()
    x = queries(4).double()
    full = method.optimise(batch_of(x, [1, 2, 3, 4], [10, 11, 12, 13]))
    alone = method.optimise(batch_of(x[2:3], [3], [12]))
    assert full["counterfactual"].dtype == torch.float64 and full["final_probs"].dtype == torch.float64
    torch.testing.assert_close(alone["counterfactual"][0], full["counterfactual"][2], atol=1e-10, rtol=0)


def test_cone_with_the_explained_classifier_as_robust_one_changes_nothing(ddpm_ckpt, cnn_ckpt):
    batch = batch_of(queries(2), [1, 2], [10, 11])
    plain = attached(ddpm_ckpt, cnn_ckpt).optimise(batch)
    cone = attached(ddpm_ckpt, cnn_ckpt, cone=True, robust_classifier=str(cnn_ckpt))
    assert cone.robust is not None and "robust_classifier_sha256" in cone.describe()
    # the robust gradient equals the explained one: angle 0, inside every cone
    torch.testing.assert_close(cone.optimise(batch)["counterfactual"], plain["counterfactual"], atol=1e-5, rtol=0)


def test_guidance_moves_towards_the_target(ddpm_ckpt, cnn_ckpt):
    x = queries(4)
    batch = batch_of(x, [1, 2, 3, 4], [10, 11, 12, 13])
    plain = attached(ddpm_ckpt, cnn_ckpt, classifier_weight=0.0, distance_weight=0.0).optimise(batch)
    guided = attached(ddpm_ckpt, cnn_ckpt, classifier_weight=5.0, distance_weight=0.0).optimise(batch)
    target = batch["target"][:, None]
    p_plain, p_guided = plain["final_probs"].gather(1, target), guided["final_probs"].gather(1, target)
    assert float(p_guided.log().mean()) > float(p_plain.log().mean())


# ----------------------------------------------------------------------------- bad settings
def test_bad_settings_fail_before_any_model_is_loaded(ddpm_ckpt, cnn_ckpt):
    # settings are checked by describe() (what explain calls while planning, before any output)
    for tau in (0.0, 1.2):
        with pytest.raises(UserError, match="tau must be in"):
            DVCE(diffusion=str(ddpm_ckpt), tau=tau, num_steps=5).describe()
    with pytest.raises(UserError, match="cone: true needs a second, robust classifier"):
        DVCE(diffusion=str(ddpm_ckpt), cone=True, num_steps=5).describe()
    with pytest.raises(UserError, match="distance must be one of"):
        DVCE(diffusion=str(ddpm_ckpt), distance="l3", num_steps=5).describe()
    too_many = DVCE(diffusion=str(ddpm_ckpt), tau=0.5, num_steps=51)  # ddpm_tiny: 100-step schedule
    with pytest.raises(UserError, match="num_steps must be between 1 and round"):
        too_many.describe()
    with pytest.raises(UserError, match="not a lit_cf.models.DiffusionModel"):
        DVCE(diffusion=str(cnn_ckpt)).describe()
    method = DVCE(diffusion=str(ddpm_ckpt), num_steps=5)
    clf = load_module(cnn_ckpt, ImageClassifier)
    with pytest.raises(UserError, match=r"models images of shape \[1, 28, 28\]"):
        method.check_data(clf, (3, 28, 28))


def _expect_error(args: list[str], capsys, match: str, out: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists(), "a failed explain must leave no output behind"


def test_cli_errors_leave_no_output(ddpm_ckpt, cnn_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    _expect_error(
        explain_args(cnn_ckpt, out, f"--model.init_args.diffusion={ddpm_ckpt}", "--model.init_args.cone=true"),
        capsys,
        "needs a second, robust classifier",
        out,
    )
    _expect_error(
        explain_args(cnn_ckpt, out, f"--model.init_args.diffusion={ddpm_ckpt}", "--model.init_args.tau=1.5"),
        capsys,
        "tau must be in (0, 1]",
        out,
    )
    _expect_error(
        explain_args(cnn_ckpt, out, f"--model.init_args.diffusion={ddpm_ckpt}", "--model.init_args.num_steps=80"),
        capsys,
        "num_steps must be between",
        out,
    )
    _expect_error(
        explain_args(cnn_ckpt, out, f"--model.init_args.diffusion={cnn_ckpt}"), capsys, "not a lit_cf.models.DiffusionModel", out
    )
    _expect_error(explain_args(cnn_ckpt, out), capsys, "needs a DDPM", out)
    # a DDPM of other data (trained on the rendered digits, queries from MNIST): same shape, other data
    root = write_idx_dataset(tmp_path / "data", n_train=32, n_test=16)
    mnist = [f"--config={CONFIGS / 'data/mnist.yaml'}", f"--data.init_args.root={root}", "--data.init_args.val_size=8"]
    _expect_error(
        explain_args(
            cnn_ckpt,
            out,
            f"--model.init_args.diffusion={ddpm_ckpt}",
            "--num_queries=2",
            "--model.init_args.num_steps=5",
            data=mnist,
        ),
        capsys,
        "was trained on",
        out,
    )


# ----------------------------------------------------------------------------- the shipped config
def test_dvce_config_runs_as_shipped(ddpm_ckpt, cnn_ckpt, tmp_path):
    out = tmp_path / "dvce"
    main(
        explain_args(
            cnn_ckpt,
            out,
            f"--model.init_args.diffusion={ddpm_ckpt}",
            "--model.init_args.num_steps=5",
            "--num_queries=6",
            "--chunk_size=4",
        )
    )
    run = ExplainRun(out)
    assert len(run) == 6 and all(r["steps"] == 5 for r in run.manifest)
    assert run.tensor("stages").shape == (6, 5, 1, 28, 28)
    assert len(run.meta["method"]["diffusion_sha256"]) == 64
    assert os.path.getsize(out / "grids" / "grid-000.png") > 0
    assert (out / "grids" / "progression-000.png").exists()
    # an interrupted run (chunk 1 never committed, no manifest) resumes to the same result: a
    # record's counterfactual depends on its seed only, not on the process that made it
    reference = [r["final_target_prob"] for r in run.manifest], run.tensor("counterfactual"), run.tensor("stages")
    for name in ("chunk-000001.jsonl", "chunk-000001.safetensors"):
        (out / "shards" / name).unlink()
    (out / "manifest.jsonl").unlink()
    rundir = RunDir(out)  # run.json carries its own checksum: rewrite it through the run format
    rundir.write_meta({k: v for k, v in rundir.read_meta().items() if k not in ("version", "checksum")} | {"status": "running"})
    main(
        explain_args(
            cnn_ckpt,
            out,
            f"--model.init_args.diffusion={ddpm_ckpt}",
            "--model.init_args.num_steps=5",
            "--num_queries=6",
            "--chunk_size=4",
        )
    )
    resumed = ExplainRun(out)
    assert [r["final_target_prob"] for r in resumed.manifest] == reference[0]
    assert torch.equal(resumed.tensor("counterfactual"), reference[1])
    assert torch.equal(resumed.tensor("stages"), reference[2])
