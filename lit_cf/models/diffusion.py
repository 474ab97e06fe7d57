"""A DDPM of the data (epsilon prediction, linear betas), trained by ``lit-cf fit``.

The model is the image prior of the diffusion counterfactual methods
(:mod:`lit_cf.explainers.diffusion_sampler`). It works in the classifiers' image space:
inputs and outputs of :meth:`DiffusionModel.to_model` / :meth:`DiffusionModel.to_image` are
images in ``[0, 1]`` of ``image_shape``; inside, images are scaled to ``[-1, 1]`` and padded
(or resized) to the denoiser's side ``model_size`` (e.g. 28 -> 32 px for a UNet with three
downsamplings).

The schedule math below is plain, batched and allows one timestep per image (``t`` is a
``LongTensor [B]``); ``t = -1`` stands for "clean" (``alpha_bar = 1``), the end of a reverse
chain. The noise schedule comes from diffusers' ``DDPMScheduler`` (``alphas_cumprod``), the
reverse steps are computed here from it, so guidance can shift a step's mean and the clean
estimate keeps its autograd graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from lit_cf.errors import UserError

RESIZE_MODES = ("pad", "resize")


# --------------------------------------------------------------------------- schedule math
def _alpha_bar(alphas_cumprod: Tensor, t: Tensor, ndim: int) -> Tensor:
    """``alpha_bar_t`` per image, shaped to broadcast over ``ndim``-d images; ``t = -1`` gives 1."""
    a = torch.where(t >= 0, alphas_cumprod[t.clamp_min(0)], torch.ones((), device=alphas_cumprod.device))
    return a.view(-1, *[1] * (ndim - 1))


def respaced_timesteps(num_train_timesteps: int, tau: float, num_steps: int) -> Tensor:
    """Descending timesteps of a respaced reverse chain that starts at noise level ``tau``.

    ``num_steps`` timesteps, evenly spaced (rounded) from ``round(tau * T) - 1`` down to 0, so
    ``tau = 0.5, num_steps = 100`` of ``T = 1000`` is DVCE's "step 100 of a 200-step grid".

    Raises:
        UserError: ``tau`` not in ``(0, 1]``, ``num_steps < 1``, or more steps than the
            schedule holds up to ``tau`` (``round(tau * T)``).
    """
    if not 0.0 < float(tau) <= 1.0:
        raise UserError(f"tau must be in (0, 1] (the share of the noise schedule to start from), got {tau}")
    start = int(round(float(tau) * num_train_timesteps))
    if num_steps < 1 or num_steps > start:
        raise UserError(
            f"num_steps must be between 1 and round(tau * T) = {start} for tau={tau} and a schedule of "
            f"{num_train_timesteps} steps, got {num_steps}: lower num_steps or raise tau"
        )
    if start == 0:
        raise UserError(f"tau={tau} is below one step of a {num_train_timesteps}-step schedule")
    return torch.linspace(start - 1, 0, num_steps).round().long()


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` with one ``t`` per image."""
    a = _alpha_bar(alphas_cumprod, t, x0.dim()).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The clean estimate ``x0-hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` (keeps the graph)."""
    a = _alpha_bar(alphas_cumprod, t, x_t.dim()).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddpm_posterior(x_t: Tensor, x0_hat: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``q(x_{t_prev} | x_t, x0_hat)`` on a respaced grid (``t_prev = -1``: clean).

    With ``beta' = 1 - a_t / a_prev``: mean ``= sqrt(a_prev) beta' / (1 - a_t) x0_hat +
    sqrt(1 - beta') (1 - a_prev) / (1 - a_t) x_t``, variance ``= beta' (1 - a_prev) / (1 - a_t)``
    (the "fixed small" variance of the respaced chain; 0 on the last step to ``t_prev = -1``).
    """
    # coefficients in float64: 1 - a_t cancels badly near t = 0
    a_t = _alpha_bar(alphas_cumprod, t, x_t.dim()).double()
    a_prev = _alpha_bar(alphas_cumprod, t_prev, x_t.dim()).double()
    beta = 1 - a_t / a_prev
    c0 = (a_prev.sqrt() * beta / (1 - a_t)).to(x_t.dtype)
    ct = ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)).to(x_t.dtype)
    return c0 * x0_hat + ct * x_t, (beta * (1 - a_prev) / (1 - a_t)).to(x_t.dtype)


def ddpm_step(x_t: Tensor, x0_hat: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """One stochastic respaced DDPM step: a sample of ``q(x_{t_prev} | x_t, x0_hat)``."""
    mean, var = ddpm_posterior(x_t, x0_hat, t, t_prev, alphas_cumprod)
    return mean + var.sqrt() * noise


def ddim_step(x_t: Tensor, x0_hat: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """One deterministic DDIM step (eta = 0): ``sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps``."""
    a_prev = _alpha_bar(alphas_cumprod, t_prev, x_t.dim()).to(x_t.dtype)
    return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps


def previous_timesteps(timesteps: Tensor) -> Tensor:
    """The step each timestep of a descending grid goes to (the next one; -1 after the last)."""
    return torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])


# --------------------------------------------------------------------------- the model
def default_denoiser(image_channels: int = 1, model_size: int = 32) -> nn.Module:
    """A small diffusers ``UNet2DModel`` (32/64/64 channels, one layer per block, no attention)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=model_size,
        in_channels=image_channels,
        out_channels=image_channels,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
    )


class DiffusionModel(L.LightningModule):
    """DDPM with an injected denoiser, an EMA of its weights, and diffusers' noise schedule.

    Training: ``x0`` = the batch's images scaled to ``[-1, 1]`` (and padded or resized to the
    denoiser's side), ``t`` uniform over the ``num_train_timesteps`` steps, loss = MSE between
    the denoiser's output and the noise (epsilon prediction). Schedule: diffusers'
    ``DDPMScheduler`` with linear betas from ``beta_start`` to ``beta_end``.

    EMA: a copy of the denoiser (``ema``) tracks the trained weights with decay
    ``min(ema_decay, (1 + n) / (10 + n))`` after optimiser step ``n`` (the usual warm-up), is
    saved in the checkpoint's ``state_dict`` and is what :meth:`eps` (sampling, explaining,
    validation) uses.

    Validation logs ``val/loss`` (EMA denoiser, seeded noise, comparable across epochs), a
    DDIM sample grid (``sample_steps`` steps, ``num_samples`` images, PNG under
    ``<log_dir>/ddpm_samples/`` and W&B) and, when ``classifier`` is set, ``val/round_trip``:
    the share of the first ``round_trip_images`` validation images whose classifier
    prediction survives noising to ``round_trip_tau`` and unguided DDIM denoising in
    ``round_trip_steps`` steps, ``C(F_tau(x)) = C(x)`` (ACE's criterion for choosing tau).

    The checkpoint also records the data it was trained on (``lit_cf_data``: datamodule class,
    dataset and image shape), which the explainers compare with the data they explain.

    Args:
        denoiser: ``nn.Module`` called as ``denoiser(x_t, t)`` returning the noise (or an
            object with ``.sample``, as diffusers' ``UNet2DModel``); ``None``:
            :func:`default_denoiser` (a ~1 M parameter UNet). Its input side is ``model_size``.
        image_shape: ``(C, H, W)`` of the images (the classifiers' input); checked against
            the datamodule when fitting.
        model_size: Side of the denoiser's square input (``None``: ``H``, no padding).
        resize: ``pad`` (centred, with ``pad_value``; 28 -> 32 px) or ``resize`` (bilinear).
        pad_value: Pixel value in ``[0, 1]`` of the padding (0 = black, MNIST's background).
        num_train_timesteps: Steps of the noise schedule (T).
        beta_start: First beta of the linear schedule.
        beta_end: Last beta of the linear schedule.
        ema_decay: EMA decay of the sampling weights (0: the EMA copies the trained weights).
        optimizer: Optimizer factory for the denoiser's parameters.
        classifier: Checkpoint of a lit-cf classifier for the validation round-trip score
            (``None``: not computed).
        round_trip_tau: Noise level of the round trip.
        round_trip_steps: DDIM steps of the round trip's denoising.
        round_trip_images: Validation images used for the round trip per epoch (the first ones).
        sample_steps: DDIM steps of the validation sample grid.
        num_samples: Images in the validation sample grid (0: no grid).
        seed: Seed of the validation noise (loss, round trip, samples).
    """

    alphas_cumprod: Tensor  # buffer, registered in __init__
    #: clean estimates are clipped to [-clip_value, clip_value] (images: [-1, 1] in denoiser space)
    clip_value: float = 1.0

    def __init__(
        self,
        denoiser: nn.Module | None = None,
        image_shape: Sequence[int] = (1, 28, 28),
        model_size: int | None = 32,
        resize: str = "pad",
        pad_value: float = 0.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        ema_decay: float = 0.999,
        optimizer: OptimizerCallable = torch.optim.Adam,
        classifier: str | None = None,
        round_trip_tau: float = 0.5,
        round_trip_steps: int = 20,
        round_trip_images: int = 1000,
        sample_steps: int = 20,
        num_samples: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        # under LightningCLI the saved hparams are the config (the denoiser's class_path and
        # init_args), which rebuilds it on load; a module passed in code cannot be saved safely
        injected = isinstance(denoiser, nn.Module) and not self._cli_hparams()
        self.save_hyperparameters(ignore=["denoiser"] if injected else None)
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
        model_size = int(model_size) if model_size is not None else image_shape[1]
        if resize == "pad" and (model_size < image_shape[1] or model_size < image_shape[2]):
            raise ValueError(f"model_size {model_size} is smaller than the images {image_shape[1:]}: use resize: resize")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        respaced_timesteps(
            num_train_timesteps, round_trip_tau, min(round_trip_steps, max(1, round(round_trip_tau * num_train_timesteps)))
        )
        self.image_shape: tuple[int, int, int] = image_shape
        self.model_size, self.resize, self.pad_value = model_size, resize, pad_value
        self.num_train_timesteps = num_train_timesteps
        self.ema_decay = ema_decay
        self.optimizer_factory = optimizer
        self.classifier_path = classifier
        self.round_trip_tau, self.round_trip_steps = round_trip_tau, round_trip_steps
        self.round_trip_images = round_trip_images
        self.sample_steps, self.num_samples, self.seed = sample_steps, num_samples, seed
        self.denoiser = denoiser if denoiser is not None else default_denoiser(image_shape[0], model_size)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            prediction_type="epsilon",
            clip_sample=False,
        )
        # recomputed from the hyperparameters, so not part of the state_dict
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.data_record: dict[str, Any] | None = None
        self._classifier: list[nn.Module] = []  # not a submodule: never saved with the DDPM
        self._rt_hits = self._rt_total = 0

    @staticmethod
    def _cli_hparams() -> bool:
        """Whether LightningCLI is instantiating us (it saves the config, not the module, as hparams)."""
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

        return _given_hyperparameters.get() is not None

    # ----------------------------------------------------------------- image space
    def to_model(self, x01: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` -> denoiser space in ``[-1, 1]`` (padded/resized)."""
        _, h, w = self.image_shape
        s = self.model_size
        if (h, w) != (s, s):
            if self.resize == "pad":
                top, left = (s - h) // 2, (s - w) // 2
                x01 = F.pad(x01, (left, s - w - left, top, s - h - top), value=self.pad_value)
            else:
                x01 = F.interpolate(x01, size=(s, s), mode="bilinear", align_corners=False)
        return x01 * 2 - 1

    def to_image(self, xm: Tensor) -> Tensor:
        """Inverse of :meth:`to_model`: back to ``image_shape`` in ``[0, 1]`` (not clamped)."""
        _, h, w = self.image_shape
        s = self.model_size
        x01 = (xm + 1) / 2
        if (h, w) != (s, s):
            if self.resize == "pad":
                top, left = (s - h) // 2, (s - w) // 2
                x01 = x01[..., top : top + h, left : left + w]
            else:
                x01 = F.interpolate(x01, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return x01

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """``(C, S, S)``: the shape of the denoiser's images (noise has this shape)."""
        return (self.image_shape[0], self.model_size, self.model_size)

    # ----------------------------------------------------------------- denoiser
    @staticmethod
    def _call(net: nn.Module, x_t: Tensor, t: Tensor) -> Tensor:
        out = net(x_t, t)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Noise prediction of the EMA denoiser; ``t``: ``LongTensor [B]``; differentiable w.r.t. ``x_t``."""
        return self._call(self.ema, x_t, t)

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        self.ema.eval()  # the EMA weights are only ever evaluated
        return self

    # ----------------------------------------------------------------- fit
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_shape = getattr(datamodule, "image_shape", None)
        if data_shape is not None and tuple(data_shape) != self.image_shape:
            raise UserError(
                f"DiffusionModel has image_shape={list(self.image_shape)} but {type(datamodule).__name__} yields "
                f"images of shape {list(data_shape)}: set model.init_args.image_shape to {list(data_shape)}"
            )
        if datamodule is not None and hasattr(datamodule, "describe"):
            self.data_record = data_identity(datamodule)
        if self.classifier_path and not self._classifier and stage in ("fit", "validate"):
            from lit_cf.models.base import ImageClassifier, freeze
            from lit_cf.utils.checkpoint import load_module

            self._classifier.append(freeze(load_module(self.classifier_path, ImageClassifier)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.data_record is not None:
            checkpoint["lit_cf_data"] = self.data_record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_record = checkpoint.get("lit_cf_data")

    def loss(self, x01: Tensor, generator: torch.Generator | None = None, use_ema: bool = False) -> Tensor:
        """Mean squared error of the predicted noise at uniform random timesteps."""
        x0 = self.to_model(x01)
        if generator is None:
            t = torch.randint(0, self.num_train_timesteps, (len(x0),), device=x0.device)
            noise = torch.randn_like(x0)
        else:
            t = torch.randint(0, self.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        pred = self.eps(x_t, t) if use_ema else self._call(self.denoiser, x_t, t)
        return F.mse_loss(pred.float(), noise.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA update of the sampling weights (after each optimiser step)."""
        n = self.global_step
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for e, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - decay)
        for eb, b in zip(self.ema.buffers(), self.denoiser.buffers()):
            eb.copy_(b)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.denoiser.parameters())

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._rt_hits = self._rt_total = 0
        for c in self._classifier:
            c.to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        g = torch.Generator().manual_seed(self.seed * 100_003 + batch_idx)
        self.log("val/loss", self.loss(x, generator=g, use_ema=True), prog_bar=True, batch_size=len(x), sync_dist=True)
        budget = self.round_trip_images - self._rt_total
        if self._classifier and budget > 0:
            x = x[:budget]
            noise = torch.randn((len(x), *self.model_shape), generator=g).to(x)
            clf = self._classifier[0]
            same = clf(self.round_trip(x, self.round_trip_tau, self.round_trip_steps, noise)).argmax(-1) == clf(x).argmax(-1)
            self._rt_hits += int(same.sum())
            self._rt_total += len(x)

    def on_validation_epoch_end(self) -> None:
        if self._rt_total:
            self.log("val/round_trip", self._rt_hits / self._rt_total, prog_bar=True, sync_dist=True)
        if self.num_samples > 0 and not self.trainer.sanity_checking:
            self.log_sample_grid()

    @torch.no_grad()
    def round_trip(self, x01: Tensor, tau: float, num_steps: int, noise: Tensor) -> Tensor:
        """``F_tau(x)``: noise ``x`` to ``tau`` with ``noise`` and denoise unguided (DDIM); images in ``[0, 1]``."""
        timesteps = respaced_timesteps(self.num_train_timesteps, tau, num_steps).to(x01.device)
        t0 = timesteps[:1].expand(len(x01))
        x_t = q_sample(self.to_model(x01), t0, noise, self.alphas_cumprod)
        return self.to_image(self.denoise(x_t, timesteps)).clamp(0, 1)

    @torch.no_grad()
    def denoise(self, x_t: Tensor, timesteps: Tensor, noise_fn: Callable[[int], Tensor] | None = None) -> Tensor:
        """Unguided reverse chain from ``x_t`` (at ``timesteps[0]``) to a clean image in denoiser space.

        DDIM (eta = 0) without ``noise_fn``; stochastic DDPM steps drawing ``noise_fn(k)`` at
        step ``k`` otherwise. The clean estimate is clipped to ``[-clip_value, clip_value]`` at
        each step (the image range ``[-1, 1]``; a latent DDPM's code range).
        """
        prev = previous_timesteps(timesteps)
        for k, (t, tp) in enumerate(zip(timesteps.tolist(), prev.tolist())):
            tt = torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)
            tp_ = torch.full_like(tt, tp)
            eps = self.eps(x_t, tt)
            x0 = x0_from_eps(x_t, eps, tt, self.alphas_cumprod).clamp(-self.clip_value, self.clip_value)
            if noise_fn is None:
                eps = (x_t - _alpha_bar(self.alphas_cumprod, tt, x_t.dim()).sqrt() * x0) / (
                    1 - _alpha_bar(self.alphas_cumprod, tt, x_t.dim())
                ).sqrt()
                x_t = ddim_step(x_t, x0, eps, tt, tp_, self.alphas_cumprod)
            else:
                x_t = ddpm_step(x_t, x0, tt, tp_, noise_fn(k), self.alphas_cumprod)
        return x_t

    @torch.no_grad()
    def sample(self, num: int, num_steps: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` unconditional DDIM samples in ``[0, 1]`` of ``image_shape``."""
        noise = torch.randn((num, *self.model_shape), generator=generator).to(self.device)
        timesteps = respaced_timesteps(self.num_train_timesteps, 1.0, num_steps).to(self.device)
        return self.to_image(self.denoise(noise, timesteps)).clamp(0, 1)

    def log_sample_grid(self) -> Path | None:
        """Write a DDIM sample grid of the EMA model (PNG in the log folder, W&B image)."""
        from torchvision.utils import make_grid, save_image

        images = self.sample(self.num_samples, self.sample_steps, torch.Generator().manual_seed(self.seed))
        grid = make_grid(images.float().cpu(), nrow=int(self.num_samples**0.5 + 0.999), padding=2, pad_value=0.5)
        path = None
        if self.trainer.is_global_zero and self.trainer.log_dir is not None:
            path = Path(self.trainer.log_dir) / "ddpm_samples" / f"epoch={self.current_epoch:03d}-step={self.global_step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, path)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/ddpm_samples", images=[grid], step=self.global_step)
        return path


def round_trip_noise(model: DiffusionModel, n: int, seed: int) -> Tensor:
    """The round trip's noise of ``n`` images: drawn once, in order, from ``seed`` (on the CPU)."""
    return torch.randn((n, *model.model_shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def round_trip_scores(
    model: DiffusionModel,
    classifier: nn.Module,
    images: Tensor,
    taus: Sequence[float],
    num_steps: int = 20,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[float, float]:
    """Share of ``images`` whose classifier prediction survives the round trip ``F_tau`` per ``tau``.

    ``F_tau(x)``: noise ``x`` to ``tau`` and denoise unguided with ``num_steps`` DDIM steps
    (:meth:`DiffusionModel.round_trip`). The noise of image ``i`` is the same for every ``tau``
    (drawn once, in order, from ``seed``), so the rows of a table are paired; batching does not
    change the result.
    """
    device = model.alphas_cumprod.device
    noise = round_trip_noise(model, len(images), seed)
    preds = torch.cat(
        [classifier(images[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(images), batch_size)]
    )
    scores = {}
    for tau in taus:
        kept = 0
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            out = model.round_trip(
                x, tau, min(num_steps, round(tau * model.num_train_timesteps)), noise[i : i + batch_size].to(device)
            )
            kept += int((classifier(out).argmax(-1).cpu() == preds[i : i + batch_size]).sum())
        scores[float(tau)] = kept / max(1, len(images))
    return scores


def data_identity(datamodule: Any) -> dict[str, Any]:
    """What identifies a model's training data: datamodule class, dataset name and image shape."""
    info = datamodule.describe() if hasattr(datamodule, "describe") else {}
    return {
        "datamodule": info.get("datamodule", f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"),
        "dataset": info.get("dataset"),
        "image_shape": list(getattr(datamodule, "image_shape", info.get("image_shape", []))),
    }


__all__ = [
    "DiffusionModel",
    "data_identity",
    "ddim_step",
    "ddpm_posterior",
    "ddpm_step",
    "default_denoiser",
    "previous_timesteps",
    "q_sample",
    "respaced_timesteps",
    "round_trip_noise",
    "round_trip_scores",
    "x0_from_eps",
]
