import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import instantiate_module
from torch import nn
from torchmetrics.classification import BinaryAUROC

from lit_cf.data import FashionMNISTDataModule, MNISTDataModule
from lit_cf.models import ConvNet, DUQClassifier, ResNet18
from lit_cf.models.duq import gradient_penalty, rbf_kernel
from lit_cf.utils.checkpoint import load_module
from tests.fixtures import write_idx_dataset


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
    z = torch.tensor([[[1.0, 5.0], [2.0, 6.0]], [[3.0, 7.0], [4.0, 8.0]], [[9.0, 9.0], [9.0, 9.0]]])  # [B=3, n=2, C=2]
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


# --------------------------------------------------------------------------- the reference's DUQ
ROOT = Path(__file__).resolve().parents[2]


def config_model(name: str, seed: int = 0) -> DUQClassifier:
    """Instantiate ``configs/model/<name>`` exactly as the CLI would (jsonargparse)."""
    init_args = yaml.safe_load((ROOT / "configs/model" / name).read_text())["model"]["init_args"]
    torch.manual_seed(seed)
    return instantiate_module(DUQClassifier, init_args)


@pytest.mark.parametrize("name", ["duq_cnn.yaml", "duq_cnn_mnist.yaml"])
def test_paper_config_is_the_reference_architecture(name):
    model = config_model(name)
    # conv64(3x3, pad 1)-BN-pool, conv128(pad 1)-BN-pool, conv128(no pad)-BN-pool, FC 512 -> 256, W 256x10x256
    assert sum(p.numel() for p in model.parameters()) == 1_009_408
    assert model.backbone.fc[2].in_features == 2 * 2 * 128
    assert tuple(model.W.shape) == (256, 10, 256)
    assert model.backbone(torch.rand(3, 1, 28, 28)).shape == (3, 256)
    assert model.drop_last


def test_paper_config_normalisation_values():
    fm, mn = config_model("duq_cnn.yaml"), config_model("duq_cnn_mnist.yaml")
    torch.testing.assert_close(fm.input_mean.flatten(), torch.tensor([0.2861]))
    torch.testing.assert_close(fm.input_std.flatten(), torch.tensor([0.3530]))
    torch.testing.assert_close(mn.input_mean.flatten(), torch.tensor([0.1307]))
    torch.testing.assert_close(mn.input_std.flatten(), torch.tensor([0.3081]))


def test_paper_config_initial_w_and_centroids():
    model = config_model("duq_cnn.yaml")
    # reference CNN: W ~ N(0, 0.05) (655,360 draws), N_c = 12, m = N(0, 1) * N_c
    assert abs(model.W.std().item() - 0.05) < 0.0005 and abs(model.W.mean().item()) < 0.0005
    torch.testing.assert_close(model.N, torch.full((10,), 12.0))
    e = model.centroids  # 2,560 draws of N(0, 1)
    assert abs(e.std().item() - 1.0) < 0.05 and abs(e.mean().item()) < 0.06
    torch.testing.assert_close(model.m, e * 12.0)


def test_default_init_is_the_resnet_reference_and_old_models():
    torch.manual_seed(0)
    model = DUQClassifier(ConvNet(1, (64, 128, 128), 256, batch_norm=True), num_classes=10)
    # Kaiming normal over fan_in = 10 * 256: std sqrt(2 / 2560) ~ 0.028; N_c = 13; centroids of std 0.05
    assert abs(model.W.std().item() - math.sqrt(2 / 2560)) < 0.0005
    torch.testing.assert_close(model.N, torch.full((10,), 13.0))
    assert abs(model.centroids.std().item() - 0.05) < 0.003
    # the old (padded) extractor: 3x3 maps after the third pool, FC 1152 -> 256, 1,173,248 parameters
    assert sum(p.numel() for p in model.parameters()) == 1_173_248


def test_resnet_config_keeps_the_reference_feature_layer():
    model = config_model("duq_resnet18_celeba.yaml")
    assert isinstance(model.backbone.net.fc, nn.Linear) and model.backbone.net.fc.out_features == 512
    assert model.backbone.out_features == 512 and model.drop_last
    assert ResNet18().out_features == 512 and isinstance(ResNet18().net.fc, nn.Identity)  # old default


def test_convnet_padding_is_checked():
    with pytest.raises(ValueError, match="one non-negative entry per conv block"):
        ConvNet(1, (8, 16), padding=(1,))
    with pytest.raises(ValueError, match="shrinks to nothing"):
        ConvNet(1, (8, 8, 8, 8, 8), padding=(0, 0, 0, 0, 0))


