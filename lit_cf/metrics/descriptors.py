"""Attribute-level metrics (ACE / DiME on CelebA): MNAC and correlation difference (CD).

Both take the predictions of an attribute oracle (a multi-label classifier, "descriptor
predictions") for the queries and for their counterfactuals, ``[B, A]`` probabilities or
binary labels. An attribute is *on* when its value is ``> threshold`` (default 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_cf.metrics._utils import DEFAULT_STD_CORRECTION, mean_std_dict

# variances below this count as zero (no change / constant column): correlation := 0
_ZERO_VARIANCE = 1e-12


def _check_descriptors(desc_query: Tensor, desc_cf: Tensor) -> None:
    if desc_query.dim() != 2 or desc_query.shape != desc_cf.shape:
        raise ValueError(
            f"descriptor predictions must be [B, A] for both queries and counterfactuals, got "
            f"{tuple(desc_query.shape)} and {tuple(desc_cf.shape)}"
        )


def _check_attribute(index: int | None, num_attributes: int) -> None:
    if index is not None and not -num_attributes <= index < num_attributes:
        raise ValueError(f"attribute index {index} out of range for {num_attributes} attributes")


class MNAC(Metric):
    """Mean number of attributes changed between queries and counterfactuals.

    Per instance, the number of attributes whose binarised value (``> threshold``) differs
    between query and counterfactual; mean and std over instances. Lower is more minimal.

    The spec counts the query (target) attribute too ("query attribute included"), which is the
    default. With ``target_attribute`` set and ``include_target=False`` that column is left
    out, so only collateral changes are counted; ``target_attribute`` alone changes nothing.

    Args:
        threshold: Binarisation threshold (strict ``>``; binary inputs work as they are).
        target_attribute: Column of the attribute being explained (the query attribute).
        include_target: Whether that column is counted (default ``True``, as in the spec).
        std_correction: Degrees-of-freedom correction of the std (0: population std).

    ``update(desc_query [B, A], desc_cf [B, A])``; ``compute() -> {"mnac_mean", "mnac_std"}``.
    """

    counts: list[Tensor]  # metric state, added in __init__

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        threshold: float = 0.5,
        target_attribute: int | None = None,
        include_target: bool = True,
        std_correction: int = DEFAULT_STD_CORRECTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not include_target and target_attribute is None:
            raise ValueError("include_target=False needs target_attribute")
        self.threshold, self.target_attribute, self.include_target = threshold, target_attribute, include_target
        self.std_correction = std_correction
        self.add_state("counts", [], dist_reduce_fx="cat")

    def update(self, desc_query: Tensor, desc_cf: Tensor) -> None:
        _check_descriptors(desc_query, desc_cf)
        _check_attribute(self.target_attribute, desc_query.shape[1])
        changed = (desc_query.detach() > self.threshold) != (desc_cf.detach() > self.threshold)
        if not self.include_target:
            keep = torch.ones(changed.shape[1], dtype=torch.bool, device=changed.device)
            keep[self.target_attribute] = False
            changed = changed[:, keep]
        self.counts.append(changed.sum(1).float())

    def compute(self) -> dict[str, Tensor]:
        return mean_std_dict("mnac", self.counts, self.std_correction)


def attribute_correlation(labels: Tensor, target_attribute: int) -> Tensor:
    """Pearson correlation ``[A]`` of every attribute with the target attribute in labelled data.

    ``labels`` is ``[N, A]`` (``{0, 1}``, ``{-1, 1}`` as in CelebA's table, or probabilities;
    correlation ignores the coding). Columns with zero variance get correlation 0.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, A], got shape {tuple(labels.shape)}")
    _check_attribute(target_attribute, labels.shape[1])
    x = labels.double()
    x = x - x.mean(0, keepdim=True)
    t = x[:, target_attribute]
    cov = (x * t[:, None]).mean(0)
    var = x.square().mean(0)
    den = (var * var[target_attribute]).sqrt()
    ok = (var > _ZERO_VARIANCE) & (var[target_attribute] > _ZERO_VARIANCE)
    return torch.where(ok, cov / den.clamp_min(_ZERO_VARIANCE), torch.zeros_like(cov))


