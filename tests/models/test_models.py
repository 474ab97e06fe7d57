import pytest
import torch
import torch.nn.functional as F

from lit_cf.models import PGD, VAE, AutoEncoder, Classifier, ConvNet, ResNet18


def test_convnet_and_classifier_shapes():
    model = Classifier(ConvNet(1, (8, 16), 32), num_classes=10)
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model.probabilities(x).sum(-1), torch.ones(5))


def test_resnet18_stem_keeps_resolution_for_small_images():
    net = ResNet18(in_channels=3)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_input_normalisation_inside_model():
    model = Classifier(ConvNet(1, (4,), 8), num_classes=2, input_mean=[0.5], input_std=[0.25])
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(model.normalize(x), torch.ones_like(x))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_ball_and_increases_loss(norm):
    torch.manual_seed(0)
    model = Classifier(ConvNet(1, (8,), 16), num_classes=3).eval()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 3, (8,))
    eps = 0.5 if norm == "l2" else 0.03
    adv = PGD(norm=norm, eps=eps, step_size=eps / 4, steps=5, random_start=False)(model, x, y)
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert (size <= eps + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_pgd_rejects_bad_norm():
    with pytest.raises(ValueError, match="norm"):
        PGD(norm="l3")


@pytest.mark.parametrize("cls", [AutoEncoder, VAE])
@pytest.mark.parametrize("size,channels", [(28, 1), (64, 3)])
def test_autoencoders_roundtrip_shapes(cls, size, channels):
    model = cls(in_channels=channels, image_size=size, latent_dim=12)
    x = torch.rand(3, channels, size, size)
    z = model.encode(x)
    assert z.shape == (3, 12)
    recon = model.decode(z)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    terms = model.loss(x)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])


def test_num_classes_validation():
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(ConvNet(), num_classes=1)
