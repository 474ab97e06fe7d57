"""Self-contained HTML report comparing counterfactual runs.

Everything the page shows is inline: CSS in a ``<style>`` block, images and plots as
``data:image/png;base64,...`` URIs, so the single file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_cf.report.formatting import (
    MISSING,
    as_number,
    cell,
    columns_of,
    format_value,
    is_missing,
)
from lit_cf.report.images import signed_difference_with_scale, upscale, upscale_factor

MIN_IMAGE_PX = 96  # small images are upscaled, nearest neighbour, to at least this size (28-px digits: 4x)
METRICS_PER_FIGURE = 12
MAX_ATTRIBUTION_BARS = 40
POSITIVE_COLOUR = "#b2182b"
NEGATIVE_COLOUR = "#2166ac"


@dataclass
class GridRow:
    """One record of a grid: query | counterfactual | signed difference, with notes beside it.

    ``query`` and ``counterfactual`` are ``[C, H, W]`` tensors in ``[0, 1]`` (C = 1 or 3);
    ``attributions`` are (descriptor name, score) pairs, already chosen (top-k) by the caller.
    """

    query: Tensor
    counterfactual: Tensor
    caption: str
    attributions: list[tuple[str, float]] | None = None


@dataclass
class ReportSection:
    """Everything the report shows for one run/method."""

    name: str
    grid_rows: list[GridRow] = field(default_factory=list)
    best: list[GridRow] = field(default_factory=list)
    worst: list[GridRow] = field(default_factory=list)
    per_pair: list[dict[str, Any]] = field(default_factory=list)
    # (descriptor name, score, ci_low, ci_high)
    global_attributions: list[tuple[str, float, float, float]] | None = None
    # declared image-sequence outputs of the run's method (e.g. stages), drawn as progression strips
    sequences: list[SequenceGrid] = field(default_factory=list)


@dataclass
class SequenceRow:
    """One record of an image-sequence output: query | frame 1 ... frame K | difference of frame K.

    ``frames`` is ``[K, C, H, W]`` in ``[0, 1]``, the same image shape as ``query``.
    """

    query: Tensor
    frames: Tensor
    caption: str


@dataclass
class SequenceGrid:
    """The rows of one declared image-sequence output of a run, with the method's caption for it."""

    name: str
    caption: str
    rows: list[SequenceRow] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# images


def _image_tensor(x: Any, what: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] < 1 or t.shape[1] < 1 or t.shape[2] < 1:
        raise ValueError(f"{what} must be a [C, H, W] image tensor, got shape {tuple(t.shape)}")
    return torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0)


