"""lit_cf.data.ImageFolderDataModule: layouts, transform, splits, bad folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lit_cf.cli import main
from lit_cf.data import ImageFolderDataModule
from lit_cf.errors import UserError
from tests.conftest import CONFIGS
from tests.image_folder_fixtures import write_image_folder


def test_class_subfolders_labels_order_and_transform(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=5, size=20)
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(root / "dog" / "wide.jpg")  # non-square JPEG
    (root / "dog" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(root), image_size=16, channels=3, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert dm.class_names == ("cat", "dog", "fox") and dm.num_classes == 3 and dm.image_shape == (3, 16, 16)
    full = dm.dataset("all")
    assert len(full) == 16
    labels = [int(full[i]["label"]) for i in range(len(full))]
    assert labels == [0] * 5 + [1] * 6 + [2] * 5
    assert [p.name for p in dm.files[5:11]] == ["00.png", "01.png", "02.png", "03.png", "04.png", "wide.jpg"]
    x = full[10]["image"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and float(x.max()) == 0.0
    x0 = full[0]["image"]
    assert 0 <= float(x0.min()) and float(x0.max()) <= 1 and float(x0.max()) > 0.5
    # seeded, disjoint, covering splits; the same seed gives the same split
    parts = {s: dm.split_positions(s) for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(16))
    assert len(parts["test"]) == 3 and len(parts["val"]) == 3
    again = ImageFolderDataModule(str(root), image_size=16, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert again.split_positions("test") == parts["test"]
    other = ImageFolderDataModule(str(root), image_size=16, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert other.split_positions("test") != parts["test"]
    test = dm.dataset("test")
    assert [int(test[i]["index"]) for i in range(len(test))] == list(range(3))
    torch.testing.assert_close(test[0]["image"], full[parts["test"][0]]["image"])


def test_flat_folder_gray_and_files(tmp_path):
    root = write_image_folder(tmp_path / "flat", per_class=2, size=12, flat=True)
    dm = ImageFolderDataModule(str(root), image_size=8, channels=1)
    assert dm.num_classes == 0 and not dm.labelled
    sample = dm.dataset("all")[0]
    assert sample["image"].shape == (1, 8, 8) and int(sample["label"]) == -1
    files = sorted(str(p) for p in root.iterdir())[:3]
    listed = ImageFolderDataModule(files=files[::-1], image_size=8)
    assert [str(p) for p in listed.files] == files[::-1]


def test_corrupt_image_error_or_skip(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2, size=12)
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dm = ImageFolderDataModule(str(root), image_size=8)
    with pytest.raises(UserError, match="broken.png"):
        dm.dataset("all")
    skip = ImageFolderDataModule(str(root), image_size=8, on_error="skip")
    with pytest.warns(UserWarning, match="broken.png"):
        data = skip.dataset("all")
    assert len(data) == 6 and bad not in skip.files


@pytest.mark.parametrize("layout,match", [("missing", "not found"), ("empty", "no images"), ("text", "no images")])
def test_empty_or_missing_folder(tmp_path, layout, match):
    root = tmp_path / "imgs"
    if layout != "missing":
        (root / "sub").mkdir(parents=True)
    if layout == "text":
        (root / "readme.txt").write_text("x")
        (root / "sub" / "a.csv").write_text("x")
    with pytest.raises(UserError, match=match):
        ImageFolderDataModule(str(root))


def test_bad_settings(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1, size=8)
    for kwargs, match in (
        ({"channels": 2}, "channels"),
        ({"on_error": "ignore"}, "on_error"),
        ({"test_fraction": 0.7, "val_fraction": 0.4}, "sum"),
    ):
        with pytest.raises(UserError, match=match):
            ImageFolderDataModule(str(root), **kwargs)
    with pytest.raises(UserError, match="split 'val'.*is empty"):
        ImageFolderDataModule(str(root), val_fraction=0.0).dataset("val")


def test_flat_folder_label_rules_are_clear_errors(tmp_path, capsys):
    import torchvision
    from safetensors.torch import save_file

    root = write_image_folder(tmp_path / "flat", per_class=2, size=16, flat=True)
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "m.safetensors")
    module = "{class_path: torchvision.models.resnet18, init_args: {num_classes: 3}}"
    clf = f"{{module: {module}, weights: {tmp_path / 'm.safetensors'}}}"
    base = [
        "explain",
        f"--config={CONFIGS / 'data/image_folder.yaml'}",
        f"--data.init_args.root={root}",
        "--data.init_args.image_size=16",
        f"--config={CONFIGS / 'explain/pixel.yaml'}",
        "--model.init_args.steps=2",
        "--split=all",
        "--trainer.logger=false",
        f"--classifier={clf}",
    ]
    for extra, match in (
        (["--target=label"], "target: label needs labelled images"),
        (["--select=correct"], "select: correct needs labelled images"),
        (["--source_class=1"], "source_class needs labelled images"),
    ):
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as exc:
            main([*base, f"--output_dir={out}", *extra])
        assert exc.value.code == 2 and match in capsys.readouterr().err and not out.exists()
    out = tmp_path / "ok"
    main([*base, f"--output_dir={out}", "--target=most_likely_other", "--num_queries=2"])
    assert (out / "manifest.jsonl").exists()
