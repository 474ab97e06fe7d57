"""Feature extractors injected into lit-cf's classifiers.

Every backbone maps ``[B, C, H, W]`` images to ``[B, out_features]`` features and exposes
``out_features`` so that heads (linear, DUQ RBF) can be sized without repeating numbers in
configs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import resnet18


class ConvNet(nn.Module):
    """A small VGG-style CNN for 28x28 inputs: ``[conv3x3 -> (BN) -> ReLU -> maxpool] x k -> FC``.

    Defaults follow the classifier of the Counterfactual Attacks MNIST code (conv32, conv64,
    FC128). ``ConvNet(channels=(64, 128, 128), hidden=256, batch_norm=True)`` is the DUQ
    paper's Fashion-MNIST feature extractor.

    Args:
        in_channels: Image channels.
        channels: Output channels of each conv block (each block halves the resolution).
        hidden: Width of the final fully connected feature layer.
        batch_norm: Insert BatchNorm after each convolution.
        image_size: Input height/width, used to size the FC layer.
        dropout: Dropout before the FC layer (0 disables).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = False,
        image_size: int = 28,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_prev, size = in_channels, image_size
        for c in channels:
            layers.append(nn.Conv2d(c_prev, c, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_prev, size = c, size // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(c_prev * size * size, hidden),
            nn.ReLU(inplace=True),
        )
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNet18(nn.Module):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32-64 px images.

    Built from torchvision's definition with random initialisation (no pretrained weights
    exist offline); the classification layer is removed so ``out_features`` is 512.

    Args:
        in_channels: Image channels.
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.out_features = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
