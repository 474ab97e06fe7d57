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
    FC128). The DUQ reference code's Fashion-MNIST feature extractor is
    ``ConvNet(channels=(64, 128, 128), hidden=256, batch_norm=True, padding=(1, 1, 0))``: its
    third convolution is unpadded (28 -> 14 -> 7 -> conv 5 -> pool 2), so the FC layer maps
    2*2*128 = 512 features to 256 (354,048 parameters). With the default padding (every conv
    padded) the same channels give 3x3 maps and a 1152 -> 256 FC layer instead.

    Args:
        in_channels: Image channels.
        channels: Output channels of each conv block (each block max-pools by 2).
        hidden: Width of the final fully connected feature layer.
        batch_norm: Insert BatchNorm after each convolution.
        image_size: Input height/width, used to size the FC layer.
        dropout: Dropout before the FC layer (0 disables).
        padding: Zero padding of each 3x3 convolution, one entry per block (``None``: 1 for
            every block, which keeps the resolution until the pool; checkpoints saved before
            this switch existed were built that way).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = False,
        image_size: int = 28,
        dropout: float = 0.0,
        padding: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        pads = [1] * len(channels) if padding is None else [int(p) for p in padding]
        if len(pads) != len(channels) or any(p < 0 for p in pads):
            raise ValueError(f"padding needs one non-negative entry per conv block ({len(channels)}), got {padding}")
        layers: list[nn.Module] = []
        c_prev, size = in_channels, image_size
        for block, (c, pad) in enumerate(zip(channels, pads), 1):
            layers.append(nn.Conv2d(c_prev, c, 3, padding=pad))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_prev, size = c, (size + 2 * pad - 2) // 2
            if size < 1:
                raise ValueError(
                    f"ConvNet: a {image_size}px input shrinks to nothing at block {block}; use fewer blocks or more padding"
                )
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
    exist offline). By default the classification layer is removed, so the features are the
    512 pooled activations. The DUQ reference code's CIFAR-10 extractor keeps torchvision's
    final linear layer as a feature layer (``model_output_size`` = 512, no activation after
    it): ``ResNet18(fc_features=512)``.

    Args:
        in_channels: Image channels.
        fc_features: ``None`` (default; checkpoints saved before this switch existed): no
            final linear layer, ``out_features`` is 512. An integer: keep a linear layer
            512 -> ``fc_features`` as the last feature layer (the DUQ reference).
    """

    def __init__(self, in_channels: int = 3, fc_features: int | None = None) -> None:
        super().__init__()
        if fc_features is not None and fc_features < 1:
            raise ValueError(f"fc_features must be >= 1 or None, got {fc_features}")
        net = resnet18(weights=None, num_classes=fc_features or 1000)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        if fc_features is None:
            net.fc = nn.Identity()
        self.net = net
        self.out_features = fc_features or 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
