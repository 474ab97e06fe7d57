"""Training data made of counterfactuals: queries and their counterfactuals, labelled by the teacher.

DISC's second claim is that counterfactuals carry the explained classifier's decision boundary:
a *student* trained only on them should agree with the classifier (the *teacher*). This
datamodule turns finished explain runs into such a training set, so the student is trained
with plain ``lit-cf fit``::

    lit-cf fit --config configs/model/cnn.yaml \\
        --data lit_cf.data.CounterfactualDataModule --data.init_args.runs=[runs/disc]

Every record contributes its counterfactual labelled with the teacher's prediction on it
(``final_pred`` in the manifest) and, with ``include_queries``, its query labelled with the
teacher's prediction on the query (``orig_pred``; each query once, however many targets it
had). No ground-truth label is used: the labels are what the teacher says. ``val`` is a
seeded ``val_fraction`` of the pooled samples; there is no ``test`` split (test students on
real data, e.g. with ``lit-cf test`` and the original datamodule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lit_cf.data.base import ImageDataModule, IndexedSubset, split_indices
from lit_cf.errors import UserError
from lit_cf.runs import ExplainRun


class _Pool(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor) -> None:
        self.images, self.labels, self.kinds = images, labels, kinds

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i), "is_counterfactual": self.kinds[i]}


class CounterfactualDataModule(ImageDataModule):
    """Queries and counterfactuals of explain runs, labelled by the explained classifier.

    Args:
        runs: Explain run directories (all of one classifier and image shape).
        include_queries: Add each query once, labelled with the teacher's prediction on it.
        val_fraction: Share of the pooled samples held out as ``val``.
        num_classes: Number of classes (default: the largest label seen + 1, at least 2).
        batch_size, num_workers, seed, limit: As in :class:`~lit_cf.data.base.ImageDataModule`.
    """

    def __init__(
        self,
        runs: Sequence[str],
        include_queries: bool = True,
        val_fraction: float = 0.1,
        num_classes: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        # predict serves val: there is no test split of pooled counterfactuals
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, predict_split="val", limit=limit)
        if not runs:
            raise UserError("CounterfactualDataModule needs at least one explain run (runs: [...])")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.runs, self.include_queries, self.val_fraction = [str(r) for r in runs], include_queries, val_fraction
        self._num_classes = num_classes
        self._pool: _Pool | None = None
        self._parts: tuple[list[int], list[int]] | None = None

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "val")

    def pool(self) -> _Pool:
        """All samples of all runs (read once)."""
        if self._pool is None:
            images, labels, kinds = [], [], []
            for root in self.runs:
                run = ExplainRun(root)  # raises a UserError naming the run if it is missing or unfinished
                cf = run.tensor("counterfactual").float()
                images.append(cf)
                labels.append(torch.tensor([r["final_pred"] for r in run.manifest]))
                kinds.append(torch.ones(len(cf), dtype=torch.bool))
                if self.include_queries:
                    first: dict[int, int] = {}
                    for i, r in enumerate(run.manifest):
                        first.setdefault(r["index"], i)
                    rows = list(first.values())
                    images.append(run.tensor("query").float()[rows])
                    labels.append(torch.tensor([run.manifest[i]["orig_pred"] for i in rows]))
                    kinds.append(torch.zeros(len(rows), dtype=torch.bool))
            shapes = {tuple(x.shape[1:]) for x in images}
            if len(shapes) != 1:
                raise UserError(f"the runs hold images of different shapes {sorted(shapes)}: pool runs of one dataset")
            self._pool = _Pool(torch.cat(images), torch.cat(labels).long(), torch.cat(kinds))
            c, h, w = self._pool.images.shape[1:]  # counterfactuals are [N, C, H, W]
            self.image_shape = (c, h, w)
        return self._pool

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        if self._num_classes is not None:
            return self._num_classes
        return max(2, int(self.pool().labels.max()) + 1)

    def build_split(self, split: str) -> Dataset:
        pool = self.pool()
        if self._parts is None:
            self._parts = split_indices(len(pool), self.val_fraction, self.seed)
        train, val = self._parts
        return IndexedSubset(pool, train if split == "train" else val)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "runs": self.runs, "include_queries": self.include_queries}


__all__ = ["CounterfactualDataModule"]
