"""LatentDiffusionModel: code space, training signal, a self-contained checkpoint, DVCE on it, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_cf.cli import main
from lit_cf.errors import UserError
from lit_cf.explainers.diffusion_sampler import load_diffusion
from lit_cf.models import AutoEncoder, LatentDenoiser, LatentDiffusionModel
from lit_cf.runs import ExplainRun
from lit_cf.utils.checkpoint import load_module
from tests.conftest import CONFIGS, fit_checkpoint
from tests.explainers.test_dvce import RENDERED, explain_args

pytestmark = pytest.mark.usefixtures("single_thread")

AE_ARGS = (
    "--model.init_args.channels=[4,8]",
    "--model.init_args.latent_dim=8",
)
LATENT_ARGS = (
    "--model.init_args.autoencoder.init_args.channels=[4,8]",
    "--model.init_args.autoencoder.init_args.latent_dim=8",
    "--model.init_args.hidden=32",
    "--model.init_args.blocks=1",
    "--model.init_args.num_train_timesteps=100",
    "--model.init_args.round_trip_steps=5",
    "--model.init_args.round_trip_images=16",
    "--model.init_args.sample_steps=5",
    "--model.init_args.num_samples=4",
    "--model.init_args.stats_images=64",
)


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    return fit_checkpoint(tmp_path_factory.mktemp("ae"), "model/autoencoder.yaml", *AE_ARGS, "--trainer.max_epochs=2")


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, ae_ckpt) -> Path:
    return fit_checkpoint(
        tmp_path_factory.mktemp("ldm"),
        "model/latent_ddpm_mnist.yaml",
        *LATENT_ARGS,
        f"--model.init_args.autoencoder_weights={ae_ckpt}",
    )


def small_model() -> LatentDiffusionModel:
    torch.manual_seed(0)
    ae = AutoEncoder(in_channels=1, image_size=28, channels=(4, 8), latent_dim=8)
    return LatentDiffusionModel(ae, hidden=32, blocks=1, num_train_timesteps=100)


def test_denoiser_maps_codes_to_codes_per_image():
    net = LatentDenoiser(8, hidden=16, blocks=2)
    x, t = torch.randn(3, 8, 1, 1), torch.tensor([0, 50, 99])
    out = net(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(net(x[1:2], t[1:2]), out[1:2])  # LayerNorm per image: chunk-mates do not matter


def test_code_space_is_standardised_and_decodes_to_images():
    model = small_model()
    x = torch.rand(16, 1, 28, 28)
    with pytest.raises(UserError, match="no code statistics"):
        model.to_model(x)
    z = model.autoencoder.encode(x).detach()
    model.latent_mean.copy_(z.mean(0))
    model.latent_std.copy_(z.std(0))
    codes = model.to_model(x)
    assert codes.shape == (16, 8, 1, 1) and model.model_shape == (8, 1, 1)
    torch.testing.assert_close(codes.flatten(1).std(0), torch.ones(8), atol=1e-4, rtol=1e-4)  # unit variance
    assert model.clip_value == 4.0
    torch.testing.assert_close(model.to_image(codes), model.autoencoder.decode(z), atol=1e-5, rtol=1e-5)


def test_loss_falls_and_only_the_denoiser_learns():
    model = small_model()
    x = torch.rand(32, 1, 28, 28)
    z = model.autoencoder.encode(x).detach()
    model.latent_mean.copy_(z.mean(0))
    model.latent_std.copy_(z.std(0))
    ae_before = [p.clone() for p in model.autoencoder.parameters()]
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = float(model.loss(x, generator=torch.Generator().manual_seed(1)))
    for _ in range(150):
        opt.zero_grad()
        model.loss(x, generator=g).backward()
        opt.step()
    last = float(model.loss(x, generator=torch.Generator().manual_seed(1)))
    assert last < 0.7 * first
    assert all(torch.equal(a, b) for a, b in zip(ae_before, model.autoencoder.parameters()))


def test_fitted_checkpoint_is_self_contained(latent_ckpt, ae_ckpt):
    model = load_diffusion(latent_ckpt)
    assert isinstance(model, LatentDiffusionModel) and bool((model.latent_std > 0).all())
    ae = load_module(ae_ckpt, AutoEncoder)
    for k, v in ae.state_dict().items():
        torch.testing.assert_close(model.autoencoder.state_dict()[k], v)  # the autoencoder's weights travel inside
    x = torch.rand(4, 1, 28, 28)
    out = model.round_trip(x, 0.5, 5, torch.randn(4, *model.model_shape))
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1


def test_dvce_explains_with_a_latent_ddpm_and_fastdime_refuses_it(latent_ckpt, cnn_ckpt, tmp_path, capsys):
    out = tmp_path / "dvce"
    main(
        explain_args(
            cnn_ckpt,
            out,
            f"--model.init_args.diffusion={latent_ckpt}",
            "--model.init_args.num_steps=5",
            "--num_queries=3",
            "--chunk_size=3",
            data=RENDERED,
        )
    )
    run = ExplainRun(out)
    assert len(run.manifest) == 3 and run.tensor("counterfactual").shape == (3, 1, 28, 28)
    bad = tmp_path / "fastdime"
    args = [
        "explain",
        *RENDERED,
        f"--config={CONFIGS / 'explain/fastdime.yaml'}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--classifier={cnn_ckpt}",
        f"--output_dir={bad}",
        f"--model.init_args.diffusion={latent_ckpt}",
    ]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2 and "cannot use the latent DDPM" in capsys.readouterr().err
    assert not bad.exists()


def test_fit_refuses_missing_or_mismatched_autoencoder_weights(ae_ckpt, tmp_path, capsys):
    for extra, match in (
        ((), "needs the trained autoencoder"),
        (
            (f"--model.init_args.autoencoder_weights={ae_ckpt}", "--model.init_args.autoencoder.init_args.latent_dim=16"),
            "do not match the config's autoencoder architecture",
        ),
    ):
        with pytest.raises(SystemExit) as err:
            fit_checkpoint(tmp_path / f"bad{len(extra)}", "model/latent_ddpm_mnist.yaml", *LATENT_ARGS, *extra)
        assert err.value.code == 2 and match in capsys.readouterr().err
