"""DeepInversion (Yin et al., CVPR 2020) started from the query: image-space optimisation (ISO)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from lit_cf.explainers.base import CounterfactualMethod, cross_entropy_to_target, per_image_sum, seeded_uniform, tv_losses


def jitter_flip(x: Tensor, shifts: Tensor, flips: Tensor) -> Tensor:
    """Roll each image by its own ``(dy, dx)`` and mirror it horizontally where ``flips``."""
    b, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] - shifts[:, :1]) % h  # [B, H]
    j = torch.arange(w, device=x.device)[None, :].expand(b, -1)
    cols = (torch.where(flips[:, None], w - 1 - j, j) - shifts[:, 1:]) % w  # [B, W]: roll, then mirror
    idx_r = rows[:, None, :, None].expand(-1, x.shape[1], -1, w)
    out = x.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(-1, x.shape[1], h, -1)
    return out.gather(3, idx_c)


class DeepInversionCounterfactual(CounterfactualMethod):
    """DeepInversion losses on pixels initialised at the query.

    Loss per image (Yin et al.; weights default to their CIFAR settings rescaled to sums over
    pixels where noted): ``CE(f(jitter(x')), target) + tv_l1 TV_l1(x') + tv_l2 TV_l2(x')
    + l2 ||x'||_2 + bn_weight * sum_l w_l (||mu_l - rm_l||_2 + ||var_l - rv_l||_2)
    + proximity_weight ||x' - x||_2^2`` with ``w_1 = first_bn_multiplier`` and 1 for the
    other BatchNorm layers. Jitter (a random roll of up to ``jitter`` px) and horizontal flips
    are drawn per image and per step from the record's seed.

    ``bn_statistics`` chooses how ``mu_l, var_l`` are taken. ``per_image`` (default): the
    spatial mean and variance of each image's BN input, so the counterfactual of an image does
    not depend on its chunk-mates. ``batch``: the original DeepInversion batch statistics,
    which couple the images of a chunk (results then depend on the chunk composition).
    Classifiers without BatchNorm layers get no feature term.

    Args:
        steps: Maximum optimisation steps per image.
        lr: Adam learning rate on the pixels (DeepInversion: 0.1 for 2k steps from noise; a
            smaller rate suits starting from the query).
        tv_l1: Weight of the L1 total variation.
        tv_l2: Weight of the L2 total variation.
        l2: Weight of the image L2 norm prior.
        bn_weight: Weight of the BatchNorm statistics matching term.
        first_bn_multiplier: Extra weight of the first BatchNorm layer (DeepInversion: 10).
        bn_statistics: ``per_image`` or ``batch`` (see above).
        proximity_weight: Weight of ``||x' - x||_2^2`` (0 = pure DeepInversion from the query).
        jitter: Maximum random roll in pixels (0 disables).
        flip: Random horizontal flips (off by default for digits, where a mirror changes meaning).
        stop_probability: Stop an image once its target probability reaches this value.
        log_every: Log the loss terms every this many steps.
    """

    method_name = "deepinversion"

    def __init__(
        self,
        steps: int = 200,
        lr: float = 0.01,
        tv_l1: float = 0.0,
        tv_l2: float = 0.0025,
        l2: float = 0.0,
        bn_weight: float = 0.01,
        first_bn_multiplier: float = 10.0,
        bn_statistics: str = "per_image",
        proximity_weight: float = 0.0,
        jitter: int = 1,
        flip: bool = False,
        stop_probability: float | None = 0.9,
        log_every: int = 10,
    ) -> None:
        super().__init__(steps=steps, lr=lr, stop_probability=stop_probability, log_every=log_every)
        self.save_hyperparameters()
        if bn_statistics not in ("per_image", "batch"):
            raise ValueError(f"bn_statistics must be 'per_image' or 'batch', got {bn_statistics!r}")
        self.tv_l1, self.tv_l2, self.l2 = tv_l1, tv_l2, l2
        self.bn_weight, self.first_bn_multiplier, self.bn_statistics = bn_weight, first_bn_multiplier, bn_statistics
        self.proximity_weight, self.jitter, self.flip = proximity_weight, jitter, flip
        self._bn_inputs: list[tuple[nn.BatchNorm2d, Tensor]] = []
        self._draws: Tensor | None = None

    # BatchNorm inputs are captured with forward hooks while the loss forward pass runs
    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._bn_inputs.append((cast(nn.BatchNorm2d, module), inputs[0]))  # hooked on BatchNorm2d layers only

    def init_latents(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.bn_weight and getattr(self.classifier, "scripted", False) and not self.__dict__.get("_warned_scripted"):
            import warnings

            self.__dict__["_warned_scripted"] = True
            warnings.warn(
                "the classifier is TorchScript: its BatchNorm statistics cannot be observed, so DeepInversion runs without "
                "the BN term; give it as {module: ..., weights: <the TorchScript file>} to keep it",
                stacklevel=2,
            )
        if not self.has_hooks():  # removed again when the predict loop ends (CounterfactualMethod.remove_hooks)
            for m in self.attached_classifier().modules():
                if isinstance(m, nn.BatchNorm2d):
                    self.add_forward_hook(m, self._capture)
        # per record: 2 jitter offsets + 1 flip coin for every step, from the record's own seed
        self._draws = seeded_uniform(batch["seed"], (self.steps, 3), batch["image"].device)
        return {"x": batch["image"].clone()}

    def render(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return latents["x"]

    def project(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        latents["x"].clamp_(0, 1)

    def bn_loss(self) -> Tensor:
        """The BN statistics term per image ``[B]`` of the last forward pass (call it when a BatchNorm layer ran)."""
        total: Tensor | float = 0.0
        for i, (bn, h) in enumerate(self._bn_inputs):
            if self.bn_statistics == "per_image":
                mu, var = h.mean((2, 3)), h.var((2, 3), unbiased=False)  # [B, C]
            else:
                mu = h.mean((0, 2, 3)).expand(len(h), -1)
                var = h.var((0, 2, 3), unbiased=False).expand(len(h), -1)
            w = self.first_bn_multiplier if i == 0 else 1.0
            # the hooked layers track running statistics (eval mode uses them), so these are tensors
            running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
            total = total + w * ((mu - running_mean).norm(dim=1) + (var - running_var).norm(dim=1))
        return cast(Tensor, total)  # a tensor once one BatchNorm input was captured

    def loss_terms(
        self, x_cf: Tensor, logits: Tensor, latents: dict[str, Tensor], batch: dict[str, Tensor], step: int
    ) -> dict[str, Tensor]:
        assert self._draws is not None  # drawn by init_latents for this chunk
        draws = self._draws[:, step]
        shifts = ((draws[:, :2] * (2 * self.jitter + 1)).floor() - self.jitter).long()
        flips = (draws[:, 2] < 0.5) & self.flip
        self._bn_inputs = []
        logits_aug = self.attached_classifier()(jitter_flip(x_cf, shifts, flips))
        terms = {"cf": cross_entropy_to_target(logits_aug, batch["target"])}
        if self._bn_inputs and self.bn_weight:
            terms["bn"] = self.bn_weight * self.bn_loss()
        self._bn_inputs = []
        tv1, tv2 = tv_losses(x_cf)
        if self.tv_l1:
            terms["tv_l1"] = self.tv_l1 * tv1
        if self.tv_l2:
            terms["tv_l2"] = self.tv_l2 * tv2
        if self.l2:
            terms["l2"] = self.l2 * per_image_sum(x_cf * x_cf).sqrt()
        if self.proximity_weight:
            delta = x_cf - batch["image"]
            terms["proximity"] = self.proximity_weight * per_image_sum(delta * delta)
        return terms
