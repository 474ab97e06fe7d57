"""Tiny generated image folders and user-style models (torchvision ResNet-18) for the tests.

Deterministic in ``seed``. Class ``k`` of a folder paints a bright square in colour channel
``k % 3`` at a class-dependent corner over noise, so a few optimisation steps learn something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("cat", "dog", "fox")


def image_array(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 image of class ``k``."""
    img = rng.integers(0, 60, size=(size, size, 3)).astype(np.int16)
    s = size // 2
    r, c = [(0, 0), (s, s), (0, s)][k % 3]
    img[r : r + s, c : c + s, k % 3] += 180
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image_folder(
    root: str | Path, per_class: int = 4, size: int = 20, classes=CLASSES, seed: int = 0, flat: bool = False
) -> Path:
    """Write ``root/<class>/<i>.png`` (or, ``flat``, ``root/<class>_<i>.png``) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(image_array(k, size, rng)).save(folder / (f"{name}_{i:02d}.png" if flat else f"{i:02d}.png"))
    return root


def tiny_resnet(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet-18 (random init, seeded)."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def fit_steps(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 5, lr: float = 1e-3
) -> torch.nn.Module:
    """A few Adam steps of cross-entropy on normalised images (what a user would have done elsewhere)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model((images - mean) / std), labels).backward()
        opt.step()
    return model.eval()
