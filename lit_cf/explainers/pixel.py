"""Gradient counterfactuals in pixel space (Wachter et al. style): the adversarial baseline."""

from __future__ import annotations

from torch import Tensor

from lit_cf.explainers.base import CounterfactualMethod, cross_entropy_to_target, per_image_sum


class PixelCounterfactual(CounterfactualMethod):
    """Optimise the pixels of the query towards the target class.

    Loss per image: ``CE(f(x'), target) + l1_weight * |x' - x|_1 + l2_weight * ||x' - x||_2^2``,
    with ``x'`` projected onto ``[0, 1]`` after every step. Without a strong prior this
    typically yields adversarial examples: tiny, diffuse edits that flip the classifier but
    not an independent observer; lit-cf keeps it as the baseline that shows this.

    Args:
        steps: Maximum optimisation steps per image.
        lr: Adam learning rate on the pixels.
        l1_weight: Weight of the L1 proximity term.
        l2_weight: Weight of the squared L2 proximity term.
        stop_probability: Stop an image once its target probability reaches this value.
        log_every: Log the loss terms every this many steps.
    """

    def __init__(
        self,
        steps: int = 200,
        lr: float = 0.01,
        l1_weight: float = 0.0,
        l2_weight: float = 0.01,
        stop_probability: float | None = 0.9,
        log_every: int = 10,
    ) -> None:
        super().__init__(steps=steps, lr=lr, stop_probability=stop_probability, log_every=log_every)
        self.save_hyperparameters()
        self.l1_weight, self.l2_weight = l1_weight, l2_weight

    def init_latents(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["image"].clone()}

    def render(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return latents["x"]

    def project(self, latents: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        latents["x"].clamp_(0, 1)

    def loss_terms(
        self, x_cf: Tensor, logits: Tensor, latents: dict[str, Tensor], batch: dict[str, Tensor], step: int
    ) -> dict[str, Tensor]:
        delta = x_cf - batch["image"]
        terms = {"cf": cross_entropy_to_target(logits, batch["target"])}
        if self.l1_weight:
            terms["l1"] = self.l1_weight * per_image_sum(delta.abs())
        if self.l2_weight:
            terms["l2"] = self.l2_weight * per_image_sum(delta * delta)
        return terms