def _display_array(t: Tensor, min_px: int = MIN_IMAGE_PX) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> uint8 ``H x W`` (grey) or ``H x W x 3`` (RGB), upscaled.

    Nearest neighbour (:func:`~lit_cf.report.images.upscale`, as in the PNG grids) so the
    shorter side is at least ``min_px``.
    """
    t = upscale(t, upscale_factor(t.shape[-2], t.shape[-1], min_px))
    if t.shape[0] == 1:
        t = t[0]
    elif t.shape[0] >= 3:
        t = t[:3].permute(1, 2, 0)  # RGB; a 4th (alpha) channel is ignored
    else:
        t = t.mean(0)
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def signed_difference_map(query: Tensor, counterfactual: Tensor) -> tuple[Tensor, float]:
    """RGB ``[3, H, W]`` map of ``counterfactual - query`` summed over channels, and its scale.

    Red where the counterfactual adds intensity, blue where it removes, white where unchanged;
    scaled by the image's own largest absolute (channel-summed) change, which is returned too
    (0.0 for an unchanged image). The one map of :mod:`lit_cf.report.images`, as in the PNG grids.
    """
    rgb, scale = signed_difference_with_scale(query[None], counterfactual[None])
    return rgb[0], float(scale[0])


def _png_data_uri(array: np.ndarray) -> tuple[str, int, int]:
    """PNG data URI of a uint8 image (from :func:`_display_array`), with its width and height."""
    image = Image.fromarray(np.ascontiguousarray(array))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _data_uri(buf.getvalue()), image.size[0], image.size[1]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(uri: str, alt: str, width: int | None = None, height: int | None = None, cls: str = "") -> str:
    size = f' width="{width}" height="{height}"' if width and height else ""
    klass = f' class="{cls}"' if cls else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{size}{klass}>'


# --------------------------------------------------------------------------------------------
# plots (matplotlib without pyplot: no global backend or figure state is touched)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return _data_uri(buf.getvalue())


def _plain(text: Any, limit: int = 0) -> str:
    """Text for matplotlib: ``$`` escaped so names never turn into mathtext; optionally shortened."""
    s = " ".join(str(text).split())
    if limit and len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    return s.replace("$", r"\$")


def numeric_columns(table: list[dict[str, Any]], label_column: str | None) -> list[str]:
    """Columns (except the label column) whose present values are all numbers, at least one finite."""
    out = []
    for column in columns_of(table):
        if column == label_column:
            continue
        values = [cell(r, column) for r in table]
        if any(v is not None and not is_missing(v) and as_number(v) is None for v in values):
            continue  # text (or flags) in the column
        numbers = [x for x in (as_number(v) for v in values) if x is not None]
        if any(math.isfinite(x) for x in numbers):
            out.append(column)
    return out


def _metric_figures(table: list[dict[str, Any]], label_column: str | None) -> list[tuple[str, list[str]]]:
    """Bar charts of every numeric column across the table's rows, up to 12 subplots a figure."""
    metrics = numeric_columns(table, label_column)
    if not metrics:
        return []
    labels = [_plain(format_value(cell(r, label_column)) if label_column else str(i + 1), 22) for i, r in enumerate(table)]
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    colours = [palette(i % 10) for i in range(len(table))]
    rotate = len(table) > 3 or max(len(s) for s in labels) > 10
    figures = []
    for start in range(0, len(metrics), METRICS_PER_FIGURE):
        chunk = metrics[start : start + METRICS_PER_FIGURE]
        ncols = min(4, len(chunk))
        nrows = math.ceil(len(chunk) / ncols)
        panel_w = max(2.9, 0.45 * len(table) + 1.4)
        fig = _new_figure(panel_w * ncols, (2.8 if rotate else 2.4) * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, chunk):
            values = [as_number(cell(r, metric)) for r in table]
            finite = [v is not None and math.isfinite(v) for v in values]
            heights = [v if ok else 0.0 for v, ok in zip(values, finite)]
            x = np.arange(len(table))
            bars = ax.bar(x, heights, color=colours, edgecolor="#333333", linewidth=0.5)
            ax.bar_label(bars, labels=[format_value(v) for v in values], fontsize=7, padding=2)
            ax.set_title(_plain(metric, 40), fontsize=10)
            ax.set_xticks(x, labels, fontsize=8, rotation=30 if rotate else 0, ha="right" if rotate else "center")
            ax.tick_params(axis="y", labelsize=8)
            ax.axhline(0, color="#333333", linewidth=0.6)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            ax.margins(y=0.18)
        for ax in axes[len(chunk) :]:
            ax.set_visible(False)
        figures.append((_figure_png(fig), chunk))
    return figures


def _attribution_rows(attributions: Sequence[Sequence[Any]]) -> list[tuple[str, float, float, float]]:
    rows: list[tuple[str, float, float, float]] = []
    for i, entry in enumerate(attributions):
        if len(entry) != 4:
            raise ValueError(f"global attribution {i} must be (name, score, ci_low, ci_high), got {len(entry)} values")
        name, score, lo, hi = entry
        rows.append((str(name), _float_or_nan(score), _float_or_nan(lo), _float_or_nan(hi)))
    # strongest first; NaN scores last
    return sorted(rows, key=lambda r: -abs(r[1]) if math.isfinite(r[1]) else math.inf)


