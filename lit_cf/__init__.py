"""lit-cf: train image classifiers and explain them with visual counterfactuals."""

__version__ = "0.1.0"
