"""Projected gradient descent (Madry et al., 2018) for adversarial training."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class PGD:
    """L2 or Linf PGD in pixel space ``[0, 1]``, used by :class:`Classifier` for robust training.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: Radius of the perturbation ball.
        step_size: Size of each ascent step (Linf: sign step; L2: normalised gradient step).
        steps: Number of ascent steps.
        random_start: Start from a uniform point in the ball.
    """

    def __init__(
        self,
        norm: str = "l2",
        eps: float = 1.5,
        step_size: float = 0.375,
        steps: int = 7,
        random_start: bool = True,
    ) -> None:
        if norm not in ("l2", "linf"):
            raise ValueError(f"PGD norm must be 'l2' or 'linf', got {norm!r}")
        if eps <= 0 or step_size <= 0 or steps < 1:
            raise ValueError("PGD needs eps > 0, step_size > 0 and steps >= 1")
        self.norm, self.eps, self.step_size, self.steps, self.random_start = norm, eps, step_size, steps, random_start

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
        return delta * (self.eps / norms).clamp(max=1.0)

    def _step(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
        return self.step_size * grad / norms

    def __call__(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial images ``x + delta`` (detached) that increase the CE of ``model``."""
        x = x.detach()
        if self.random_start:
            delta = self._project(torch.empty_like(x).uniform_(-self.eps, self.eps))
        else:
            delta = torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x + delta), y)
                (grad,) = torch.autograd.grad(loss, delta)
            delta = self._project(delta.detach() + self._step(grad))
            delta = ((x + delta).clamp(0, 1) - x).detach()
        return (x + delta).detach()
