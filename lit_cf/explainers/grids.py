"""PNG grids of explain runs: one row per record, query | counterfactual | signed difference.

Runs of staged methods (DISC's progressive optimisation) also get progression strips:
query | stage 1 | ... | stage S | signed difference of the last stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from torchvision.utils import make_grid, save_image


def signed_difference(query: Tensor, counterfactual: Tensor) -> Tensor:
    """RGB map of ``cf - query`` summed over channels: red where the CF adds, blue where it removes.

    Each image is scaled by its own largest absolute change so small edits stay visible.
    """
    diff = (counterfactual - query).sum(1, keepdim=True)
    scale = diff.flatten(1).abs().amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    d = diff / scale
    pos, neg = d.clamp(min=0), (-d).clamp(min=0)
    return torch.cat([1 - neg, 1 - pos - neg, 1 - pos], dim=1).clamp(0, 1)


def comparison_rows(query: Tensor, counterfactual: Tensor) -> Tensor:
    """Interleave query, counterfactual and difference map: ``[3B, 3, H, W]`` for a 3-column grid."""
    to_rgb = (lambda x: x.expand(-1, 3, -1, -1)) if query.shape[1] == 1 else (lambda x: x)
    triples = torch.stack([to_rgb(query), to_rgb(counterfactual), signed_difference(query, counterfactual)], 1)
    return triples.flatten(0, 1)


def write_grids(rundir: Any, rows: list[dict[str, Any]], num_images: int, per_grid: int = 16) -> list[Path]:
    """Write grids of the first ``num_images`` records into ``<run>/grids/`` (atomic per file)."""
    if num_images <= 0 or not rows:
        return []
    chosen = rows[:num_images]
    cache: dict[str, dict[str, Tensor]] = {}
    queries, cfs, stages = [], [], []
    for r in chosen:
        if r["shard"] not in cache:
            cache[r["shard"]] = load_file(str(rundir.shards / r["shard"]))
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
        grid = make_grid(comparison_rows(q[start : start + per_grid], c[start : start + per_grid]), nrow=3, padding=2, pad_value=0.5)
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
    from lit_cf.explainers.rundir import atomic_write_bytes

    tmp = path.with_name(f".{path.name}.tmp")
    save_image(grid, tmp, format="png")
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path
