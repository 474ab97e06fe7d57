"""LightningDataModules and datasets (one file per dataset family)."""

from lit_cf.data.base import ImageDataModule
from lit_cf.data.celeba import CelebADataModule, CelebADataset
from lit_cf.data.corruptions import CORRUPTIONS, CorruptedDataset, corrupt
from lit_cf.data.counterfactual import CounterfactualDataModule
from lit_cf.data.image_folder import ImageFolderDataModule
from lit_cf.data.mnist import FashionMNISTDataModule, MNISTDataModule
from lit_cf.data.rendered import RenderedDigits, RenderedDigitsDataModule, render_digits
from lit_cf.data.tensor import TensorDataModule

__all__ = [
    "CORRUPTIONS",
    "CelebADataModule",
    "CelebADataset",
    "CorruptedDataset",
    "CounterfactualDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "RenderedDigits",
    "RenderedDigitsDataModule",
    "TensorDataModule",
    "corrupt",
    "render_digits",
]
