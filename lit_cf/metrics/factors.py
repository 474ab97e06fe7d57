"""What evaluate knows about the descriptors of the data: ground-truth factors and attributes.

On the built-in rendered digits every image is drawn from known generative factors, so a
factor regressor (a :class:`~lit_cf.models.DescriptorPredictor` with ``key="factors"``) gives
ground-truth scores of how much a counterfactual changed each factor. Two of the factors
(:data:`NUISANCE`) never define the class: a counterfactual that changes the digit and nothing
else leaves them at the regressor's noise floor. On data with binary attributes (CelebA) the
labelled training split gives the attribute correlations CD compares against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_cf.errors import UserError
from lit_cf.models.descriptors import DescriptorPredictor
from lit_cf.runs import ExplainRun

__all__ = ["NUISANCE", "DescriptorSetup", "GroundTruthCollector", "descriptor_setup", "ground_truth_scores"]

#: factors of the rendered digits that never define the class (stroke intensity, corner mark)
NUISANCE = ("intensity", "mark")


@dataclass(frozen=True)
class DescriptorSetup:
    """What the data tells evaluate about one run's descriptors.

    Attributes:
        target_index: Column of the data's target attribute among the predictor's names
            (binary-attribute data), else None.
        data_correlation: Attribute correlations with the target on the labelled training
            split (for CD), when the data has the predictor's attributes.
        true_factors: ``[N, F]`` exact factors of the run's queries in ``[0, 1]`` units (rendered
            digits and a factor regressor), in record order.
    """

    target_index: int | None = None
    data_correlation: Tensor | None = None
    true_factors: Tensor | None = None


def descriptor_setup(predictor: DescriptorPredictor, datamodule: Any, run: ExplainRun) -> DescriptorSetup:
    """Target attribute index, labelled-data correlation (CD) and exact query factors, when known."""
    names = list(predictor.names)
    target_name = getattr(datamodule, "target_attribute", None)
    target_index = names.index(target_name) if target_name in names else None
    data_correlation = None
    if target_index is not None:
        train = datamodule.dataset("train")
        base = getattr(train, "dataset", train)
        attributes = getattr(base, "attributes", None)
        data_names = list(getattr(base, "attribute_names", []) or [])
        if attributes is not None and set(names) <= set(data_names):
            from lit_cf.metrics.descriptors import attribute_correlation

            # columns matched by name: the predictor's order need not be the data's
            columns = attributes.float()[:, [data_names.index(n) for n in names]]
            data_correlation = attribute_correlation(columns, target_index)
    true_factors = None
    if predictor.key == "factors":
        from lit_cf.data.rendered import normalize_factors

        data = datamodule.dataset(run.meta.get("split", "test"))
        sample = data[run.manifest[0]["index"]]
        if "factors" not in sample:
            raise UserError("the descriptor predictor regresses factors, but the data has none (use the rendered digits)")
        base = getattr(data, "dataset", data)
        table = getattr(base, "factors", None)  # rendered digits keep all factors in one tensor
        if table is not None and len(base) == len(data):
            raw = table[torch.tensor([r["index"] for r in run.manifest])]
        else:
            raw = torch.stack([data[r["index"]]["factors"] for r in run.manifest])
        true_factors = normalize_factors(raw.float())
    return DescriptorSetup(target_index, data_correlation, true_factors)


class GroundTruthCollector:
    """Per-record factor changes and the regressor's own errors, batch by batch (on the CPU)."""

    def __init__(self, true_factors: Tensor) -> None:
        self.true_factors = true_factors
        self.change: list[Tensor] = []
        self.error: list[Tensor] = []

    def update(self, records: slice, desc_query: Tensor, desc_cf: Tensor) -> None:
        """Add the records ``records`` (a slice of the run) with their predicted factors."""
        self.change.append((desc_cf - desc_query).abs().cpu())
        self.error.append((desc_query.cpu() - self.true_factors[records]).abs())

    def compute(self, names: Sequence[str]) -> dict[str, float]:
        if not self.change:
            return {}
        return ground_truth_scores(torch.cat(self.change), torch.cat(self.error), names)


def ground_truth_scores(change: Tensor, error: Tensor, names: Sequence[str]) -> dict[str, float]:
    """Ground-truth factor scores on the rendered digits (factors in [0, 1] units).

    ``gt_change_<f>``: mean |predicted factor of the counterfactual - of the query|;
    ``gt_error_<f>``: the predictor's own error on queries (the noise floor of the change);
    ``gt_nuisance_change``: mean change of the nuisance factors (intensity, mark), which a
    counterfactual that changes the digit and nothing else leaves at the noise floor;
    ``gt_style_change``: mean change of the other factors.
    """
    out = {}
    for j, name in enumerate(names):
        out[f"gt_change_{name}"] = float(change[:, j].mean())
        out[f"gt_error_{name}"] = float(error[:, j].mean())
    nuisance = [j for j, n in enumerate(names) if n in NUISANCE]
    style = [j for j, n in enumerate(names) if n not in NUISANCE]
    if nuisance:
        out["gt_nuisance_change"] = float(change[:, nuisance].mean())
    if style:
        out["gt_style_change"] = float(change[:, style].mean())
    return out
