"""PNG grids of explain runs: one row per record, query | counterfactual | signed difference.

Runs of staged methods (DISC's progressive optimisation) also get progression strips:
query | stage 1 | ... | stage S | signed difference of the last stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from lit_cf.report.images import comparison_rows, signed_difference

__all__ = ["comparison_rows", "signed_difference", "write_grids", "save_png"]


def write_grids(rundir: Any, rows: list[dict[str, Any]], num_images: int, per_grid: int = 16) -> list[Path]:
    """Write grids of the first ``num_images`` records into ``<run>/grids/`` (atomic per file)."""
    if num_images <= 0 or not rows:
        return []
    chosen = rows[:num_images]
    cache: dict[str, dict[str, Tensor]] = {}
    queries, cfs, stages = [], [], []
    for r in chosen:
        if r["shard"] not in cache:
            cache[r["shard"]] = rundir.load_shard(r["shard"])
        shard = cache[r["shard"]]
        queries.append(shard["query"][r["row"]])
        cfs.append(shard["counterfactual"][r["row"]])
        if "stages" in shard:
            stages.append(shard["stages"][r["row"]])
    q, c = torch.stack(queries).float(), torch.stack(cfs).float()
    out_dir = rundir.root / "grids"
    out_dir.mkdir(exist_ok=True)
    paths = []
    for g, start in enumerate(range(0, len(chosen), per_grid)):
        grid = make_grid(
            comparison_rows(q[start : start + per_grid], c[start : start + per_grid]), nrow=3, padding=2, pad_value=0.5
        )
        paths.append(save_png(grid, out_dir / f"grid-{g:03d}.png"))
    if stages and len(stages) == len(chosen):
        paths += _write_progressions(out_dir, q, torch.stack(stages).float(), per_grid)
    return paths


def _write_progressions(out_dir: Path, query: Tensor, stages: Tensor, per_grid: int) -> list[Path]:
    """Progression strips of staged methods: query, every stage's image, and the final difference."""
    to_rgb = (lambda x: x.expand(-1, 3, -1, -1)) if query.shape[1] == 1 else (lambda x: x)
    n_stages = stages.shape[1]
    paths = []
    for g, start in enumerate(range(0, len(query), per_grid)):
        q, st = query[start : start + per_grid], stages[start : start + per_grid]
        cols = [to_rgb(q)] + [to_rgb(st[:, k]) for k in range(n_stages)] + [signed_difference(q, st[:, -1])]
        grid = make_grid(torch.stack(cols, 1).flatten(0, 1), nrow=n_stages + 2, padding=2, pad_value=0.5)
        paths.append(save_png(grid, out_dir / f"progression-{g:03d}.png"))
    return paths


def save_png(grid: Tensor, path: Path) -> Path:
    """Write an image grid as PNG atomically (through a temporary file beside it)."""
    from lit_cf.runs.atomic import atomic_write

    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    return path
