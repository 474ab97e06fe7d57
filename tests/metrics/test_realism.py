import math
import statistics

import pytest
import torch
from torch import nn

from lit_cf.metrics import ClassifierFeatures, DomainFID, DUQCertainty, SplitFID, frechet_distance, split_halves
from lit_cf.models import Classifier, ConvNet, DUQClassifier
from tests.metrics.helpers import check_merge, pop_std


def gaussian_images(n: int = 40, d: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.1 * torch.randn(n, d, 1, 1, generator=g)).clamp(0, 1)


def test_fid_identical_sets_is_zero():
    metric = DomainFID(nn.Flatten(), num_features=2)
    imgs = gaussian_images()
    metric.update(imgs, real=True)
    metric.update(imgs, real=False)
    out = metric.compute()
    assert set(out) == {"fid_domain"}
    assert abs(float(out["fid_domain"])) < 1e-5


def test_fid_shifted_gaussians_is_squared_mean_difference():
    metric = DomainFID(nn.Flatten(), input_shape=(2, 1, 1))  # probes d = 2
    imgs = gaussian_images()
    shift = torch.tensor([0.3, -0.4]).view(1, 2, 1, 1)
    metric.update(imgs, real=True)
    metric.update(imgs + shift, real=False)  # same covariance
    assert float(metric.compute()["fid_domain"]) == pytest.approx(0.25, abs=1e-4)


def test_fid_merge_and_too_few():
    imgs = gaussian_images(8)

    class Both(DomainFID):
        def update(self, real, fake):  # one call feeds both sets, for check_merge
            super().update(real, real=True)
            super().update(fake, real=False)

    check_merge(lambda: Both(nn.Flatten(), num_features=2), (imgs, imgs.flip(0) * 0.5), cut=4, atol=1e-5)
    few = DomainFID(nn.Flatten(), num_features=2)
    few.update(imgs[:1], real=True)
    assert math.isnan(float(few.compute()["fid_domain"]))


def test_frechet_distance_hand_values():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    d = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]]))
    assert float(d) == pytest.approx(4 + 1)
    # diagonal covariances: sum (sqrt a_i - sqrt b_i)^2
    cov1, cov2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([9.0, 1.0]))
    d = frechet_distance(torch.zeros(2), cov1, torch.ones(2), cov2)
    assert float(d) == pytest.approx(2 + (1 - 3) ** 2 + (2 - 1) ** 2)


REAL = [0.1, 0.2, 0.4, 0.5, 0.9, 0.6]
CF = [0.3, 0.8, 0.2, 0.7, 0.6, 0.95]


def fid_1d(a, b):
    return (statistics.mean(a) - statistics.mean(b)) ** 2 + (statistics.stdev(a) - statistics.stdev(b)) ** 2


def as_images(values):
    return torch.tensor(values).view(-1, 1, 1, 1)


def expected_sfid():
    real_a, real_b = REAL[0::2], REAL[1::2]
    cf_a, cf_b = CF[0::2], CF[1::2]
    return (fid_1d(real_a, cf_b) + fid_1d(real_b, cf_a)) / 2


def test_sfid_halves_hand_value():
    metric = SplitFID(nn.Flatten(), num_features=1)
    metric.update(as_images(REAL[:4]), as_images(CF[:4]))  # positions continue across batches
    metric.update(as_images(REAL[4:]), as_images(CF[4:]))
    out = metric.compute()
    assert set(out) == {"sfid_domain"}
    assert float(out["sfid_domain"]) == pytest.approx(expected_sfid(), rel=1e-6)


