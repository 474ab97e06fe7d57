"""CelebA loader on a tiny fixture folder (subset of images, CRLF tables)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from lit_cf.data.celeba import CelebADataModule, CelebADataset, load_celeba_annotations
from tests.fixtures import (
    CELEBA_ATTRIBUTE_NAMES,
    celeba_fixture_color,
    celeba_fixture_spec,
    write_celeba_fixture,
)

SMILING = CELEBA_ATTRIBUTE_NAMES.index("Smiling")


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    return write_celeba_fixture(tmp_path_factory.mktemp("celeba_data"), n=24, seed=0)


def expected_split(spec, split_value):
    rows = [i for i, name in enumerate(spec["names"]) if name in spec["present"]]
    return [i for i in rows if spec["partition"][i] == split_value]


def test_splits_use_only_present_images(celeba_root):
    spec = celeba_fixture_spec(24, seed=0)
    dm = CelebADataModule(root=str(celeba_root))
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 24  # the 6 rows without an image are ignored
    for split, value in (("train", 0), ("val", 1), ("test", 2)):
        rows = expected_split(spec, value)
        assert sizes[split] == len(rows) > 0
        assert dm.dataset(split).files == [spec["names"][i] for i in rows]


def test_samples_and_attributes_match_table(celeba_root):
    spec = celeba_fixture_spec(24, seed=0)
    dm = CelebADataModule(root=str(celeba_root))
    assert dm.attribute_names == CELEBA_ATTRIBUTE_NAMES
    assert dm.num_classes == 2 and dm.class_names == ("not Smiling", "Smiling")
    assert dm.image_shape == (3, 64, 64)
    for split, value in (("train", 0), ("val", 1), ("test", 2)):
        ds = dm.dataset(split)
        for pos, row in enumerate(expected_split(spec, value)):
            s = ds[pos]
            assert set(s) == {"image", "label", "index", "attributes"}
            assert s["index"].dtype == torch.int64 and s["index"].item() == pos
            want = torch.from_numpy(spec["attributes"][row] == 1).float()
            assert s["attributes"].dtype == torch.float32 and torch.equal(s["attributes"], want)
            assert s["label"].dtype == torch.int64 and s["label"].ndim == 0
            assert s["label"].item() == int(spec["attributes"][row, SMILING] == 1)
    labels = torch.cat([dm.dataset(s).labels for s in ("train", "val", "test")])
    assert 0 < labels.float().mean() < 1


def test_image_decoding_crop_and_resize(celeba_root):
    dm = CelebADataModule(root=str(celeba_root), image_size=32)
    ds = dm.dataset("train")
    s = ds[1]
    image = s["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    # flat background color, channels in RGB order, scaled to [0, 1]
    color = torch.tensor(celeba_fixture_color(ds.files[1], seed=0)) / 255.0
    assert torch.allclose(image[:, 2, 2], color, atol=0.03)
    # the mouth band (rows 0.68-0.76 of 218 = 148..165, i.e. 128..145 of the centered 178 crop)
    band = image[:, int(32 * 137 / 178), 16]
    assert torch.allclose(band, torch.full((3,), float(s["label"])), atol=0.05)


def test_full_resolution_crop(celeba_root):
    ds = CelebADataset(root=str(celeba_root), split="test", image_size=178)
    assert ds[0]["image"].shape == (3, 178, 178)


def test_other_target_attribute(celeba_root):
    spec = celeba_fixture_spec(24, seed=0)
    dm = CelebADataModule(root=str(celeba_root), target_attribute="Male")
    assert dm.class_names == ("not Male", "Male")
    male = CELEBA_ATTRIBUTE_NAMES.index("Male")
    rows = expected_split(spec, 0)
    want = torch.tensor([int(spec["attributes"][i, male] == 1) for i in rows])
    assert torch.equal(dm.dataset("train").labels, want)


def test_unknown_attribute(celeba_root):
    with pytest.raises(ValueError, match=r"unknown CelebA attribute 'Smile'.*'Smiling'"):
        CelebADataModule(root=str(celeba_root), target_attribute="Smile")
    with pytest.raises(ValueError, match="unknown CelebA attribute"):
        CelebADataset(root=str(celeba_root), target_attribute="smiling")


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"celeba.*img_align_celeba.*list_attr_celeba\.txt.*list_eval"):
        CelebADataModule(root=str(tmp_path))
    root = write_celeba_fixture(tmp_path, n=6)
    (root / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition\.txt not found"):
        CelebADataModule(root=str(root))


def test_split_without_images(tmp_path):
    root = write_celeba_fixture(tmp_path, n=12)
    spec = celeba_fixture_spec(12)
    for row in expected_split(spec, 1):
        (root / "celeba" / "img_align_celeba" / spec["names"][row]).unlink()
    dm = CelebADataModule(root=str(root))
    assert len(dm.dataset("train")) == len(expected_split(spec, 0))
    with pytest.raises(FileNotFoundError, match=r"no CelebA images of split 'val'"):
        dm.dataset("val")


def test_lf_table_and_unannotated_image(tmp_path):
    root = write_celeba_fixture(tmp_path, n=12, seed=5)
    folder = root / "celeba"
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        path = folder / name
        path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    Image.new("RGB", (178, 218)).save(folder / "img_align_celeba" / "999999.jpg")
    with pytest.warns(UserWarning, match=r"1 of 13 images .* skipped \(e\.g\. 999999\.jpg\)"):
        ann = load_celeba_annotations(root)
    spec = celeba_fixture_spec(12, seed=5)
    rows = expected_split(spec, 0)
    assert ann.files["train"] == [spec["names"][i] for i in rows]
    assert torch.equal(ann.attributes["train"], torch.from_numpy(spec["attributes"][rows] == 1).float())


def test_no_warning_and_loader(celeba_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = CelebADataModule(root=str(celeba_root), batch_size=4, limit=6)
        batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["attributes"].shape == (4, 40)
    assert len(dm.dataset("train")) == 6
    assert dm.describe()["target_attribute"] == "Smiling"
