"""Counterfactual attributions: descriptor predictors and local / global descriptor scores."""

from lit_cf.attribution.predictors import (
    MNIST_DESCRIPTOR_NAMES,
    DescriptorTargets,
    LinearPredictors,
    descriptor_targets,
    encode_dataset,
    fit_linear_predictors,
    mnist_descriptors,
)
from lit_cf.attribution.scores import attribute_run, global_attribution, local_attributions

__all__ = [
    "MNIST_DESCRIPTOR_NAMES",
    "DescriptorTargets",
    "LinearPredictors",
    "attribute_run",
    "descriptor_targets",
    "encode_dataset",
    "fit_linear_predictors",
    "global_attribution",
    "local_attributions",
    "mnist_descriptors",
]
