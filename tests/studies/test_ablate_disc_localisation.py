"""lit_cf.metrics.localisation: the ablation's localisation score on hand-built masks and edits."""

from __future__ import annotations

import pytest
import torch

from lit_cf.metrics.localisation import MOUTH_BOX, box_mask, localisation, stroke_mask


def test_box_mask_covers_the_given_fractions():
    mask = box_mask((2, 3, 10, 20), rows=(0.2, 0.5), cols=(0.25, 0.5))
    assert mask.shape == (2, 1, 10, 20) and mask.dtype == torch.bool
    rows, cols = mask[0, 0].nonzero(as_tuple=True)
    assert sorted(set(rows.tolist())) == [2, 3, 4] and sorted(set(cols.tolist())) == [5, 6, 7, 8, 9]
    assert torch.equal(mask[0], mask[1])
    # the mouth box of a 64 px CelebA crop: rows 39..54, columns 17..45
    mouth = box_mask((1, 3, 64, 64), *MOUTH_BOX)[0, 0]
    assert mouth.sum() == (55 - 39) * (46 - 17) and mouth[39, 17] and not mouth[38, 17] and not mouth[55, 45]


def test_box_mask_refuses_bad_fractions():
    with pytest.raises(ValueError, match="increasing fractions"):
        box_mask((1, 1, 8, 8), rows=(0.5, 0.2), cols=(0, 1))
    with pytest.raises(ValueError, match="N, C, H, W"):
        box_mask((8, 8), rows=(0, 1), cols=(0, 1))


def test_stroke_mask_dilates_the_ink_by_the_radius():
    q = torch.zeros(1, 1, 9, 9)
    q[0, 0, 4, 4] = 1.0  # one ink pixel
    q[0, 0, 0, 8] = 0.1  # below the ink threshold
    mask = stroke_mask(q, threshold=0.2, radius=2)[0, 0]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[2:7, 2:7] = True
    assert torch.equal(mask, expected)
    assert stroke_mask(q, radius=0)[0, 0].sum() == 1
    # colour images: ink in any channel counts, the mask has one channel
    rgb = torch.zeros(1, 3, 5, 5)
    rgb[0, 2, 0, 0] = 0.9
    assert stroke_mask(rgb, radius=1).shape == (1, 1, 5, 5) and stroke_mask(rgb, radius=1).sum() == 4


def test_localisation_is_the_share_of_difference_mass_inside():
    q = torch.zeros(3, 2, 4, 4)
    cf = q.clone()
    cf[0, :, 0, 0] = 0.5  # mass 1.0 inside (both channels)
    cf[0, 0, 3, 3] = 1.0  # mass 1.0 outside -> 0.5
    cf[1, 1, 1, 1] = -0.25  # only inside -> 1.0 (absolute difference)
    # query 2 unchanged -> 0
    mask = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2, :2] = True
    share = localisation(q, cf, mask)
    assert share.tolist() == pytest.approx([0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="differ in shape"):
        localisation(q, cf[:, :1], mask)
