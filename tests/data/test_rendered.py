"""Tests of the procedurally rendered digits and their datamodule."""

from __future__ import annotations

import pytest
import torch

from lit_cf.data.rendered import (
    FACTOR_NAMES,
    FACTOR_RANGES,
    INTENSITY_HIGH,
    RenderedDigits,
    RenderedDigitsDataModule,
    digit_skeletons,
    normalize_factors,
    render_digits,
    sample_factors,
)

COL = {name: i for i, name in enumerate(FACTOR_NAMES)}


@pytest.fixture(scope="module")
def train_ds() -> RenderedDigits:
    return RenderedDigits(1000, "train", seed=1)


def _base_factors(n: int = 1, **values: float) -> torch.Tensor:
    """Centred, upright, mid-thickness, full-intensity factors, with overrides."""
    f = torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]]).repeat(n, 1)
    for name, v in values.items():
        f[:, COL[name]] = v
    return f


def _com(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of ink mass (x, y) per image, px."""
    img = images[:, 0]
    xs = torch.arange(img.shape[-1], dtype=torch.float32) + 0.5
    ys = torch.arange(img.shape[-2], dtype=torch.float32) + 0.5
    mass = img.sum(dim=(1, 2))
    x = (img.sum(dim=1) * xs).sum(dim=1) / mass
    y = (img.sum(dim=2) * ys).sum(dim=1) / mass
    return x, y


def _reference_render(label: int, f: torch.Tensor) -> torch.Tensor:
    """Brute force: distance of every pixel to every stroke segment, no patches."""
    seg = digit_skeletons()[label].double()
    f = f.double()
    h = 18.0 * f[COL["scale"]]
    w = 0.62 * h
    shear = torch.tan(f[COL["slant"]])
    gy = (seg[:, [1, 3]] - 0.5) * h
    xs = (seg[:, [0, 2]] - 0.5) * w - shear * gy + 14 + f[COL["shift_x"]]
    ys = gy + 14 + f[COL["shift_y"]]
    c = torch.arange(28, dtype=torch.float64) + 0.5
    py, px = torch.meshgrid(c, c, indexing="ij")
    p = torch.stack([px.flatten(), py.flatten()], 1)[:, None]  # [P, 1, 2]
    a = torch.stack([xs[:, 0], ys[:, 0]], 1)[None]  # [1, S, 2]
    d = torch.stack([xs[:, 1], ys[:, 1]], 1)[None] - a
    t = (((p - a) * d).sum(-1) / (d * d).sum(-1)).clamp(0, 1)
    dist = (p - a - t[..., None] * d).norm(dim=-1).amin(dim=1).view(28, 28)
    e = ((f[COL["thickness"]] / 2 + 0.6 - dist) / 1.2).clamp(0, 1)
    img = f[COL["intensity"]] * e * e * (3 - 2 * e)
    img[:4, :4] = 0
    if f[COL["mark"]] > 0.5:
        img[:3, :3] = 1
    return img.float()


# --------------------------------------------------------------------------- samples


def test_sample_contract(train_ds: RenderedDigits) -> None:
    assert len(train_ds) == 1000
    s = train_ds[7]
    assert set(s) == {"image", "label", "index", "factors"}
    assert s["image"].shape == (1, 28, 28) and s["image"].dtype == torch.float32
    assert s["label"].shape == () and s["label"].dtype == torch.int64
    assert s["index"].shape == () and s["index"].dtype == torch.int64 and int(s["index"]) == 7
    assert s["factors"].shape == (len(FACTOR_NAMES),) and s["factors"].dtype == torch.float32
    imgs = train_ds.images
    assert imgs.min() >= 0 and imgs.max() <= 1
    assert (imgs.flatten(1).amax(1) > 0.4).all()  # every image has ink
    for name, (lo, hi) in FACTOR_RANGES.items():
        col = train_ds.factors[:, COL[name]]
        assert col.min() >= lo and col.max() <= hi, name
    assert set(train_ds.factors[:, COL["mark"]].unique().tolist()) <= {0.0, 1.0}
    norm = normalize_factors(train_ds.factors)
    assert norm.min() >= 0 and norm.max() <= 1
    with pytest.raises(IndexError):
        train_ds[1000]


def test_labels_balanced_in_blocks_of_ten(train_ds: RenderedDigits) -> None:
    blocks = train_ds.labels.view(-1, 10).sort(dim=1).values
    assert (blocks == torch.arange(10)).all()
    assert not (train_ds.labels.view(-1, 10) == torch.arange(10)).all()  # shuffled within blocks


def test_determinism_and_seeds() -> None:
    a = RenderedDigits(60, "val", seed=3)
    b = RenderedDigits(60, "val", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.factors, b.factors)
    assert torch.equal(a.labels, b.labels)
    c = RenderedDigits(60, "val", seed=4)
    d = RenderedDigits(60, "test", seed=3)
    assert not torch.equal(a.factors, c.factors) and not torch.equal(a.images, c.images)
    assert not torch.equal(a.factors, d.factors)
    # a larger split starts with the same samples
    e = RenderedDigits(100, "val", seed=3)
    assert torch.equal(e.images[:60], a.images)


def test_sample_regenerated_alone_equals_cached(train_ds: RenderedDigits) -> None:
    for i in (0, 1, 517, 999):
        img, lab, fac = train_ds.generate([i])
        assert torch.equal(img[0], train_ds[i]["image"])
        assert torch.equal(lab[0], train_ds[i]["label"])
        assert torch.equal(fac[0], train_ds[i]["factors"])
    # any batch composition and chunking renders the same pixels
    idx = torch.tensor([999, 3, 250, 3])
    img = render_digits(train_ds.labels[idx], train_ds.factors[idx], chunk_size=3)
    assert torch.equal(img, train_ds.images[idx])


def test_rasteriser_matches_brute_force(train_ds: RenderedDigits) -> None:
    for i in range(0, 1000, 97):
        ref = _reference_render(int(train_ds.labels[i]), train_ds.factors[i])
        torch.testing.assert_close(train_ds.images[i, 0], ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- factor effects


def test_thickness_adds_ink() -> None:
    labels = torch.arange(10)
    thin = render_digits(labels, _base_factors(10, thickness=1.4)).sum(dim=(1, 2, 3))
    thick = render_digits(labels, _base_factors(10, thickness=2.8)).sum(dim=(1, 2, 3))
    assert (thick > 1.3 * thin).all()


def test_shifts_move_centre_of_mass() -> None:
    labels = torch.arange(10)
    xl, yl = _com(render_digits(labels, _base_factors(10, shift_x=-2.0)))
    xr, yr = _com(render_digits(labels, _base_factors(10, shift_x=2.0)))
    torch.testing.assert_close(xr - xl, torch.full((10,), 4.0), atol=0.05, rtol=0)
    torch.testing.assert_close(yr, yl, atol=0.05, rtol=0)
    _, yu = _com(render_digits(labels, _base_factors(10, shift_y=-1.5)))
    _, yd = _com(render_digits(labels, _base_factors(10, shift_y=1.5)))
    assert ((yd - yu - 3.0).abs() < 0.05).all()


def test_slant_scale_and_intensity() -> None:
    labels = torch.arange(10)

    # slant leans the top half to the right of the bottom half
    def lean(img: torch.Tensor) -> torch.Tensor:
        top, _ = _com(img[:, :, :14])
        bottom, _ = _com(img[:, :, 14:])
        return top - bottom

    left = lean(render_digits(labels, _base_factors(10, slant=-0.25)))
    right = lean(render_digits(labels, _base_factors(10, slant=0.25)))
    assert (right - left > 2.0).all()

    # scale grows the inked height
    def height(img: torch.Tensor) -> torch.Tensor:
        rows = (img[:, 0] > 0.5).any(dim=2).float()
        idx = torch.arange(28, dtype=torch.float32)
        return (rows * idx).amax(1) - torch.where(rows > 0, idx, torch.tensor(99.0)).amin(1)

    assert (
        height(render_digits(labels, _base_factors(10, scale=1.1))) > height(render_digits(labels, _base_factors(10, scale=0.85)))
    ).all()
    # intensity scales the ink and leaves the shape
    bright = render_digits(labels, _base_factors(10, intensity=1.0))
    dim = render_digits(labels, _base_factors(10, intensity=0.5))
    torch.testing.assert_close(dim, 0.5 * bright)


def test_mark_lights_only_the_corner() -> None:
    labels = torch.arange(10)
    f = _base_factors(10, shift_x=-2.0, shift_y=-2.0, scale=1.1, slant=-0.25, thickness=2.8)
    off = render_digits(labels, f)
    on = render_digits(labels, f.clone().index_fill_(1, torch.tensor([COL["mark"]]), 1.0))
    assert (on[:, 0, :3, :3] == 1).all()
    assert (off[:, 0, :3, :3] == 0).all()
    outside = torch.ones(28, 28, dtype=torch.bool)
    outside[:3, :3] = False
    assert torch.equal(on[:, 0][:, outside], off[:, 0][:, outside])


def test_classes_are_distinguishable(train_ds: RenderedDigits) -> None:
    test = RenderedDigits(500, "test", seed=1)
    x = train_ds.images.flatten(1)
    means = torch.stack([x[train_ds.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(test.images.flatten(1), means).argmin(1)
    acc = (pred == test.labels).float().mean().item()
    assert acc > 0.6, acc


def test_render_digits_validates_inputs() -> None:
    with pytest.raises(ValueError):
        render_digits(torch.tensor([0, 1]), _base_factors(3))
    with pytest.raises(ValueError):
        render_digits(torch.tensor([10]), _base_factors(1))


# --------------------------------------------------------------------------- shortcut


def test_shortcut_strength_one_marks_exactly_the_class() -> None:
    ds = RenderedDigits(2000, "train", seed=0, shortcut_class=3, shortcut_strength=1.0)
    mark = ds.factors[:, COL["mark"]] == 1
    assert torch.equal(mark, ds.labels == 3)
    assert torch.equal(ds.shortcut_state, mark)
    assert (ds.images[mark, 0, :3, :3] == 1).all()


def test_shortcut_strength_zero_is_base_rate_for_every_class() -> None:
    labels, factors = sample_factors(torch.arange(10000), "train", seed=0, shortcut_class=3, shortcut_strength=0.0, mark_rate=0.1)
    mark = factors[:, COL["mark"]]
    assert abs(mark.mean().item() - 0.1) < 0.015
    for c in range(10):
        assert abs(mark[labels == c].mean().item() - 0.1) < 0.04, c


def test_shortcut_intermediate_strength_follows_rule() -> None:
    s, q = 0.5, 0.2
    labels, factors = sample_factors(torch.arange(10000), "train", seed=2, shortcut_class=7, shortcut_strength=s, mark_rate=q)
    mark = factors[:, COL["mark"]]
    assert abs(mark[labels == 7].mean().item() - (s + (1 - s) * q)) < 0.05
    assert abs(mark[labels != 7].mean().item() - (1 - s) * q) < 0.02


def test_intensity_shortcut() -> None:
    ds = RenderedDigits(1000, "train", seed=0, shortcut_class=1, shortcut_strength=1.0, shortcut_factor="intensity")
    high = ds.factors[:, COL["intensity"]] >= INTENSITY_HIGH
    assert torch.equal(high, ds.labels == 1)
    assert torch.equal(ds.shortcut_state, high)
    # the mark stays at its base rate, independent of the class
    assert abs(ds.factors[:, COL["mark"]].mean().item() - 0.1) < 0.04
    clean = RenderedDigits(1000, "train", seed=0)
    assert abs((clean.factors[:, COL["intensity"]] >= INTENSITY_HIGH).float().mean().item() - 0.2) < 0.04


def test_datamodule_clean_and_shortcut_splits() -> None:
    dm = RenderedDigitsDataModule(
        train_size=1000, val_size=500, test_size=1000, shortcut_class=4, shortcut_strength=1.0, batch_size=64, seed=5
    )
    assert dm.split_names == ("train", "val", "test", "val_shortcut", "test_shortcut")
    assert dm.num_classes == 10 and dm.image_shape == (1, 28, 28)
    assert tuple(dm.class_names) == tuple(str(i) for i in range(10))
    assert tuple(dm.factor_names) == FACTOR_NAMES
    sizes = {s: len(dm.dataset(s)) for s in dm.split_names}
    assert sizes == {"train": 1000, "val": 500, "test": 1000, "val_shortcut": 500, "test_shortcut": 1000}

    train = dm.dataset("train")
    assert torch.equal(train.factors[:, COL["mark"]] == 1, train.labels == 4)
    test, test_sc = dm.dataset("test"), dm.dataset("test_shortcut")
    mark = test.factors[:, COL["mark"]]
    rate_in, rate_out = mark[test.labels == 4].mean().item(), mark[test.labels != 4].mean().item()
    assert abs(rate_in - rate_out) < 0.1 and abs(mark.mean().item() - 0.1) < 0.03
    assert torch.equal(test_sc.factors[:, COL["mark"]] == 1, test_sc.labels == 4)
    # clean and shortcut versions hold the same digits, differing only in the mark
    assert torch.equal(test.labels, test_sc.labels)
    assert torch.equal(test.factors[:, : COL["mark"]], test_sc.factors[:, : COL["mark"]])
    same = test.factors[:, COL["mark"]] == test_sc.factors[:, COL["mark"]]
    assert torch.equal(test.images[same], test_sc.images[same])
    # train and test draw different samples
    assert not torch.equal(train.factors[:100], test.factors[:100])

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 1, 28, 28) and batch["factors"].shape == (64, 7)
    assert batch["label"].dtype == torch.int64
    info = dm.describe()
    assert info["shortcut_class"] == 4 and info["factor_names"] == list(FACTOR_NAMES)


def test_datamodule_without_shortcut_and_limit() -> None:
    dm = RenderedDigitsDataModule(train_size=50, val_size=30, test_size=30, limit=20, predict_split="test_shortcut")
    assert len(dm.dataset("train")) == 20 and len(dm.dataset("test_shortcut")) == 20
    assert torch.equal(dm.dataset("val")[5]["image"], dm.dataset("val_shortcut")[5]["image"])
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == list(range(20))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shortcut_class": 1, "shortcut_strength": 1.5},
        {"shortcut_class": 1, "shortcut_strength": -0.1},
        {"shortcut_class": 10, "shortcut_strength": 0.5},
        {"shortcut_class": -1},
        {"shortcut_class": 1, "shortcut_factor": "thickness"},
        {"shortcut_strength": 0.5},  # strength without a class
        {"mark_rate": 1.2},
        {"train_size": 0},
        {"predict_split": "holdout"},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RenderedDigitsDataModule(**kwargs)


def test_dataset_rejects_bad_shortcut() -> None:
    with pytest.raises(ValueError, match="shortcut_factor"):
        RenderedDigits(10, shortcut_class=0, shortcut_strength=1.0, shortcut_factor="slant")
    with pytest.raises(ValueError):
        RenderedDigits(10, shortcut_class=0, shortcut_strength=2.0)
