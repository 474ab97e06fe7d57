"""``lit-cf evaluate`` in Weights & Biases: the comparison table, attributions and captioned grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from lit_cf.report import ReportSection
from lit_cf.report.grids import comparison_image

__all__ = ["log_evaluation"]


def log_evaluation(
    loggers: Sequence[Logger],
    table: list[dict[str, Any]],
    results: Mapping[str, Mapping[str, Any]],
    sections: Sequence[ReportSection],
) -> None:
    """Log to every :class:`WandbLogger` among ``loggers`` (others are left alone)."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        columns = list(table[0])
        logger.log_table(key="evaluate/comparison", columns=columns, data=[[row[c] for c in columns] for row in table])
        for name, result in results.items():
            if "global_attributions" in result:
                logger.log_table(
                    key=f"evaluate/{name}/global_attributions",
                    columns=["descriptor", "score", "ci_low", "ci_high"],
                    data=[list(x) for x in result["global_attributions"]],
                )
        for section in sections:
            if section.grid_rows:
                q = torch.stack([r.query for r in section.grid_rows])
                c = torch.stack([r.counterfactual for r in section.grid_rows])
                grid = comparison_image(q, c, [r.caption.split("\n")[0] for r in section.grid_rows])
                logger.log_image(key=f"evaluate/{section.name}", images=[grid])