class CorrelationDifference(Metric):
    """CD: how far the counterfactuals' attribute co-changes are from the data's correlations.

    ``Δ_i = a_i(x_cf) - a_i(x)`` per instance and attribute; for each attribute ``i``,
    ``|corr_CF(Δ_i, Δ_t) - corr_data(a_i, a_t)|`` with ``t`` the target (query) attribute and
    ``corr_data`` the Pearson correlation in labelled data (an ``[A]`` vector, e.g. from
    :func:`attribute_correlation`); CD is the sum over ``i``. Lower is better.

    Choices (the spec leaves them open):

    * ``binarize=True`` (default): attributes are binarised (``> threshold``) before taking
      differences, so ``Δ ∈ {-1, 0, 1}`` as with MNAC; ``False`` uses the raw values
      (probabilities);
    * an attribute whose ``Δ`` never varies over the counterfactuals (or ``Δ_t`` constant) has
      correlation 0 (it did not co-change), so it adds ``|corr_data|``;
    * ``include_target=False`` (default): the target's own term (``|1 - 1| = 0`` whenever
      ``Δ_t`` varies) is left out of the sum; ``True`` keeps it.

    Correlations use population moments accumulated as float64 sums (sum reduction, DDP-safe).

    Args:
        target_attribute: Column ``t`` of the query attribute.
        data_correlation: ``corr_data`` ``[A]``.
        threshold: Binarisation threshold.
        binarize: See above.
        include_target: See above.

    ``update(desc_query [B, A], desc_cf [B, A])``; ``compute() -> {"cd": Tensor}``;
    :meth:`per_attribute` gives the ``[A]`` terms.
    """

    data_correlation: Tensor  # buffer, registered in __init__

    n: Tensor  # metric states, added in __init__
    sum_d: Tensor
    sum_dd: Tensor
    sum_dt: Tensor

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        target_attribute: int,
        data_correlation: Tensor | Sequence[float],
        threshold: float = 0.5,
        binarize: bool = True,
        include_target: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        corr = torch.as_tensor(data_correlation, dtype=torch.float64)
        if corr.dim() != 1:
            raise ValueError(f"data_correlation must be [A], got shape {tuple(corr.shape)}")
        a = corr.shape[0]
        _check_attribute(target_attribute, a)
        self.target_attribute = target_attribute % a
        self.threshold, self.binarize, self.include_target = threshold, binarize, include_target
        self.register_buffer("data_correlation", corr)
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_d", torch.zeros(a, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_dd", torch.zeros(a, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_dt", torch.zeros(a, dtype=torch.float64), dist_reduce_fx="sum")

    @classmethod
    def from_labels(cls, labels: Tensor, target_attribute: int, **kwargs: Any) -> CorrelationDifference:
        """CD with ``corr_data`` computed from a labelled attribute matrix ``[N, A]``."""
        return cls(target_attribute, attribute_correlation(labels, target_attribute), **kwargs)

    def update(self, desc_query: Tensor, desc_cf: Tensor) -> None:
        _check_descriptors(desc_query, desc_cf)
        if desc_query.shape[1] != self.sum_d.shape[0]:
            raise ValueError(f"expected {self.sum_d.shape[0]} attributes, got {desc_query.shape[1]}")
        q, c = desc_query.detach(), desc_cf.detach()
        if self.binarize:
            q, c = q > self.threshold, c > self.threshold
        delta = c.double() - q.double()
        dt = delta[:, self.target_attribute : self.target_attribute + 1]
        self.n += len(delta)
        self.sum_d += delta.sum(0)
        self.sum_dd += delta.square().sum(0)
        self.sum_dt += (delta * dt).sum(0)

    def per_attribute(self) -> Tensor:
        """``|corr_CF(Δ_i, Δ_t) - corr_data_i|`` for every attribute ``[A]`` (float64)."""
        t = self.target_attribute
        n = self.n.clamp_min(1)
        mean = self.sum_d / n
        cov = self.sum_dt / n - mean * mean[t]
        var = self.sum_dd / n - mean.square()
        ok = (var > _ZERO_VARIANCE) & (var[t] > _ZERO_VARIANCE)
        corr = torch.where(ok, cov / (var * var[t]).clamp_min(_ZERO_VARIANCE**2).sqrt(), torch.zeros_like(cov))
        terms = (corr - self.data_correlation.to(corr.device)).abs()
        if not self.include_target:
            terms = terms.clone()
            terms[t] = 0.0
        return terms

    def compute(self) -> dict[str, Tensor]:
        if self.n == 0:
            return {"cd": torch.tensor(float("nan"), device=self.n.device)}
        return {"cd": self.per_attribute().sum().float()}