def test_gradient_penalty_is_taken_wrt_the_normalised_input():
    mean, std = 0.25, 0.5
    model = tiny_duq(input_mean=[mean], input_std=[std], gp_weight=1.0)
    logged = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    x = torch.tensor([[0.9, 0.2], [0.1, 0.6]]).view(2, 1, 1, 2)
    model.training_step({"image": x, "label": torch.tensor([0, 1])}, 0)
    # by hand: u = (x - mean) / std; K_c = exp(-|W_c u - e_c|^2 / (n 2 s^2)) with n = 2, s = 0.5;
    # d K_c / d u = -K_c W_c^T (W_c u - e_c) / (n s^2)
    u = (x.flatten(1) - mean) / std
    w = [torch.eye(2), 2 * torch.eye(2)]
    e = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    grad_u = torch.zeros(2, 2)
    for c in range(2):
        r = u @ w[c].T - e[c]
        k = torch.exp(-(r**2).sum(1) / (2 * 2 * 0.25))
        grad_u -= k[:, None] * (r @ w[c]) / (2 * 0.25)
    expected = ((grad_u.norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(logged["train/gp"].detach(), expected)
    # w.r.t. the raw pixels the gradient is grad_u / std: a different constraint
    raw = ((grad_u.div(std).norm(dim=1) - 1) ** 2).mean()
    assert abs(raw - expected) > 0.1


def test_in_and_ood_data_are_normalised_alike(tmp_path):
    write_idx_dataset(tmp_path, name="FashionMNIST", n_train=40, n_test=24)
    write_idx_dataset(tmp_path, name="MNIST", n_train=40, n_test=20, seed=3)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=8, batch_size=16)
    ood = MNISTDataModule(root=str(tmp_path), val_size=8, batch_size=16)
    torch.manual_seed(0)
    mean, std = 0.2861, 0.3530
    model = DUQClassifier(
        ConvNet(1, (4, 8), 16),
        num_classes=10,
        embedding_size=8,
        length_scale=0.5,
        input_mean=[mean],
        input_std=[std],
        ood_data=ood,
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)

    def certainty_by_hand(data) -> torch.Tensor:
        data.setup("test")
        x = torch.cat([b["image"] for b in data.test_dataloader()])
        with torch.no_grad():
            z = torch.einsum("ncd,bd->bnc", model.W, model.backbone((x - mean) / std))
            return torch.exp(-((z - model.centroids) ** 2).mean(1) / (2 * 0.25)).amax(-1)

    cin, cood = certainty_by_hand(dm), certainty_by_hand(ood)
    expected = BinaryAUROC()(torch.cat([-cin, -cood]), torch.cat([torch.zeros(24), torch.ones(20)]).long())
    assert result["test/ood_auroc"] == pytest.approx(expected.item(), abs=1e-6)
    # the raw-pixel kernel gives other certainties: the test would see a missing normalisation
    with torch.no_grad():
        x = torch.cat([b["image"] for b in ood.test_dataloader()])
        raw = torch.exp(-((torch.einsum("ncd,bd->bnc", model.W, model.backbone(x)) - model.centroids) ** 2).mean(1) / 0.5)
    assert not torch.allclose(raw.amax(-1), cood)
    torch.testing.assert_close(model.certainty(x), cood)


def test_drop_last_skips_the_incomplete_batch():
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10) % 3
    samples = [{"image": i, "label": y} for i, y in zip(images, labels)]

    def fit(data, drop):
        torch.manual_seed(0)
        model = DUQClassifier(
            ConvNet(1, (4, 8), 16),
            num_classes=3,
            embedding_size=8,
            drop_last=drop,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-3),
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
        return model

    dropped = fit(samples, True)  # batches of 4, 4, (2 skipped)
    full = fit(samples[:8], False)  # the same two full batches only
    kept = fit(samples, False)  # batches of 4, 4, 2
    for a, b in zip(dropped.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(kept.W, dropped.W)
    # N is the EMA of the class counts of the 4 batches that were used (from 13 per class)
    g = 0.999
    assert dropped.N.sum().item() == pytest.approx(39 * g**4 + sum((1 - g) * 4 * g**k for k in range(4)), rel=1e-6)


def test_old_checkpoint_rebuilds_the_old_model(tmp_path):
    """A checkpoint saved before padding / init / drop_last existed loads as the padded model."""
    torch.manual_seed(0)
    old = DUQClassifier(ConvNet(1, (8, 16, 16), 32, batch_norm=True), num_classes=10, embedding_size=16)
    hparams = {
        "_class_path": "lit_cf.models.DUQClassifier",
        "backbone": {
            "class_path": "lit_cf.models.ConvNet",
            "init_args": {
                "in_channels": 1,
                "channels": [8, 16, 16],
                "hidden": 32,
                "batch_norm": True,
                "image_size": 28,
                "dropout": 0.0,
            },
        },
        "num_classes": 10,
        "embedding_size": 16,
        "length_scale": 0.1,
        "gamma": 0.999,
        "gp_weight": 0.05,
        "centroid_features": "recompute",
        "input_mean": None,
        "input_std": None,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}, path)
    model = load_module(path, DUQClassifier)
    assert model.backbone.fc[2].in_features == 16 * 3 * 3  # every conv padded, as before
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model.eval()(x), old.eval()(x))
