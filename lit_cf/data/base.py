"""Shared base for lit-cf datamodules.

Every dataset in lit-cf yields samples as dictionaries so that methods, metrics and
writers can rely on one contract:

* ``image``: float tensor ``[C, H, W]`` with pixels in ``[0, 1]``. Normalisation is *not*
  applied by the data pipeline; models own their input normalisation (see
  :class:`lit_cf.models.classifier.Classifier`), so counterfactual methods optimise and clamp
  in plain pixel space.
* ``label``: ``int64`` scalar class index.
* ``index``: ``int64`` scalar, the position of the sample in its split (what explain records).
* optional ``factors``: float tensor of known generative factors (built-in rendered data).
* optional ``attributes``: float tensor of binary descriptors in ``{0, 1}`` (CelebA).
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any, cast

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lit_cf.data.corruptions import CorruptedDataset

SPLITS = ("train", "val", "test")


class ImageDataModule(L.LightningDataModule):
    """Base datamodule: builds named splits once and serves loaders over them.

    Subclasses set ``num_classes``, ``image_shape`` and ``class_names`` and implement
    :meth:`build_split`, returning a map-style dataset of sample dictionaries. A subclass takes
    its own arguments and passes the options below on with ``**kwargs`` (its ``--help`` and
    config list them all); :attr:`split_names` must not depend on what a subclass sets after
    calling ``super().__init__``, since ``predict_split`` is checked against it here.

    Args:
        batch_size: Samples per batch for every loader.
        num_workers: DataLoader worker processes.
        seed: Seed for everything random in the data (splits, corruptions, rendering).
        predict_split: Split served by ``predict_dataloader`` (``train``, ``val``, ``test``
            or any extra split name the subclass knows, e.g. ``test_shortcut``).
        test_corruption: Optional corruption applied to the evaluation splits (``val``,
            ``test`` and any ``test_*`` split): a name from
            :data:`lit_cf.data.corruptions.CORRUPTIONS`.
        corruption_severity: Severity 1-5 of ``test_corruption``.
        limit: Optional cap on the number of samples per split (first ``limit`` indices);
            handy for smoke runs.
    """

    num_classes: int = 0
    image_shape: tuple[int, int, int] = (1, 28, 28)
    class_names: Sequence[str] = ()
    factor_names: Sequence[str] = ()
    attribute_names: Sequence[str] = ()

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        predict_split: str = "test",
        test_corruption: str | None = None,
        corruption_severity: int = 3,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.predict_split = predict_split
        self.test_corruption = test_corruption
        self.corruption_severity = corruption_severity
        self.limit = limit
        if test_corruption is not None:
            # validates name and severity early, before any data is read
            CorruptedDataset.check(test_corruption, corruption_severity)
        if predict_split not in self.split_names:
            raise ValueError(f"unknown predict_split {predict_split!r}; choose one of {list(self.split_names)}")
        self._splits: dict[str, Dataset] = {}

    # ----------------------------------------------------------------- subclass API
    @property
    def split_names(self) -> tuple[str, ...]:
        """Names accepted by :meth:`dataset`."""
        return SPLITS

    def build_split(self, split: str) -> Dataset:
        """Return the map-style dataset of one split (called at most once per split)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_split")

    # ----------------------------------------------------------------- public API
    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` with the corruption and ``limit`` applied (cached)."""
        if split not in self.split_names:
            raise ValueError(f"unknown split {split!r} for {type(self).__name__}; choose one of {list(self.split_names)}")
        if split not in self._splits:
            ds = self.build_split(split)
            if self.limit is not None and len(cast(Sized, ds)) > self.limit:
                ds = Subset(ds, range(self.limit))
            if self.test_corruption is not None and split != "train":
                ds = CorruptedDataset(ds, self.test_corruption, self.corruption_severity, seed=self.seed)
            self._splits[split] = ds
        return self._splits[split]

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """A DataLoader over ``split``; training shuffles with a seeded generator."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.predict_split)

    def describe(self) -> dict[str, Any]:
        """Facts about the data that outputs record (dataset, shape, classes)."""
        return {
            "datamodule": f"{type(self).__module__}.{type(self).__qualname__}",
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "class_names": list(self.class_names),
            "test_corruption": self.test_corruption,
            "corruption_severity": self.corruption_severity if self.test_corruption else None,
        }


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministically split ``range(n)`` into (rest, held-out) with ``fraction`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * fraction))
    return sorted(perm[k:]), sorted(perm[:k])


class IndexedSubset(Dataset):
    """A subset whose samples report their index *within the subset* (the split index)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.dataset[self.indices[i]])
        sample["index"] = torch.tensor(i, dtype=torch.long)
        return sample
