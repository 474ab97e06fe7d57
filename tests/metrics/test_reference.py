"""Realism against real images: class-matched reference samples, the no-edit and floor rows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from lit_cf.data.corruptions import CorruptedDataset
from lit_cf.data.mnist import TensorImageDataset
from lit_cf.metrics.realism import frechet_distance
from lit_cf.metrics.reference import ReferenceFID, draw_reference, reference_realism, reference_rows, split_labels


def test_draw_reference_matches_classes_excludes_queries_and_holds_out_a_floor():
    labels = torch.arange(200) % 5  # 40 images per class
    targets = torch.tensor([1, 1, 1, 3, 4, 4])
    exclude = [1, 6, 11, 16, 3, 8]  # class 1 and 3 images (the queries)
    s = draw_reference(labels, targets, exclude, seed=3, size_factor=2)
    # class matched: size_factor images of each counterfactual's target class
    assert sorted(labels[s.reference].tolist()) == sorted(targets.tolist() * 2)
    assert torch.equal(labels[s.reference], s.classes)
    # the floor: one per counterfactual, same classes, disjoint from the reference sample
    assert sorted(labels[s.floor].tolist()) == sorted(targets.tolist())
    assert not set(s.floor.tolist()) & set(s.reference.tolist())
    # the queries never enter either sample
    assert not set(exclude) & (set(s.reference.tolist()) | set(s.floor.tolist()))
    assert s.excluded == 6
    # deterministic in the seed, another seed draws other images
    again = draw_reference(labels, targets, exclude, seed=3, size_factor=2)
    assert torch.equal(again.reference, s.reference) and torch.equal(again.floor, s.floor)
    assert not torch.equal(draw_reference(labels, targets, exclude, seed=4, size_factor=2).reference, s.reference)
    # a class with too few eligible images is refused, naming it
    with pytest.raises(ValueError, match="class 2 has 38 real images"):
        draw_reference(labels, torch.full((20,), 2), exclude=[2, 7], size_factor=1)


def test_split_labels_reads_through_wrappers_without_images():
    images = torch.rand(12, 1, 4, 4)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    base = TensorImageDataset(images, labels)
    assert torch.equal(split_labels(base), labels)
    assert torch.equal(split_labels(Subset(base, [2, 5, 7])), labels[[2, 5, 7]])
    assert torch.equal(split_labels(CorruptedDataset(Subset(base, range(6)), "gaussian_noise", 2)), labels[:6])

    class Plain(torch.utils.data.Dataset):  # no labels tensor: read sample by sample
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": images[i], "label": labels[i]}

    assert torch.equal(split_labels(Plain()), labels[:3])


class Flatten(nn.Module):
    num_features = 16

    def forward(self, x):
        return x.flatten(1)


def test_reference_fid_matches_the_frechet_distance_of_the_sets():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(40, 1, 4, 4, generator=g)
    near = torch.rand(40, 1, 4, 4, generator=g)
    far = torch.rand(40, 1, 4, 4, generator=g) * 0.3 + 0.7
    metric = ReferenceFID(Flatten(), groups=("counterfactual", "floor"))
    metric.update(ref[:25], "reference")
    metric.update(ref[25:], "reference")  # batching does not matter
    metric.update(far, "counterfactual")
    metric.update(near, "floor")
    out = metric.compute()

    def fd(a, b):
        a, b = a.flatten(1).double(), b.flatten(1).double()
        return float(frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))

    assert out["fid_real_domain"] == pytest.approx(fd(ref, far), rel=1e-4)
    assert out["fid_real_domain_floor"] == pytest.approx(fd(ref, near), rel=1e-4)
    assert out["fid_real_domain_floor"] < out["fid_real_domain"]
    with pytest.raises(ValueError, match="unknown group"):
        metric.update(ref, "queries")
    assert math.isnan(ReferenceFID(Flatten()).compute()["fid_real_domain"])


def test_reference_realism_scores_no_edit_and_floor_against_the_same_sample():
    # real images of class c are bright in row c; counterfactuals that draw their target's row
    # are close to the real target images, unchanged queries (another row) are far
    n_per_class, classes = 30, 4
    labels = torch.arange(n_per_class * classes) % classes
    g = torch.Generator().manual_seed(1)
    images = torch.rand(len(labels), 1, 4, 4, generator=g) * 0.2
    images[torch.arange(len(labels)), 0, labels] += 0.8
    data = TensorImageDataset(images, labels)
    queries_idx = torch.tensor([0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21])  # classes 0 and 1
    targets = labels[queries_idx] + 2  # towards 2 and 3
    queries = images[queries_idx]
    cfs = torch.rand(12, 1, 4, 4, generator=g) * 0.2  # drawn like real images of the targets
    cfs[torch.arange(12), 0, targets] += 0.8
    out = reference_realism(Flatten(), data, cfs, queries, targets, exclude=queries_idx.tolist(), seed=0)
    assert out["reference_n"] == out["floor_n"] == 12 and out["reference_excluded"] == 12
    assert not set(queries_idx.tolist()) & set(out["reference_indices"] + out["floor_indices"])
    assert sorted(labels[out["reference_indices"]].tolist()) == sorted(targets.tolist())
    # edits that reach the target class beat leaving the queries alone
    assert out["fid_real_domain"] < out["fid_real_domain_no_edit"]
    # the no-edit row is the queries against the very same reference sample
    ref = images[out["reference_indices"]].flatten(1).double()
    q = queries.flatten(1).double()
    expect = float(frechet_distance(ref.mean(0), torch.cov(ref.T), q.mean(0), torch.cov(q.T)))
    assert out["fid_real_domain_no_edit"] == pytest.approx(expect, rel=1e-4)
    assert out["fid_real_domain_floor"] < out["fid_real_domain_no_edit"]
    with pytest.raises(ValueError, match="same records"):
        reference_realism(Flatten(), data, cfs, queries, targets[:5])


def test_reference_rows_one_pair_per_query_set():
    a = {"n": 10, "floor_n": 10, "fid_real_domain": 5.0, "fid_real_domain_no_edit": 9.0, "fid_real_domain_floor": 2.0}
    rows = reference_rows([("disc", "k1", a), ("pixel", "k1", dict(a, fid_real_domain=7.0))])
    assert rows == [
        {"method": "no edit (queries)", "n": 10, "fid_real_domain": 9.0},
        {"method": "real floor", "n": 10, "fid_real_domain": 2.0},
    ]
    rows = reference_rows([("disc", "k1", a), ("other", "k2", dict(a, fid_real_domain_no_edit=8.0))])
    assert [r["method"] for r in rows] == [
        "no edit (queries) [disc]",
        "real floor [disc]",
        "no edit (queries) [other]",
        "real floor [other]",
    ]
    assert reference_rows([("disc", "k1", {"n": 3})]) == []
