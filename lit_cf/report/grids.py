"""PNG grids of explain runs: one captioned row per record.

``grids/grid-NNN.png``: query | counterfactual | signed difference, each image upscaled
(nearest neighbour) to at least :data:`MIN_GRID_PX` pixels, with a caption under every row:
source -> target class (names when the data has them) and the explained classifier's
probability of the target before and after. Every image-sequence output the method declared
(:mod:`lit_cf.report.outputs`, e.g. DISC's or the diffusion methods' ``stages``) gets
``grids/progression-NNN.png``: query | frame 1 | ... | frame K | difference of the last frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lit_cf.report.images import signed_difference, to_rgb, upscale, upscale_factor
from lit_cf.report.outputs import OutputSpec, declared_image_sequences
from lit_cf.runs import RunDir, atomic_write

__all__ = [
    "MIN_GRID_PX",
    "RecordCaption",
    "class_label",
    "class_names_of",
    "comparison_image",
    "save_png",
    "sequence_image",
    "write_grids",
]

MIN_GRID_PX = 96  # 28-px digits are drawn 4x (112 px), 32-px images 3x (96 px)
PAD = 2
PAD_VALUE = 128  # grey between tiles
FONT_PX = 12
CAPTION_PX = FONT_PX + 6


@dataclass(frozen=True)
class RecordCaption:
    """What a grid row says about its record: ``3 -> 8  p(8) 0.02 -> 0.91``.

    Attributes:
        source: Class the classifier gave the query.
        target: Class the counterfactual was asked for.
        before: The classifier's probability of ``target`` on the query.
        after: Its probability of ``target`` on the counterfactual.
        prefix: Text put in front (e.g. ``#12`` for the dataset index); optional.
    """

    source: int
    target: int
    before: float
    after: float
    prefix: str = ""

    def text(self, class_names: Sequence[str] | None = None) -> str:
        src, tgt = class_label(self.source, class_names), class_label(self.target, class_names)
        head = f"{self.prefix} " if self.prefix else ""
        return f"{head}{src} -> {tgt}  p({tgt}) {self.before:.2f} -> {self.after:.2f}"

    @classmethod
    def of_row(cls, row: Mapping[str, Any], after: float | None = None, prefix: str = "") -> RecordCaption:
        """The caption of a manifest row (``after`` overrides the row's final target probability)."""
        return cls(
            source=int(row["orig_pred"]),
            target=int(row["target"]),
            before=float(row["orig_target_prob"]),
            after=float(row["final_target_prob"] if after is None else after),
            prefix=prefix,
        )


def class_label(index: int, class_names: Sequence[str] | None = None) -> str:
    """A class's name when the data names it (and the name is not just the number), else its number."""
    if class_names and 0 <= index < len(class_names) and str(class_names[index]) not in ("", str(index)):
        return str(class_names[index])
    return str(index)


def class_names_of(meta: Mapping[str, Any] | None) -> list[str] | None:
    """Class names a run recorded for its data (``run.json`` ``data.class_names``), if any."""
    data = (meta or {}).get("data")
    names = data.get("class_names") if isinstance(data, Mapping) else None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


# --------------------------------------------------------------------------------------------
# drawing


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_PX)  # Pillow >= 10.1 with FreeType
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tiles_to_uint8(images: Tensor, min_px: int) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] -> ``[N, H*k, W*k, 3]`` uint8, upscaled nearest neighbour."""
    rgb = to_rgb(torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0, 1))
    k = upscale_factor(rgb.shape[-2], rgb.shape[-1], min_px)
    return (upscale(rgb, k) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def captioned_grid(
    columns: Sequence[Tensor],
    captions: Sequence[str],
    headings: Sequence[str] = (),
    title: str = "",
    min_px: int = MIN_GRID_PX,
) -> Image.Image:
    """An RGB picture of ``B`` rows of images with a caption under each row.

    Args:
        columns: ``K`` tensors ``[B, C, H, W]`` in ``[0, 1]`` (all the same shape), drawn left
            to right; each image upscaled (nearest neighbour) to at least ``min_px``.
        captions: ``B`` lines, one under each row (cut to the row's width).
        headings: Optional column headings drawn above the first row.
        title: Optional line above everything.
        min_px: Shorter side of every drawn image at least this many pixels.
    """
    if not columns:
        raise ValueError("captioned_grid needs at least one column")
    b = len(columns[0])
    if len(captions) != b or any(c.dim() != 4 or len(c) != b or c.shape[-2:] != columns[0].shape[-2:] for c in columns):
        raise ValueError("every column must hold [B, C, H, W] images of one size, and there must be one caption per row")
    tiles = np.stack([_tiles_to_uint8(c, min_px) for c in columns], axis=1)  # [B, K, h, w, 3]
    h, w = tiles.shape[2], tiles.shape[3]
    ncol = len(columns)
    width = ncol * (w + PAD) + PAD
    top = (CAPTION_PX if title else 0) + (CAPTION_PX if headings else 0)
    row_h = h + PAD + CAPTION_PX
    canvas = np.full((top + b * row_h + PAD, width, 3), 255, dtype=np.uint8)
    for i in range(b):  # at most a grid's worth of rows (16): composition, not a hot path
        y = top + i * row_h + PAD
        canvas[y - PAD : y + h + PAD, :] = PAD_VALUE
        for j in range(ncol):
            x = PAD + j * (w + PAD)
            canvas[y : y + h, x : x + w] = tiles[i, j]
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    font = _font()
    y = 2
    if title:
        draw.text((PAD + 2, y), _fit(draw, title, width - 2 * PAD), fill=(0, 0, 0), font=font)
        y += CAPTION_PX
    if headings:
        for j, heading in enumerate(headings[:ncol]):
            draw.text((PAD + j * (w + PAD) + 2, y), _fit(draw, heading, w - 4), fill=(60, 60, 60), font=font)
    for i, caption in enumerate(captions):
        y = top + i * row_h + PAD + h + PAD + 1
        draw.text((PAD + 2, y), _fit(draw, caption, width - 2 * PAD - 4), fill=(0, 0, 0), font=font)
    return image


def comparison_image(query: Tensor, counterfactual: Tensor, captions: Sequence[str], min_px: int = MIN_GRID_PX) -> Image.Image:
    """Captioned query | counterfactual | signed difference rows (``[B, C, H, W]`` each)."""
    return captioned_grid(
        [query, counterfactual, signed_difference(query, counterfactual)],
        captions,
        headings=("query", "counterfactual", "difference"),
        min_px=min_px,
    )


def sequence_image(
    query: Tensor, frames: Tensor, captions: Sequence[str], spec: OutputSpec | None = None, min_px: int = MIN_GRID_PX
) -> Image.Image:
    """Captioned query | frame 1 | ... | frame K | difference of the last frame (``frames``: ``[B, K, C, H, W]``)."""
    k = frames.shape[1]
    cols = [query, *(frames[:, i] for i in range(k)), signed_difference(query, frames[:, -1])]
    headings = ("query", *(f"{i + 1}/{k}" for i in range(k)), "difference")
    return captioned_grid(cols, captions, headings=headings, title=spec.caption if spec else "", min_px=min_px)


def save_png(image: Image.Image | Tensor, path: Path) -> Path:
    """Write a picture (PIL image or ``[3, H, W]`` tensor in [0, 1]) as PNG atomically."""
    if isinstance(image, Tensor):
        from torchvision.utils import save_image

        grid = image
        atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    else:
        picture = image
        atomic_write(path, lambda tmp: picture.save(tmp, format="png"))
    return path


# --------------------------------------------------------------------------------------------
# explain runs


def write_grids(rundir: RunDir, rows: Sequence[Mapping[str, Any]], num_images: int, per_grid: int = 16) -> list[Path]:
    """Write grids of the first ``num_images`` records into ``<run>/grids/`` (atomic per file).

    Reads the class names and the declared image-sequence outputs from the run's ``run.json``;
    a declared sequence absent from the shards is not drawn.
    """
    if num_images <= 0 or not rows:
        return []
    meta = rundir.read_meta() or {}
    names = class_names_of(meta)
    sequences = declared_image_sequences(meta.get("method"))
    chosen = list(rows[:num_images])
    cache: dict[str, dict[str, Tensor]] = {}
    picked: dict[str, list[Tensor]] = {}
    for r in chosen:  # one tensor row per record, shards loaded once each
        if r["shard"] not in cache:
            cache[r["shard"]] = rundir.load_shard(r["shard"])
        shard = cache[r["shard"]]
        for key in ("query", "counterfactual", *sequences):
            if key in shard:
                picked.setdefault(key, []).append(shard[key][r["row"]])
    q, c = torch.stack(picked["query"]).float(), torch.stack(picked["counterfactual"]).float()
    captions = [RecordCaption.of_row(r).text(names) for r in chosen]
    out_dir = rundir.root / "grids"
    out_dir.mkdir(exist_ok=True)
    paths = []
    for g, start in enumerate(range(0, len(chosen), per_grid)):
        sl = slice(start, start + per_grid)
        paths.append(save_png(comparison_image(q[sl], c[sl], captions[sl]), out_dir / f"grid-{g:03d}.png"))
    drawn = [k for k in sequences if len(picked.get(k, [])) == len(chosen) and picked[k][0].dim() == q.dim()]
    for key in drawn:
        frames = torch.stack(picked[key]).float()
        stem = "progression" if len(drawn) == 1 else f"progression-{key}"
        for g, start in enumerate(range(0, len(chosen), per_grid)):
            sl = slice(start, start + per_grid)
            image = sequence_image(q[sl], frames[sl], captions[sl], sequences[key])
            paths.append(save_png(image, out_dir / f"{stem}-{g:03d}.png"))
    return paths
