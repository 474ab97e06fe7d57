"""DiffusionModel: schedule math, image space, training signal, EMA, configs and safe loading."""

from __future__ import annotations

import csv

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from lit_cf.errors import UserError
from lit_cf.explainers.diffusion_sampler import load_diffusion
from lit_cf.models import DiffusionModel, ImageClassifier
from lit_cf.models.diffusion import (
    ddim_step,
    ddpm_posterior,
    ddpm_step,
    q_sample,
    respaced_timesteps,
    round_trip_scores,
    x0_from_eps,
)
from tests.conftest import CONFIGS, fit_checkpoint
from tests.fixtures import write_celeba_fixture

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_unet(channels: int = 1, size: int = 28) -> UNet2DModel:
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
    )


def tiny_model(**kwargs) -> DiffusionModel:
    kwargs.setdefault("denoiser", tiny_unet())
    kwargs.setdefault("model_size", 28)
    kwargs.setdefault("num_train_timesteps", 100)
    return DiffusionModel(**kwargs)


# ----------------------------------------------------------------------------- schedule
def test_schedule_is_diffusers_linear_and_posterior_matches_the_formula():
    model = tiny_model(num_train_timesteps=1000)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(model.alphas_cumprod, sched.alphas_cumprod.float())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    ac = model.alphas_cumprod
    x_t = q_sample(x0, t, noise, ac)
    torch.testing.assert_close(x0_from_eps(x_t, noise, t, ac), x0, atol=1e-3, rtol=1e-3)
    # consecutive steps: the textbook posterior from diffusers' betas (which equal 1 - a_t / a_{t-1}
    # up to float32 rounding of the cumulative product, hence the tolerance)
    tp = t - 1
    mean, var = ddpm_posterior(x_t, x0, t, tp, ac)
    betas, alphas = sched.betas.float(), sched.alphas.float()
    a_prev = torch.where(tp >= 0, ac[tp.clamp_min(0)], torch.ones(()))
    c1 = (betas[t] * a_prev.sqrt() / (1 - ac[t])).view(-1, 1, 1, 1)
    c2 = ((1 - a_prev) * alphas[t].sqrt() / (1 - ac[t])).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * x_t, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(var.flatten(), betas[t] * (1 - a_prev) / (1 - ac[t]), atol=1e-7, rtol=1e-3)
    # the step to clean returns x0 exactly (zero variance), for DDPM and DDIM
    clean = torch.full_like(t, -1)
    torch.testing.assert_close(ddpm_step(x_t, x0, t, clean, noise, ac), x0)
    torch.testing.assert_close(ddim_step(x_t, x0, noise, t, clean, ac), x0)


def test_respaced_timesteps_and_bad_settings():
    ts = respaced_timesteps(1000, 0.5, 100)
    assert ts[0] == 499 and ts[-1] == 0 and len(ts) == 100 and bool((ts[1:] < ts[:-1]).all())
    assert respaced_timesteps(100, 1.0, 100).tolist() == list(range(99, -1, -1))
    for tau in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="tau must be in"):
            respaced_timesteps(1000, tau, 10)
    with pytest.raises(UserError, match="num_steps must be between 1 and round"):
        respaced_timesteps(100, 0.5, 51)


def test_image_space_pads_and_inverts():
    model = tiny_model(denoiser=tiny_unet(size=32), model_size=32)
    x = torch.rand(2, 1, 28, 28)
    xm = model.to_model(x)
    assert xm.shape == (2, 1, 32, 32) and model.model_shape == (1, 32, 32)
    assert xm.min() >= -1 and xm.max() <= 1
    assert bool((xm[..., :2, :] == -1).all())  # padding is black (pad_value 0)
    torch.testing.assert_close(model.to_image(xm), x)
    resized = tiny_model(denoiser=tiny_unet(size=32), model_size=32, resize="resize")
    assert resized.to_image(resized.to_model(x)).shape == x.shape
    with pytest.raises(ValueError, match="smaller than the images"):
        tiny_model(model_size=16)