def _float_or_nan(v: Any) -> float:
    x = as_number(v)
    return math.nan if x is None else x


def _attribution_figure(rows: list[tuple[str, float, float, float]]) -> str:
    """Horizontal bars of descriptor scores with confidence intervals, strongest on top."""
    shown = rows[:MAX_ATTRIBUTION_BARS]
    n = len(shown)
    fig = _new_figure(7.5, 0.22 * n + 1.2)
    ax = fig.subplots()
    y = np.arange(n)
    scores = [s if math.isfinite(s) else 0.0 for _, s, _, _ in shown]
    lower = [max(s - lo, 0.0) if math.isfinite(s) and math.isfinite(lo) else 0.0 for _, s, lo, _ in shown]
    upper = [max(hi - s, 0.0) if math.isfinite(s) and math.isfinite(hi) else 0.0 for _, s, _, hi in shown]
    colours = [POSITIVE_COLOUR if s >= 0 else NEGATIVE_COLOUR for s in scores]
    ax.barh(y, scores, xerr=[lower, upper], color=colours, alpha=0.85, ecolor="#222222", capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_yticks(y, [_plain(name, 32) for name, *_ in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#333333", linewidth=0.6)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("score (bars: confidence interval)", fontsize=8)
    return _figure_png(fig)


# --------------------------------------------------------------------------------------------
# HTML pieces


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_table(rows: list[dict[str, Any]], cls: str = "data") -> str:
    if not rows:
        return '<p class="empty">No rows.</p>'
    columns = columns_of(rows)
    head = "".join(f'<th scope="col">{_e(c)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(columns):
            v = cell(row, c)
            numeric = as_number(v) is not None or v is None
            tag = "th" if i == 0 else "td"
            scope = ' scope="row"' if i == 0 else ""
            klass = ' class="num"' if numeric and i > 0 else ""
            cells.append(f"<{tag}{scope}{klass}>{_e(format_value(v))}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _meta_table(meta: dict[str, Any]) -> str:
    if not meta:
        return ""
    rows = []
    for key, value in meta.items():
        if isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, default=str, ensure_ascii=False)
        else:
            text = format_value(value)
        rows.append(f'<tr><th scope="row">{_e(key)}</th><td>{_e(text)}</td></tr>')
    return f'<table class="meta"><tbody>{"".join(rows)}</tbody></table>'


def _attribution_list(attributions: list[tuple[str, float]] | None) -> str:
    if not attributions:
        return ""
    items = []
    for entry in attributions:
        name, score = entry[0], _float_or_nan(entry[1])
        if math.isfinite(score):
            text, klass = f"{name} {score:+.3f}", "pos" if score >= 0 else "neg"
        else:
            text, klass = f"{name} {MISSING}", "nan"
        items.append(f'<li class="{klass}">{_e(text)}</li>')
    return f'<ul class="attr">{"".join(items)}</ul>'


def _grid_html(rows: list[GridRow], where: str) -> str:
    body = []
    for i, row in enumerate(rows):
        what = f"{where}, row {i}"
        q = _image_tensor(row.query, f"query ({what})")
        c = _image_tensor(row.counterfactual, f"counterfactual ({what})")
        if q.shape != c.shape:
            raise ValueError(f"query and counterfactual shapes differ ({what}): {tuple(q.shape)} vs {tuple(c.shape)}")
        diff, scale = signed_difference_map(q, c)
        scale_text = _e(format_value(scale)) if scale > 0 else "0 (unchanged)"
        cells = []
        for alt, arr, extra in (
            ("query", _display_array(q), ""),
            ("counterfactual", _display_array(c), ""),
            ("signed difference", _display_array(diff), f'<div class="scale">max |&Delta;| = {scale_text}</div>'),
        ):
            uri, w, h = _png_data_uri(arr)
            cells.append(f"<td>{_img(uri, alt, w, h, 'px')}{extra}</td>")
        notes = f'<div class="caption">{_e(row.caption)}</div>{_attribution_list(row.attributions)}'
        body.append(f'<tr>{"".join(cells)}<td class="notes">{notes}</td></tr>')
    head = "".join(f'<th scope="col">{h}</th>' for h in ("Query", "Counterfactual", "Difference", "Notes"))
    return f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _sequence_html(sequence: SequenceGrid, where: str) -> str:
    """A declared image sequence: query | frame 1 ... frame K | difference of the last frame | notes."""
    body = []
    k = 0
    for i, row in enumerate(sequence.rows):
        what = f"{where}, row {i}"
        q = _image_tensor(row.query, f"query ({what})")
        frames = torch.as_tensor(row.frames).detach().to("cpu", torch.float32)
        if frames.dim() != 4 or frames.shape[0] < 1 or frames.shape[1:] != q.shape:
            raise ValueError(f"frames must be [K, C, H, W] images of the query's shape ({what}), got {tuple(frames.shape)}")
        k = max(k, len(frames))
        diff, scale = signed_difference_map(q, _image_tensor(frames[-1], f"last frame ({what})"))
        images = [("query", q)] + [(f"frame {j + 1}", _image_tensor(f, f"frame {j + 1} ({what})")) for j, f in enumerate(frames)]
        images.append(("signed difference of the last frame", diff))
        cells = []
        for alt, t in images:
            uri, w, h = _png_data_uri(_display_array(t))
            cells.append(f"<td>{_img(uri, alt, w, h, 'px')}</td>")
        body.append(f'<tr>{"".join(cells)}<td class="notes"><div class="caption">{_e(row.caption)}</div></td></tr>')
    head = "".join(f'<th scope="col">{h}</th>' for h in ("Query", *(f"{j + 1}/{k}" for j in range(k)), "Difference", "Notes"))
    caption = f"<figcaption>{_e(sequence.caption)}</figcaption>" if sequence.caption else ""
    table = f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return f'<figure>{caption}<div class="scroll">{table}</div></figure>'


def _section_html(index: int, section: ReportSection) -> str:
    where = f"section {section.name!r}"
    parts = [f'<section class="run" id="run-{index}"><h2>{_e(section.name)}</h2>']
    for heading, grid_rows, key in (
        ("Examples", section.grid_rows, "examples"),
        ("Best cases", section.best, "best"),
        ("Worst cases", section.worst, "worst"),
    ):
        if grid_rows:
            parts.append(f"<h3>{heading}</h3>{_grid_html(list(grid_rows), f'{where}, {key}')}")
    for sequence in section.sequences:
        if sequence.rows:
            parts.append(f"<h3>{_e(sequence.name)}</h3>{_sequence_html(sequence, f'{where}, {sequence.name}')}")
    if section.per_pair:
        parts.append(f"<h3>Per source &rarr; target pair</h3>{_data_table(list(section.per_pair))}")
    if section.global_attributions:
        ranked = _attribution_rows(section.global_attributions)
        note = (
            f"<figcaption>Top {MAX_ATTRIBUTION_BARS} of {len(ranked)} descriptors by |score|.</figcaption>"
            if len(ranked) > MAX_ATTRIBUTION_BARS
            else ""
        )
        table = [{"descriptor": n, "score": s, "ci low": lo, "ci high": hi} for n, s, lo, hi in ranked]
        parts.append(
            "<h3>Global attributions</h3>"
            f"<figure>{_img(_attribution_figure(ranked), f'global attributions of {section.name}', cls='plot')}{note}"
            "</figure>"
            f"<details><summary>Values</summary>{_data_table(table)}</details>"
        )
    if len(parts) == 1:
        parts.append('<p class="empty">Nothing recorded for this run.</p>')
    parts.append("</section>")
    return "".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 24px 40px}
h1{font-size:1.6em;margin:.4em 0}h2{font-size:1.3em;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d8d8d8;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#eef0f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.meta th{background:#f4f4f4;font-weight:600}table.meta{font-size:.9em}
.scroll{overflow-x:auto;max-width:100%}
table.grid td{text-align:center}table.grid td.notes{text-align:left;min-width:16em;max-width:28em}
img.px{image-rendering:pixelated;max-width:224px;height:auto;display:block;margin:auto}
img.plot{max-width:100%;height:auto}
figure{margin:.6em 0}figcaption{font-size:.85em;color:#555}
.caption{white-space:pre-line}.scale{font-size:.8em;color:#555}
ul.attr{list-style:none;padding:0;margin:.4em 0 0;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace}
li.pos{color:#b2182b}li.neg{color:#2166ac}li.nan{color:#777}
.legend{font-size:.85em;color:#444}
.swatch{display:inline-block;width:80px;height:10px;vertical-align:middle;border:1px solid #999;
background:linear-gradient(to right,#2166ac,#fff,#b2182b)}
nav ul{margin:.3em 0;padding-left:1.2em}.empty{color:#777;font-style:italic}
footer{margin-top:2em;font-size:.8em;color:#777}
"""


def render_report(title: str, table: list[dict[str, Any]], sections: list[ReportSection], meta: dict[str, Any]) -> str:
    """The report as one HTML string (see :func:`write_report`)."""
    from lit_cf import __version__

    if not isinstance(table, list) or not all(isinstance(r, dict) for r in table):
        raise TypeError("table must be a list of dicts (one per method/run)")
    for s in sections:
        if not isinstance(s, ReportSection):
            raise TypeError(f"sections must be ReportSection objects, got {type(s).__name__}")
    label_column = columns_of(table)[0] if table else None
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{_e(title)}</h1>{_meta_table(dict(meta or {}))}</header>",
    ]
    if len(sections) > 1:
        links = "".join(f'<li><a href="#run-{i}">{_e(s.name)}</a></li>' for i, s in enumerate(sections))
        parts.append(f"<nav><ul>{links}</ul></nav>")
    parts.append(f'<section id="comparison"><h2>Comparison</h2>{_data_table(table)}')
    for uri, metrics in _metric_figures(table, label_column):
        parts.append(f"<figure>{_img(uri, 'bar charts of ' + ', '.join(metrics), cls='plot')}</figure>")
    parts.append("</section>")
    if any(s.grid_rows or s.best or s.worst or any(q.rows for q in s.sequences) for s in sections):
        parts.append(
            '<p class="legend">Difference maps: <span class="swatch"></span> blue where the counterfactual '
            "removes intensity, white where unchanged, red where it adds (summed over channels), "
            "each scaled by its own max |&Delta;|.</p>"
        )
    parts.extend(_section_html(i, s) for i, s in enumerate(sections))
    parts.append(f"<footer>Generated by lit-cf {_e(__version__)}.</footer></main></body></html>\n")
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    from lit_cf.runs.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_report(
    path: str | Path,
    title: str,
    table: list[dict[str, Any]],
    sections: list[ReportSection],
    meta: dict[str, Any],
) -> Path:
    """Write a self-contained HTML report and return its path.

    ``table`` has one dict per method/run (first key: the row label, e.g. "method"); every numeric
    column gets a bar chart. Each :class:`ReportSection` adds grids (query | counterfactual |
    signed difference), best/worst cases, progression strips of each declared image sequence
    (:class:`SequenceGrid`), a per source->target table and a global attribution chart.
    ``meta`` is shown as a key/value table at the top. The file is written atomically
    (temporary file in the same folder, then ``os.replace``).
    """
    path = Path(path)
    _write_atomic(path, render_report(title, table, sections, meta))
    return path
