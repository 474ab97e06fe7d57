"""Feature networks for the metrics: in-project networks stand in for Inception/VGG/AlexNet.

No pretrained weights can be downloaded here, so perceptual and realism metrics run on a network
lit-cf trained itself on the same data (their outputs say ``_domain``). Two adapters:

* :class:`ClassifierFeatures` maps images in ``[0, 1]`` to a classifier's penultimate features
  ``[B, d]`` (its own input normalisation, then its backbone): the usual feature extractor for
  :class:`~lit_cf.metrics.realism.DomainFID` / :class:`~lit_cf.metrics.realism.SplitFID`.
* :class:`FeatureMaps` returns the outputs of named submodules of a network as a list of
  feature maps: the input of :class:`~lit_cf.metrics.closeness.PerceptualDistance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn


class ClassifierFeatures(nn.Module):
    """``backbone(normalize(x))`` of a lit-cf classifier, for images in ``[0, 1]``.

    Works with any module exposing ``backbone`` (and optionally ``normalize``), e.g.
    :class:`~lit_cf.models.Classifier` and :class:`~lit_cf.models.DUQClassifier`. The output is
    flattened to ``[B, d]``; ``num_features`` (``d``) is taken from ``backbone.out_features``.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        backbone = getattr(classifier, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"{type(classifier).__name__} has no `backbone` module")
        self.classifier = classifier
        self.num_features = getattr(backbone, "out_features", None)

    def forward(self, x: Tensor) -> Tensor:
        normalize = getattr(self.classifier, "normalize", None)
        if callable(normalize):
            x = normalize(x)
        return cast(nn.Module, self.classifier.backbone)(x).flatten(1)


class FeatureMaps(nn.Module):
    """Outputs of the submodules ``layers`` of ``network`` (names as in ``named_modules``).

    Forward hooks are registered only for the duration of one call, so the network can be
    shared with other code. Captured outputs are cloned (a following in-place ReLU would
    otherwise overwrite them). The whole network is run; its own output is discarded.

    Args:
        network: Any module; it is called on the images as given.
        layers: Names of its submodules whose outputs are returned, in this order.
    """

    def __init__(self, network: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        if isinstance(layers, str) or len(layers) == 0:
            raise ValueError("layers must be a non-empty sequence of submodule names")
        modules = dict(network.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"{type(network).__name__} has no submodules {missing}")
        self.network = network
        self.layers = list(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        modules = dict(self.network.named_modules())
        captured: dict[str, Tensor] = {}
        handles = []

        def make_hook(name: str):
            def hook(module: nn.Module, args: object, output: Tensor) -> None:
                captured[name] = output.clone()

            return hook

        try:
            for name in self.layers:
                handles.append(modules[name].register_forward_hook(make_hook(name)))
            self.network(x)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[name] for name in self.layers]


def as_feature_list(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A network output as a list of feature maps ``[B, C, ...]``."""
    if isinstance(features, Tensor):
        return [features]
    out = list(features)
    if not out or not all(isinstance(f, Tensor) for f in out):
        raise TypeError("a feature network must return a tensor or a non-empty list of tensors")
    return out


@torch.no_grad()
def infer_num_features(network: nn.Module, input_shape: Sequence[int]) -> int:
    """Feature dimension of ``network`` from one random image of ``input_shape`` ``(C, H, W)``."""
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = network(torch.rand(1, *input_shape, device=device))
    return int(out.flatten(1).shape[-1])