# ----------------------------------------------------------------------------- training
def test_ddpm_loss_falls_on_a_tiny_set_and_ema_tracks_the_weights():
    torch.manual_seed(0)
    model = tiny_model(ema_decay=0.5)
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0  # one bar: easy to learn
    before = model.loss(x, generator=torch.Generator().manual_seed(1)).item()
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
    after = model.loss(x, generator=torch.Generator().manual_seed(1)).item()
    assert after < 0.6 * before, (before, after)
    # the EMA is what eps() uses; an update moves it towards the trained weights
    p, e = next(model.denoiser.parameters()), next(model.ema.parameters())
    gap = (p - e).abs().sum().item()
    assert gap > 0
    model.update_ema()
    assert (p - e).abs().sum().item() < gap
    assert not any(q.requires_grad for q in model.ema.parameters())
    assert any(k.startswith("ema.") for k in model.state_dict())


def test_round_trip_scores_are_shares_and_do_not_depend_on_batching():
    torch.manual_seed(0)
    model = tiny_model().eval()
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    images = torch.rand(10, 1, 28, 28)
    a = round_trip_scores(model, clf, images, [0.2, 1.0], num_steps=3, batch_size=4)
    b = round_trip_scores(model, clf, images, [0.2, 1.0], num_steps=3, batch_size=10)
    assert a == b and set(a) == {0.2, 1.0}
    assert all(v * 10 == round(v * 10) and 0 <= v <= 1 for v in a.values())


# ----------------------------------------------------------------------------- configs
def test_ddpm_tiny_config_fits_logs_round_trip_and_loads_safely(cnn_ckpt, tmp_path):
    ckpt = fit_checkpoint(tmp_path, "model/ddpm_tiny.yaml", f"--model.init_args.classifier={cnn_ckpt}")
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    trips = [float(r["val/round_trip"]) for r in rows if r.get("val/round_trip")]
    assert trips and all(0.0 <= v <= 1.0 for v in trips)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert list(tmp_path.rglob("ddpm_samples/*.png"))
    model = load_diffusion(ckpt)
    assert isinstance(model, DiffusionModel) and model.image_shape == (1, 28, 28)
    assert model.data_record["datamodule"].endswith("RenderedDigitsDataModule")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the round-trip classifier is never part of the DDPM's weights
    assert not any(isinstance(m, ImageClassifier) for m in model.modules())


def test_load_diffusion_rejects_other_models(cnn_ckpt, tmp_path):
    with pytest.raises(UserError, match="not a DiffusionModel"):
        load_diffusion(cnn_ckpt)
    with pytest.raises(UserError, match="not found"):
        load_diffusion(tmp_path / "missing.ckpt")


def test_fit_rejects_an_image_shape_other_than_the_data(tmp_path):
    with pytest.raises(SystemExit) as err:
        fit_checkpoint(tmp_path, "model/ddpm_tiny.yaml", "--model.init_args.image_shape=[3,28,28]")
    assert err.value.code == 2


SMALL_GRID = [
    "--model.init_args.num_samples=4",
    "--model.init_args.sample_steps=2",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
]


def test_ddpm_mnist_config_fits(tmp_path):
    model = load_diffusion(fit_checkpoint(tmp_path, "model/ddpm_mnist.yaml", *SMALL_GRID))
    assert model.model_shape == (1, 32, 32) and model.num_train_timesteps == 1000


def test_ddpm_celeba_config_fits(tmp_path):
    root = write_celeba_fixture(tmp_path / "data", n=24)
    ckpt = fit_checkpoint(
        tmp_path,
        "model/ddpm_celeba.yaml",
        *SMALL_GRID,
        f"--data.init_args.root={root}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
        "--model.init_args.image_shape=[3,32,32]",
        "--model.init_args.model_size=32",
        "--model.init_args.denoiser.init_args.sample_size=32",
        data_config="data/celeba.yaml",
    )
    assert load_diffusion(ckpt).image_shape == (3, 32, 32)
    assert (CONFIGS / "model/ddpm_celeba.yaml").exists()
