"""Realism against real images: Fréchet distances to real images of each counterfactual's target class.

``fid_domain`` / ``sfid_domain`` compare counterfactuals with their own queries, which rewards
an edit that does not move the image at all. The numbers here compare them with *real images
of the class each counterfactual claims to be*, drawn from a reference split, on the same
in-project feature network (``_domain``: not Inception, not comparable with published FIDs):

* ``fid_real_domain``: counterfactuals vs a class-matched real sample: for every target class
  ``c`` with ``n_c`` counterfactuals, ``size_factor * n_c`` real images whose label is ``c``;
* ``fid_real_domain_no_edit``: the unchanged queries vs the same sample (the "no edit" row: a
  method must beat it to have moved the images towards their targets at all);
* ``fid_real_domain_floor``: a second, disjoint real sample with the counterfactuals' class
  counts (the same size as the counterfactual set) vs the same sample: the distance two real
  samples of this size have, i.e. the best any method can reach at this sample size.

Queries never enter either real sample when the reference split is the split they came from
(``exclude``). The samples are a deterministic function of the seed, the labels, the class
counts and the excluded indices, so runs with the same targets are scored against the same
images.

There is no separate ``sfid`` against real images: sFID (ACE) exists to keep each
counterfactual from being compared with a set holding its own query; a reference sample that
excludes the queries already has that property, and splitting it in halves would only measure
the same distance at half the sample size.

Fréchet distances of small samples in many dimensions are biased upwards; the three numbers
are comparable with each other because they use the same reference sample and equal sizes.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from lit_cf.metrics.realism import FIDFeatures, frechet_distance

REFERENCE = "reference"
GROUPS = ("counterfactual", "no_edit", "floor")


def split_labels(data: Dataset) -> Tensor:
    """Labels ``[N]`` of every sample of a split, read without loading images where possible.

    lit-cf datasets keep their labels in a ``labels`` tensor; ``Subset`` / ``IndexedSubset``
    select from it and ``CorruptedDataset`` leaves labels alone. Any other dataset is read
    sample by sample (once per evaluation).
    """
    size = len(cast(Sized, data))
    labels = getattr(data, "labels", None)
    if isinstance(labels, Tensor) and len(labels) == size:
        return labels.long().reshape(-1)
    inner = getattr(data, "dataset", None)
    if inner is not None:
        indices = getattr(data, "indices", None)
        base = split_labels(inner)
        if indices is not None:
            return base[torch.as_tensor(list(indices), dtype=torch.long)]
        if len(base) == size:
            return base
    return torch.tensor([int(data[i]["label"]) for i in range(size)], dtype=torch.long)


@dataclass(frozen=True)
class ReferenceSample:
    """Dataset indices of the two real samples drawn for one set of counterfactuals.

    Attributes:
        reference: Indices of the class-matched reference sample (``size_factor * n_c`` per
            target class ``c``).
        floor: Indices of the held-out real sample (``n_c`` per class, disjoint from
            ``reference``): the same class counts and size as the counterfactuals.
        classes: Target class of every entry of ``reference`` (same order).
        floor_classes: Class of every entry of ``floor``.
        excluded: Number of distinct dataset indices kept out of both samples (the queries).
    """

    reference: Tensor
    floor: Tensor
    classes: Tensor
    floor_classes: Tensor
    excluded: int


def draw_reference(
    labels: Tensor,
    targets: Tensor,
    exclude: Sequence[int] | Tensor = (),
    seed: int = 0,
    size_factor: int = 1,
) -> ReferenceSample:
    """Draw the class-matched reference sample and the floor sample (see the module docstring).

    Args:
        labels: ``[N]`` labels of the reference split.
        targets: ``[M]`` target class of every counterfactual.
        exclude: Dataset indices of the reference split that must not be drawn (the queries
            when the reference split is their split).
        seed: Seed of the draw; class ``c`` uses its own generator seeded by ``(seed, c)``, so
            the images drawn for one class do not depend on the other classes' counts.
        size_factor: Reference images per counterfactual (>= 1); the floor always has one
            image per counterfactual.

    Raises:
        ValueError: When a target class has fewer than ``(size_factor + 1) * n_c`` eligible
            images (the message names the class and the counts).
    """
    if size_factor < 1:
        raise ValueError(f"size_factor must be >= 1, got {size_factor}")
    labels, targets = labels.long().cpu(), targets.long().cpu()
    excluded = torch.zeros(len(labels), dtype=torch.bool)
    exclude_t = torch.as_tensor(list(exclude) if not isinstance(exclude, Tensor) else exclude, dtype=torch.long).unique()
    if len(exclude_t) and (int(exclude_t.min()) < 0 or int(exclude_t.max()) >= len(labels)):
        raise ValueError(f"excluded indices must lie in [0, {len(labels)}), got {exclude_t.min()}..{exclude_t.max()}")
    excluded[exclude_t] = True
    reference, floor, ref_cls, floor_cls = [], [], [], []
    classes, counts = targets.unique(return_counts=True)
    for c, n in zip(classes.tolist(), counts.tolist()):
        eligible = ((labels == c) & ~excluded).nonzero().flatten()
        need = (size_factor + 1) * n
        if len(eligible) < need:
            raise ValueError(
                f"class {c} has {len(eligible)} real images in the reference split"
                f"{' (queries excluded)' if len(exclude_t) else ''}, "
                f"{need} are needed ({size_factor} x {n} reference + {n} floor)"
            )
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(c)) % (2**62))
        picked = eligible[torch.randperm(len(eligible), generator=g)[:need]]
        reference.append(picked[: size_factor * n])
        floor.append(picked[size_factor * n :])
        ref_cls.append(torch.full((size_factor * n,), c, dtype=torch.long))
        floor_cls.append(torch.full((n,), c, dtype=torch.long))
    empty = torch.zeros(0, dtype=torch.long)
    return ReferenceSample(
        reference=torch.cat(reference) if reference else empty,
        floor=torch.cat(floor) if floor else empty,
        classes=torch.cat(ref_cls) if ref_cls else empty,
        floor_classes=torch.cat(floor_cls) if floor_cls else empty,
        excluded=int(excluded.sum()),
    )


class ReferenceFID(Metric):
    """Fréchet distances of several image sets to one set of real reference images.

    ``update(images, group)`` with ``group="reference"`` for the real reference images and one
    of ``groups`` for each compared set; ``compute()`` returns ``{f"{name}": FD(reference,
    groups[0])}`` and ``{f"{name}_{g}": FD(reference, g)}`` for the other groups (``nan``
    while a set has fewer than 2 images). States are float64 feature sums and outer-product
    sums per group (sum reduction, DDP-safe).

    Args:
        feature_extractor: Network mapping images to features (see
            :class:`~lit_cf.metrics.realism.FIDFeatures`), e.g.
            :class:`~lit_cf.metrics.features.ClassifierFeatures` of a trained classifier.
        groups: Names of the compared sets; the first gets the bare ``name``.
        num_features: Feature dimension; inferred when possible.
        input_shape: ``(C, H, W)`` to probe the feature dimension.
        name: Output key (default ``fid_real_domain``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        feature_extractor: nn.Module,
        groups: Sequence[str] = GROUPS,
        num_features: int | None = None,
        input_shape: Sequence[int] | None = None,
        name: str = "fid_real_domain",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        groups = list(groups)
        if not groups or REFERENCE in groups or len(set(groups)) != len(groups):
            raise ValueError(f"groups must be distinct names other than {REFERENCE!r}, got {groups}")
        self.features = FIDFeatures(feature_extractor, num_features, input_shape)
        self.groups, self.name = groups, name
        d = self.features.num_features
        for group in [REFERENCE, *groups]:
            self.add_state(f"{group}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{group}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{group}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, group: str) -> None:
        if group != REFERENCE and group not in self.groups:
            raise ValueError(f"unknown group {group!r}; expected {REFERENCE!r} or one of {self.groups}")
        if images.dim() < 2:
            raise ValueError(f"expected batched images [B, ...], got shape {tuple(images.shape)}")
        feats = self.features(images).double()
        setattr(self, f"{group}_sum", getattr(self, f"{group}_sum") + feats.sum(0))
        setattr(self, f"{group}_outer", getattr(self, f"{group}_outer") + feats.T @ feats)
        setattr(self, f"{group}_n", getattr(self, f"{group}_n") + len(feats))

    def _gaussian(self, group: str) -> tuple[Tensor, Tensor]:
        n = getattr(self, f"{group}_n").double()
        mean = getattr(self, f"{group}_sum") / n
        cov = (getattr(self, f"{group}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        device = getattr(self, f"{REFERENCE}_sum").device
        for i, group in enumerate(self.groups):
            key = self.name if i == 0 else f"{self.name}_{group}"
            if getattr(self, f"{REFERENCE}_n") < 2 or getattr(self, f"{group}_n") < 2:
                out[key] = torch.tensor(float("nan"), device=device)
            else:
                out[key] = frechet_distance(*self._gaussian(REFERENCE), *self._gaussian(group)).float()
        return out


def _images(data: Dataset, indices: Tensor) -> Tensor:
    return torch.stack([data[int(i)]["image"] for i in indices.tolist()]).float() if len(indices) else torch.zeros(0)


@torch.no_grad()
def reference_realism(
    feature_extractor: nn.Module,
    reference_data: Dataset,
    counterfactuals: Tensor,
    queries: Tensor,
    targets: Tensor,
    exclude: Sequence[int] | Tensor = (),
    seed: int = 0,
    size_factor: int = 1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Realism of one set of counterfactuals against real images of their target classes.

    Args:
        feature_extractor: The domain feature network (images in ``[0, 1]`` -> ``[B, d]``).
        reference_data: The reference split (samples with ``image`` and ``label``).
        counterfactuals: ``[M, C, H, W]`` counterfactual images.
        queries: ``[M, C, H, W]`` their queries (the "no edit" set).
        targets: ``[M]`` target classes.
        exclude: Indices of ``reference_data`` never drawn (the queries, when it is their split).
        seed: Seed of the draw (:func:`draw_reference`).
        size_factor: Reference images per counterfactual.
        batch_size: Images per feature batch.
        device: Where the features are computed.

    Returns:
        ``fid_real_domain``, ``fid_real_domain_no_edit``, ``fid_real_domain_floor`` (floats),
        ``reference_n`` / ``floor_n`` (sample sizes), ``reference_excluded`` (indices kept
        out), ``reference_seed`` and ``reference_indices`` / ``floor_indices`` (lists).
    """
    if counterfactuals.shape != queries.shape or len(targets) != len(queries):
        raise ValueError(
            f"counterfactuals {tuple(counterfactuals.shape)}, queries {tuple(queries.shape)} and "
            f"targets {tuple(targets.shape)} must describe the same records"
        )
    sample = draw_reference(split_labels(reference_data), targets, exclude, seed, size_factor)
    metric = ReferenceFID(feature_extractor).to(device)
    sets = {
        REFERENCE: _images(reference_data, sample.reference),
        "floor": _images(reference_data, sample.floor),
        "counterfactual": counterfactuals.float(),
        "no_edit": queries.float(),
    }
    for group, images in sets.items():
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size].to(device), group)
    values = {k: float(v) for k, v in metric.compute().items()}
    return {
        **values,
        "reference_n": len(sample.reference),
        "floor_n": len(sample.floor),
        "reference_excluded": sample.excluded,
        "reference_seed": int(seed),
        "reference_indices": sample.reference.tolist(),
        "floor_indices": sample.floor.tolist(),
    }


def evaluate_reference(
    feature_extractor: nn.Module,
    datamodule: Any,
    run: Any,
    split: str,
    seed: int = 0,
    size_factor: int = 1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """:func:`reference_realism` of one explain run (an :class:`~lit_cf.explainers.ExplainRun`).

    The queries are excluded from the real samples when ``split`` is the split they were
    explained from. Raises :class:`~lit_cf.errors.UserError` for an unknown split or one with
    too few images of a target class.
    """
    from lit_cf.errors import UserError

    data = reference_split(datamodule, split)
    same_split = split == run.meta.get("split", "test")
    exclude = sorted({int(r["index"]) for r in run.manifest}) if same_split else []
    try:
        out = reference_realism(
            feature_extractor,
            data,
            run.tensor("counterfactual"),
            run.tensor("query"),
            torch.tensor([int(r["target"]) for r in run.manifest]),
            exclude,
            seed,
            size_factor,
            batch_size,
            device,
        )
    except ValueError as err:
        raise UserError(
            f"realism against real images: {err}; pass a larger --reference split (e.g. train) or --reference null to skip it"
        ) from err
    out["reference_split"] = split
    return out


def reference_split(datamodule: Any, split: str) -> Dataset:
    """``datamodule.dataset(split)``, or a :class:`~lit_cf.errors.UserError` naming the valid splits."""
    from lit_cf.errors import UserError

    try:
        return datamodule.dataset(split)
    except ValueError as err:
        raise UserError(f"--reference {split}: {err}") from err


def reference_rows(entries: Sequence[tuple[str, Any, dict[str, Any]]], label: str = "method") -> list[dict[str, Any]]:
    """The "no edit" and "real floor" rows of the comparison table.

    ``entries`` are ``(run name, key, overall metrics)``; runs with the same ``key`` (the same
    queries and targets) share one pair of rows. With one group the rows are called ``no edit
    (queries)`` and ``real floor``; with several, the first run's name is appended.
    """
    groups: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, key, overall in entries:
        if "fid_real_domain_no_edit" in overall:
            groups.setdefault(str(key), (name, overall))
    rows = []
    for name, overall in groups.values():
        suffix = f" [{name}]" if len(groups) > 1 else ""
        rows.append(
            {label: f"no edit (queries){suffix}", "n": overall.get("n"), "fid_real_domain": overall["fid_real_domain_no_edit"]}
        )
        rows.append(
            {label: f"real floor{suffix}", "n": overall.get("floor_n"), "fid_real_domain": overall["fid_real_domain_floor"]}
        )
    return rows


__all__ = [
    "GROUPS",
    "ReferenceFID",
    "ReferenceSample",
    "draw_reference",
    "evaluate_reference",
    "reference_realism",
    "reference_rows",
    "reference_split",
    "split_labels",
]