def test_sfid_indices_and_merge():
    order = [3, 0, 5, 2, 4, 1]
    metric = SplitFID(nn.Flatten(), num_features=1)
    metric.update(as_images([REAL[i] for i in order]), as_images([CF[i] for i in order]), torch.tensor(order))
    assert float(metric.compute()["sfid_domain"]) == pytest.approx(expected_sfid(), rel=1e-6)
    out = check_merge(
        lambda: SplitFID(nn.Flatten(), num_features=1),
        (as_images([REAL[i] for i in order]), as_images([CF[i] for i in order]), torch.tensor(order)),
        cut=2,
    )
    assert float(out["sfid_domain"]) == pytest.approx(expected_sfid(), rel=1e-6)
    few = SplitFID(nn.Flatten(), num_features=1)
    few.update(as_images(REAL[:3]), as_images(CF[:3]))
    assert math.isnan(float(few.compute()["sfid_domain"]))


def test_split_halves():
    idx = torch.arange(1000)
    assert split_halves(idx[:4]).tolist() == [False, True, False, True]
    h0, h1 = split_halves(idx, "hash", seed=0), split_halves(idx, "hash", seed=1)
    assert 400 < int(h0.sum()) < 600 and not torch.equal(h0, h1)
    assert torch.equal(h0, split_halves(idx, "hash", seed=0))


class FakeDUQ(nn.Module):
    def certainty(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def test_duq_certainty_hand_values():
    metric = DUQCertainty(FakeDUQ())
    x_cf = torch.tensor([0.2, 0.4, 0.9]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    metric.update(x_cf)
    out = metric.compute()
    assert out["duq_certainty_cf_mean"] == pytest.approx(0.5)
    assert out["duq_certainty_cf_std"] == pytest.approx(pop_std([0.2, 0.4, 0.9]), rel=1e-5)
    assert math.isnan(float(out["duq_certainty_query_mean"]))
    metric.update(x_cf, torch.ones(3, 1, 2, 2))
    assert metric.compute()["duq_certainty_query_mean"] == pytest.approx(1.0)
    check_merge(lambda: DUQCertainty(FakeDUQ()), (x_cf, torch.ones(3, 1, 2, 2)), cut=1)


@pytest.mark.filterwarnings("ignore:Attribute 'backbone'")
def test_in_project_networks_smoke():
    torch.manual_seed(0)
    backbone = lambda: ConvNet(in_channels=1, channels=(4,), hidden=8, image_size=8)  # noqa: E731
    clf = Classifier(backbone(), num_classes=2)
    x, x_cf = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    fid = DomainFID(ClassifierFeatures(clf))  # d read from backbone.out_features
    fid.update(x, real=True)
    fid.update(x_cf, real=False)
    sfid = SplitFID(ClassifierFeatures(clf))
    sfid.update(x, x_cf)
    assert math.isfinite(float(fid.compute()["fid_domain"]))
    assert math.isfinite(float(sfid.compute()["sfid_domain"]))
    duq = DUQCertainty(DUQClassifier(backbone(), num_classes=2, embedding_size=4))
    duq.update(x_cf, x)
    out = duq.compute()
    assert 0 < float(out["duq_certainty_cf_mean"]) <= 1


def test_frechet_distance_survives_eigh_convergence_failures(monkeypatch):
    # rank-deficient covariances of 8 samples in 64 dimensions: the case where LAPACK's
    # divide-and-conquer solver failed to converge on real features
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=g).double(), (torch.randn(8, 64, generator=g) * 2 + 1).double()
    mu1, mu2, cov1, cov2 = a.mean(0), b.mean(0), a.T.cov(), b.T.cov()
    exact = frechet_distance(mu1, cov1, mu2, cov2)
    real_eigh, calls = torch.linalg.eigh, []

    def flaky(m, *args, **kwargs):  # fails whenever no ridge was added
        calls.append(1)
        if float(m.diagonal().min()) < 1e-9 * float(m.diagonal().abs().mean()) or len(calls) % 2:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    robust = frechet_distance(mu1, cov1, mu2, cov2)
    assert len(calls) >= 4  # both decompositions retried with a ridge
    assert torch.isfinite(robust) and abs(float(robust - exact)) < 1e-6 * float(exact)
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(mu1, cov1 * float("nan"), mu2, cov2)
