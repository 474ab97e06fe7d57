"""The HTML report: self-contained, well-formed, escaped, with decodable images; Markdown tables."""

from __future__ import annotations

import base64
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_cf.report import GridRow, ReportSection, markdown_table, write_report
from lit_cf.report.html import signed_difference_map
from tests.report.chromium import find_chromium, load_page

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
EVIL = "<script>alert('x')</script>"


class _Structure(HTMLParser):
    """Collects <img> sources, every attribute value, and tag-balance errors."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.seen: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.add(tag)
        self.attrs.extend(attrs)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.seen.add(tag)
        self.attrs.extend(attrs)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void element <{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _image(c: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(c, size, size, generator=torch.Generator().manual_seed(seed))


def _rows(c: int, size: int, n: int, seed: int, caption: str = "record") -> list[GridRow]:
    rows = []
    for i in range(n):
        q = _image(c, size, seed + i)
        cf = (q + 0.3 * (_image(c, size, seed + 100 + i) - 0.5)).clamp(0, 1)
        attrs = [("smiling", 0.4321), ("eyeglasses", -0.12)] if i % 2 == 0 else None
        rows.append(GridRow(q, cf, f"{caption} {i}: 3 -> 8, p(target)=0.91", attrs))
    return rows


TABLE = [
    {"method": "pixel", "validity": 0.987654, "l1_closeness": 12.3456, "fid": float("nan"), "n": 64},
    {"method": "deepinversion", "validity": 0.5, "l1_closeness": None, "fid": 33.33333, "n": 64},
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    sections = [
        ReportSection(
            name="pixel",
            grid_rows=_rows(1, 28, 3, 0, caption=EVIL),
            best=_rows(1, 28, 1, 10, caption="valid, L1 = 1.2"),
            worst=_rows(1, 28, 1, 20, caption="invalid: p(target) = 0.02"),
            per_pair=[{"pair": "3->8", "validity": 1.0, "l1": 0.1234567}, {"pair": "8->3", "validity": float("nan"), "l1": 2}],
            global_attributions=[("smiling", 0.3, 0.1, 0.5), ("young", -0.6, -0.8, -0.4), ("bangs", 0.05, float("nan"), 0.1)],
        ),
        ReportSection(
            name="deepinversion",
            grid_rows=_rows(3, 32, 2, 30),
            best=[],
            worst=_rows(3, 32, 1, 40, caption="invalid"),
            per_pair=[],
            global_attributions=None,
        ),
    ]
    meta = {"data": "mnist", "classifier": "runs/cnn/last.ckpt", "date": "2025-01-01", "lit-cf version": "0.1.0"}
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    returned = write_report(out, "Counterfactual report <v1>", TABLE, sections, meta)
    assert returned == out
    return out, out.read_text(encoding="utf-8")


def test_file_written_atomically(report):
    path, text = report
    assert path.is_file() and text.startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_well_formed(report):
    _, text = report
    parser = _Structure()
    parser.feed(text)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    for tag in ("html", "head", "body", "main", "section", "table", "thead", "tbody", "figure", "img", "ul"):
        assert tag in parser.seen, tag


def test_images_are_embedded_pngs(report):
    _, text = report
    parser = _Structure()
    parser.feed(text)
    # 3 images a grid row: (3 + 1 + 1) + (2 + 1) rows, plus the metric chart and one attribution chart
    assert len(parser.imgs) == 3 * 8 + 2
    sizes = []
    for img in parser.imgs:
        src = img.get("src") or ""
        assert src.startswith("data:image/png;base64,"), src[:40]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG"
            im.verify()
            sizes.append(im.size)
        assert img.get("alt")
    grid_sizes = sizes[: 3 * 5]  # the first section's grids (28x28, upscaled)
    assert all(min(s) >= 96 for s in grid_sizes)
    assert (112, 112) in grid_sizes and (96, 96) in sizes  # 28 * 4 and 32 * 3


def test_self_contained(report):
    _, text = report
    assert not re.search(r"https?://", text)
    assert "<link" not in text and "<script" not in text.lower().replace("&lt;script", "")
    parser = _Structure()
    parser.feed(text)
    for name, value in parser.attrs:
        if name == "src":
            assert value and value.startswith("data:image/png;base64,")
        if name == "href":
            assert value and value.startswith("#")
    assert "url(" not in text


def test_names_and_escaping(report):
    _, text = report
    for name in ("pixel", "deepinversion", "validity", "l1_closeness", "fid", "smiling", "mnist"):
        assert name in text
    assert EVIL not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "Counterfactual report &lt;v1&gt;" in text


def test_table_formatting(report):
    _, text = report
    assert ">0.9877<" in text  # 4 significant digits
    assert ">12.35<" in text
    assert ">33.33<" in text
    assert ">64<" in text
    assert text.count(">\u2013<") >= 3  # NaN fid, None l1, NaN per-pair validity
    assert "smiling +0.432" in text and "eyeglasses -0.120" in text


def test_difference_map_colours(tmp_path):
    q = torch.zeros(1, 28, 28)
    cf = q.clone()
    cf[0, 0, 0] = 1.0  # added: red
    cf[0, 1, 1] = -0.5  # removed, half of the max change: light blue
    rgb, scale = signed_difference_map(q, cf)
    assert scale == pytest.approx(1.0)
    assert rgb[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert rgb[:, 1, 1].tolist() == [0.5, 0.5, 1.0]
    assert rgb[:, 5, 5].tolist() == [1.0, 1.0, 1.0]
    _, zero = signed_difference_map(q, q)
    assert zero == 0.0

    # the embedded difference image shows the same colours, upscaled 4x nearest neighbour
    path = write_report(tmp_path / "r.html", "t", [], [ReportSection("only", grid_rows=[GridRow(q, cf.clamp(0, 1), "c")])], {})
    parser = _Structure()
    parser.feed(path.read_text(encoding="utf-8"))
    diff_src = parser.imgs[2]["src"]
    with Image.open(io.BytesIO(base64.b64decode(diff_src.split(",", 1)[1]))) as im:
        im = im.convert("RGB")
        assert im.size == (112, 112)
        assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((3, 3)) == (255, 0, 0)
        assert im.getpixel((50, 50)) == (255, 255, 255)


def test_matches_explain_grids():
    from lit_cf.report.images import signed_difference

    q, cf = _image(3, 8, 1), _image(3, 8, 2)
    ours, _ = signed_difference_map(q, cf)
    torch.testing.assert_close(ours, signed_difference(q[None], cf[None])[0])


def test_overwrite_and_empty_inputs(tmp_path):
    path = tmp_path / "r.html"
    path.write_text("old")
    write_report(path, "empty", [], [ReportSection("nothing")], {})
    text = path.read_text(encoding="utf-8")
    assert "old" not in text and "No rows." in text and "Nothing recorded" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_bad_inputs(tmp_path):
    bad = ReportSection("bad", grid_rows=[GridRow(torch.zeros(1, 28, 28), torch.zeros(1, 32, 32), "x")])
    with pytest.raises(ValueError, match="shapes differ"):
        write_report(tmp_path / "r.html", "t", TABLE, [bad], {})
    with pytest.raises(ValueError, match="ci_low"):
        write_report(tmp_path / "r.html", "t", TABLE, [ReportSection("a", global_attributions=[("x", 1.0)])], {})
    assert not list(tmp_path.iterdir())  # nothing written on failure


def test_many_metrics_split_into_figures(tmp_path):
    table = [{"method": f"m{i}", **{f"metric_{j}": i * j + 0.5 for j in range(14)}, "note": "text"} for i in range(3)]
    path = write_report(tmp_path / "r.html", "t", table, [], {})
    parser = _Structure()
    parser.feed(path.read_text(encoding="utf-8"))
    assert len(parser.imgs) == 2  # 12 + 2 bar charts; the text column is not plotted


def _md_cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |")
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


def test_markdown_table():
    rows = [
        {"method": "pixel", "validity": 0.987654, "fid": float("nan"), "n": 3},
        {"method": "a|b", "validity": None, "fid": 1234567.0, "n": 4},
        {"method": "x", "extra": "only here"},
    ]
    md = markdown_table(rows)
    lines = md.strip().split("\n")
    assert len(lines) == 2 + len(rows)
    header = _md_cells(lines[0])
    assert header == ["method", "validity", "fid", "n", "extra"]
    assert all(len(_md_cells(line)) == len(header) for line in lines)
    assert _md_cells(lines[1]) == ["---", "---:", "---:", "---:", "---"]
    assert _md_cells(lines[2]) == ["pixel", "0.9877", "\u2013", "3", "\u2013"]
    assert _md_cells(lines[3]) == ["a\\|b", "\u2013", "1.235e+06", "4", "\u2013"]
    assert _md_cells(lines[4])[-1] == "only here"
    assert markdown_table([]) == ""


def test_formatting_of_numeric_types():
    import numpy as np

    from lit_cf.report.formatting import format_value

    assert format_value(np.float32(0.123456)) == "0.1235"
    assert format_value(torch.tensor(2.0)) == "2"
    assert format_value(torch.tensor(7)) == "7"
    assert format_value(torch.tensor(float("nan"))) == "\u2013"
    assert format_value(math.inf) == "inf"
    assert format_value(True) == "True"
    assert format_value(12345) == "12345"


@pytest.mark.chromium
def test_renders_in_chromium(report, tmp_path):
    path, _ = report
    page = load_page(path, tmp_path / "profile", window=(1280, 2400))
    assert page.title == "Counterfactual report <v1>"
    assert len(page.images) == 3 * 8 + 2
    assert page.broken_images == []
    assert all(img["complete"] and img["naturalHeight"] > 0 for img in page.images)
    assert page.console == []  # no console errors or warnings, no failed loads, no exceptions
    with Image.open(io.BytesIO(page.screenshot)) as im:
        assert im.width == 1280 and im.height > 2000  # the viewport (window less headless chrome's frame)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank page


@pytest.mark.chromium
def test_chromium_check_flags_broken_images(tmp_path):
    """The checker is not vacuous: an undecodable data URI, a missing file and a script error are caught."""
    good = _Structure()
    good_png = io.BytesIO()
    Image.new("RGB", (5, 3), (200, 10, 10)).save(good_png, format="PNG")
    ok_src = "data:image/png;base64," + base64.b64encode(good_png.getvalue()).decode()
    page_html = tmp_path / "broken.html"
    page_html.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>broken</title></head><body>"
        f"<img alt='ok' src='{ok_src}'>"
        "<img alt='corrupt' src='data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAUAAAAD'>"
        "<img alt='missing' src='no-such-image.png'>"
        "<script>undefinedFunction();</script>"
        "</body></html>",
        encoding="utf-8",
    )
    good.feed(page_html.read_text(encoding="utf-8"))
    assert len(good.imgs) == 3  # well-formed: only a browser sees what is wrong
    page = load_page(page_html, tmp_path / "profile")
    assert [img["alt"] for img in page.images] == ["ok", "corrupt", "missing"]
    assert page.images[0]["naturalWidth"] == 5 and page.images[0]["naturalHeight"] == 3
    assert [img["alt"] for img in page.broken_images] == ["corrupt", "missing"]
    errors = " | ".join(text for _, text in page.errors)
    assert "no-such-image.png" in errors  # the failed load is logged
    assert "undefinedFunction" in errors  # the uncaught exception too


def test_missing_chromium_fails_in_ci(monkeypatch):
    """CI must never skip the browser test: without Chromium it fails there, and skips elsewhere."""
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        find_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        find_chromium()
