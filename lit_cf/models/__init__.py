"""What `lit-cf fit` trains: classifiers, DUQ models, autoencoders, diffusion models."""

from lit_cf.models.adversarial import PGD
from lit_cf.models.autoencoder import VAE, AutoEncoder
from lit_cf.models.backbones import ConvNet, ResNet18
from lit_cf.models.base import ImageClassifier, freeze
from lit_cf.models.classifier import Classifier
from lit_cf.models.descriptors import DescriptorPredictor
from lit_cf.models.diffusion import DiffusionModel
from lit_cf.models.duq import DUQClassifier
from lit_cf.models.external import ExternalClassifier, load_classifier
from lit_cf.models.latent_diffusion import LatentDenoiser, LatentDiffusionModel

__all__ = [
    "PGD",
    "VAE",
    "AutoEncoder",
    "Classifier",
    "ConvNet",
    "DescriptorPredictor",
    "DiffusionModel",
    "DUQClassifier",
    "ExternalClassifier",
    "ImageClassifier",
    "LatentDenoiser",
    "LatentDiffusionModel",
    "ResNet18",
    "freeze",
    "load_classifier",
]
