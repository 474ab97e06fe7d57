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


def test_autoencoder_identity_output_is_the_sigmoid_logit_and_keeps_the_gradient():
    torch.manual_seed(0)
    sig = AutoEncoder(latent_dim=8)
    ident = AutoEncoder(latent_dim=8, output_activation="identity")
    ident.load_state_dict(sig.state_dict())
    with torch.no_grad():  # the decoder draws everything dark: a saturated sigmoid
        sig.decoder[-1].bias.fill_(-10.0)
        ident.decoder[-1].bias.fill_(-10.0)
    z = torch.randn(2, 8, requires_grad=True)
    out_id = ident.decode(z)
    torch.testing.assert_close(torch.sigmoid(out_id), sig.decode(z))
    assert out_id.max() < 0  # not clamped: the raw last layer
    grads = []
    for model in (sig, ident):
        (g,) = torch.autograd.grad(model.decode(z)[..., :3, :3].sum(), z)
        grads.append(g.norm())
    assert grads[1] > 0
    assert grads[0] < 1e-3 * grads[1]  # sigmoid'(-10) ~ 4.5e-5


def test_autoencoder_output_activation_is_validated_and_checkpointed(tmp_path):
    from lit_cf.utils.checkpoint import load_module

    with pytest.raises(ValueError, match="output_activation"):
        AutoEncoder(output_activation="tanh")
    model = AutoEncoder(latent_dim=8, output_activation="identity")
    assert model.hparams.output_activation == "identity"
    hp = {"_class_path": "lit_cf.models.AutoEncoder", **{k: v for k, v in model.hparams.items() if k != "optimizer"}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp, "pytorch-lightning_version": "2"}, tmp_path / "a.ckpt")
    assert load_module(tmp_path / "a.ckpt", AutoEncoder).output_activation == "identity"
    hp.pop("output_activation")  # a checkpoint from before the switch: sigmoid
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp, "pytorch-lightning_version": "2"}, tmp_path / "b.ckpt")
    assert load_module(tmp_path / "b.ckpt", AutoEncoder).output_activation == "sigmoid"
