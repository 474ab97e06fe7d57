import math

import pytest
import torch
from torch import nn

from lit_cf.models import ConvNet, DUQClassifier
from lit_cf.models.duq import gradient_penalty, rbf_kernel


class Identity2(nn.Module):
    """Backbone that flattens a 1x1x2 image into 2 features (hand-computable)."""

    out_features = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def tiny_duq(**kw) -> DUQClassifier:
    model = DUQClassifier(Identity2(), num_classes=2, embedding_size=2, length_scale=0.5, **kw)
    with torch.no_grad():
        model.W.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2)], dim=1))  # W_0 = I, W_1 = 2I
        model.N.fill_(1.0)
        model.m.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # e_0 = (1, 0), e_1 = (0, 2)
    return model


def test_kernel_matches_hand_computation():
    model = tiny_duq()
    x = torch.tensor([[1.0, 1.0]]).view(1, 1, 1, 2)
    # class 0: W0 f = (1, 1), e0 = (1, 0): mean sq = 0.5 ; class 1: W1 f = (2, 2), e1 = (0, 2): mean sq = 2
    expected = torch.tensor([[math.exp(-0.5 / (2 * 0.25)), math.exp(-2.0 / (2 * 0.25))]])
    torch.testing.assert_close(model.kernel(x), expected)
    torch.testing.assert_close(model.certainty(x), expected.amax(-1))
    probs = model.probabilities(x)
    torch.testing.assert_close(probs, expected / expected.sum())
    torch.testing.assert_close(model(x).softmax(-1), probs)


def test_rbf_kernel_is_one_at_centroid():
    centroids = torch.randn(4, 3)
    z = centroids.unsqueeze(0).repeat(2, 1, 1)
    torch.testing.assert_close(rbf_kernel(z, centroids, 0.1), torch.ones(2, 3))


def test_centroid_update_is_ema_of_class_embeddings():
    model = tiny_duq(gamma=0.9)
    z = torch.tensor(
        [[[1.0, 5.0], [2.0, 6.0]], [[3.0, 7.0], [4.0, 8.0]], [[9.0, 9.0], [9.0, 9.0]]]
    )  # [B=3, n=2, C=2]
    y = torch.tensor([0, 0, 1])
    model.update_centroids(z, y)
    # N0 = .9*1 + .1*2 = 1.1 ; N1 = .9*1 + .1*1 = 1.0
    torch.testing.assert_close(model.N, torch.tensor([1.1, 1.0]))
    # m[:,0] = .9*(1,0) + .1*((1,2)+(3,4)) = (1.3, 0.6); m[:,1] = .9*(0,2) + .1*(9,9) = (0.9, 2.7)
    torch.testing.assert_close(model.m, torch.tensor([[1.3, 0.9], [0.6, 2.7]]))
    torch.testing.assert_close(model.centroids, torch.tensor([[1.3 / 1.1, 0.9], [0.6 / 1.1, 2.7]]))


def test_gradient_penalty_matches_hand_computation():
    # K(x) = exp(-x^2 / 2) summed over one "class": dK/dx = -x exp(-x^2/2)
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    k = torch.exp(-(x**2) / 2)
    gp = gradient_penalty(x, k)
    g = -x.detach() * torch.exp(-(x.detach() ** 2) / 2)
    expected = ((g.norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(gp, expected)
    # create_graph=True: the penalty is differentiable w.r.t. x
    (gg,) = torch.autograd.grad(gp, x)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_training_step_updates_centroids_and_uses_penalty():
    torch.manual_seed(0)
    model = DUQClassifier(ConvNet(1, (4, 8), 16), num_classes=3, embedding_size=8, gp_weight=0.5)
    batch = {"image": torch.rand(6, 1, 28, 28), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    model.log = lambda *a, **k: None  # no trainer attached
    loss = model.training_step(batch, 0)
    model_nogp = DUQClassifier(ConvNet(1, (4, 8), 16), num_classes=3, embedding_size=8, gp_weight=0.0)
    model_nogp.load_state_dict(model.state_dict())
    model_nogp.log = lambda *a, **k: None
    loss_nogp = model_nogp.training_step(batch, 0)
    assert loss > loss_nogp  # the penalty adds a positive term
    before = model.m.clone()
    model.on_train_batch_end(None, batch, 0)
    assert not torch.equal(before, model.m)
    assert model.training


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="centroid_features"):
        DUQClassifier(ConvNet(), num_classes=10, centroid_features="bogus")
    with pytest.raises(ValueError, match="gamma"):
        DUQClassifier(ConvNet(), num_classes=10, gamma=1.5)
