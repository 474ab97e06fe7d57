"""Counterfactual methods (one file per method) and the explain engine."""

from lit_cf.explainers.ace import ACE
from lit_cf.explainers.base import CounterfactualMethod
from lit_cf.explainers.deepinversion import DeepInversionCounterfactual
from lit_cf.explainers.diffusion_base import DiffusionCounterfactual
from lit_cf.explainers.disc import DISCCounterfactual
from lit_cf.explainers.dvce import DVCE
from lit_cf.explainers.fastdime import FastDiME
from lit_cf.explainers.latent import LatentAttack, LatentLinearEdit
from lit_cf.explainers.pixel import PixelCounterfactual
from lit_cf.runs import ExplainRun

__all__ = [
    "ACE",
    "CounterfactualMethod",
    "DISCCounterfactual",
    "DVCE",
    "DiffusionCounterfactual",
    "DeepInversionCounterfactual",
    "ExplainRun",
    "FastDiME",
    "LatentAttack",
    "LatentLinearEdit",
    "PixelCounterfactual",
]
