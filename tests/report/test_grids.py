"""Run grids: captioned, upscaled, and every declared image sequence drawn without naming a method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lit_cf.report import GridRow, ReportSection, SequenceGrid, SequenceRow
from lit_cf.report.grids import (
    CAPTION_PX,
    MIN_GRID_PX,
    PAD,
    RecordCaption,
    captioned_grid,
    class_label,
    class_names_of,
    write_grids,
)
from lit_cf.report.html import render_report
from lit_cf.report.images import signed_difference, signed_difference_with_scale, upscale
from lit_cf.report.outputs import IMAGE_SEQUENCE, OutputSpec, declared_image_sequences
from lit_cf.runs import RunDir


def test_caption_names_classes_and_target_probabilities():
    cap = RecordCaption(source=3, target=8, before=0.021, after=0.914)
    assert cap.text() == "3 -> 8  p(8) 0.02 -> 0.91"
    assert cap.text([str(i) for i in range(10)]) == "3 -> 8  p(8) 0.02 -> 0.91"  # digit names are the numbers
    fashion = ["T-shirt/top", "Trouser", "Pullover"]
    assert RecordCaption(0, 1, 0.1, 0.8, prefix="#7").text(fashion) == "#7 T-shirt/top -> Trouser  p(Trouser) 0.10 -> 0.80"
    assert class_label(5, fashion) == "5"  # a class without a name keeps its number
    row = {"orig_pred": 2, "target": 0, "orig_target_prob": 0.25, "final_target_prob": 0.5}
    assert RecordCaption.of_row(row).text(fashion) == "Pullover -> T-shirt/top  p(T-shirt/top) 0.25 -> 0.50"
    assert RecordCaption.of_row(row, after=0.75).after == 0.75
    assert class_names_of({"data": {"class_names": fashion}}) == fashion
    assert class_names_of({"data": "MNISTDataModule"}) is None and class_names_of(None) is None


def test_captioned_grid_upscales_and_writes_one_caption_per_row():
    q = torch.zeros(3, 1, 28, 28)
    cf = q.clone()
    cf[:, 0, 0, 0] = 1.0
    image = captioned_grid([q, cf, signed_difference(q, cf)], ["3 -> 8", "", "1 -> 2"], headings=("query", "cf", "diff"))
    tile = 28 * 4  # 28-px digits are drawn 4x: the shorter side reaches MIN_GRID_PX
    assert tile >= MIN_GRID_PX
    row_h = tile + PAD + CAPTION_PX
    assert image.size == (3 * (tile + PAD) + PAD, CAPTION_PX + 3 * row_h + PAD)
    px = np.asarray(image)
    top = CAPTION_PX
    # nearest neighbour: the changed pixel is a 4x4 block, red in the difference column
    diff_x = PAD + 2 * (tile + PAD)
    assert px[top + PAD + 3, diff_x + 3].tolist() == [255, 0, 0]
    assert px[top + PAD + 4, diff_x + 4].tolist() == [255, 255, 255]
    assert px[top + PAD + 3, PAD + (tile + PAD) + 3].tolist() == [255, 255, 255]  # the cf's white pixel block

    def strip(i: int) -> np.ndarray:  # the caption strip under row i
        y = top + i * row_h + PAD + tile + PAD
        return px[y : y + CAPTION_PX - 2]

    assert (strip(0) < 100).any() and (strip(2) < 100).any()  # text drawn
    assert not (strip(1) < 100).any()  # an empty caption draws nothing
    with pytest.raises(ValueError, match="one caption per row"):
        captioned_grid([q], ["only one"])


def test_signed_difference_scale_and_upscale():
    q = torch.zeros(2, 3, 4, 4)
    cf = q.clone()
    cf[0, :, 1, 1] = 0.5  # channel sum 1.5
    rgb, scale = signed_difference_with_scale(q, cf)
    assert scale.tolist() == [1.5, 0.0]
    assert rgb[0, :, 1, 1].tolist() == [1.0, 0.0, 0.0] and (rgb[1] == 1).all()  # unchanged: white
    up = upscale(torch.arange(4.0).view(1, 2, 2), 3)
    assert up.shape == (1, 6, 6) and up[0, 2, 2] == 0 and up[0, 3, 3] == 3


def _write_run(root, method_meta, tensors, n):
    rundir = RunDir(root)
    root.mkdir()
    rundir.shards.mkdir()
    rundir.write_meta({"status": "running", "method": method_meta, "data": {"class_names": ["zero", "one", "two"]}})
    rows = [
        {"record": i, "orig_pred": i % 3, "target": (i + 1) % 3, "orig_target_prob": 0.1, "final_target_prob": 0.9}
        for i in range(n)
    ]
    rundir.write_chunk(0, tensors, rows)
    return rundir, rows


def test_write_grids_draws_declared_image_sequences_only(tmp_path):
    n, k = 5, 3
    q, cf = torch.rand(n, 1, 8, 8), torch.rand(n, 1, 8, 8)
    tensors = {"query": q, "counterfactual": cf, "frames": torch.rand(n, k, 1, 8, 8), "stages": torch.rand(n, 2, 1, 8, 8)}
    # "frames" is declared an image sequence; "stages" is saved but not declared, so it is not drawn
    meta = {"outputs": {"frames": OutputSpec(IMAGE_SEQUENCE, "my frames").to_json(), "missing": {"kind": IMAGE_SEQUENCE}}}
    rundir, rows = _write_run(tmp_path / "run", meta, tensors, n)
    paths = write_grids(rundir, rows, num_images=4, per_grid=3)
    assert [p.name for p in paths] == ["grid-000.png", "grid-001.png", "progression-000.png", "progression-001.png"]
    tile = 8 * 12  # 8-px images drawn 12x
    with Image.open(paths[0]) as im:
        assert im.size == (3 * (tile + PAD) + PAD, CAPTION_PX + 3 * (tile + PAD + CAPTION_PX) + PAD)
    with Image.open(paths[2]) as im:  # query, 3 frames, difference; a title line and headings
        assert im.size == ((k + 2) * (tile + PAD) + PAD, 2 * CAPTION_PX + 3 * (tile + PAD + CAPTION_PX) + PAD)
    with Image.open(paths[3]) as im:  # the 4th record alone
        assert im.size[1] == 2 * CAPTION_PX + (tile + PAD + CAPTION_PX) + PAD
    # a method that declares nothing gets the comparison grids only
    rundir2, rows2 = _write_run(tmp_path / "run2", {"class_path": "x"}, tensors, n)
    assert [p.name for p in write_grids(rundir2, rows2, num_images=2)] == ["grid-000.png"]
    assert write_grids(rundir2, rows2, num_images=0) == []


def test_declared_image_sequences_ignores_malformed_entries():
    meta = {"outputs": {"a": {"kind": IMAGE_SEQUENCE, "caption": "c"}, "b": {"kind": "tensor"}, "c": "image_sequence", 3: {}}}
    assert declared_image_sequences(meta) == {"a": OutputSpec(IMAGE_SEQUENCE, "c")}
    assert declared_image_sequences({"outputs": []}) == {} and declared_image_sequences(None) == {}
    with pytest.raises(ValueError, match="unknown output kind"):
        OutputSpec("video")


def test_report_draws_sequences_with_their_caption():
    q = torch.rand(1, 8, 8)
    frames = torch.rand(4, 1, 8, 8)
    section = ReportSection(
        "run",
        grid_rows=[GridRow(q, frames[-1], "0 -> 1  p(1) 0.10 -> 0.90")],
        sequences=[SequenceGrid("frames", "intermediate images", [SequenceRow(q, frames, "0 -> 1")])],
    )
    text = render_report("t", [], [section], {})
    assert text.count("<img") == 3 + (1 + 4 + 1)
    assert "<figcaption>intermediate images</figcaption>" in text and "<h3>frames</h3>" in text
    assert "0 -&gt; 1  p(1) 0.10 -&gt; 0.90" in text
    bad = ReportSection("run", sequences=[SequenceGrid("frames", "", [SequenceRow(q, torch.rand(4, 1, 9, 9), "x")])])
    with pytest.raises(ValueError, match="frames must be"):
        render_report("t", [], [bad], {})
