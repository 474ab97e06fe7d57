"""Engine properties: per-image independence, per-image stopping, frozen models."""

import pytest
import torch

from lit_cf.explainers import DeepInversionCounterfactual, PixelCounterfactual
from lit_cf.explainers.deepinversion import jitter_flip
from lit_cf.models import Classifier, ConvNet


def make_classifier(batch_norm: bool) -> Classifier:
    torch.manual_seed(0)
    model = Classifier(ConvNet(1, (8, 16), 32, batch_norm=batch_norm), num_classes=10)
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # confident, input-sensitive outputs without training
    if batch_norm:  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(32, 1, 28, 28))
    return model.eval()


def make_batch(images: torch.Tensor, targets: list[int], seeds: list[int]) -> dict[str, torch.Tensor]:
    return {"image": images, "target": torch.tensor(targets), "seed": torch.tensor(seeds)}


METHODS = {
    "pixel": lambda: PixelCounterfactual(steps=15, lr=0.05, l2_weight=0.1, stop_probability=None),
    "deepinversion": lambda: DeepInversionCounterfactual(
        steps=15, lr=0.05, bn_weight=0.1, jitter=2, flip=True, stop_probability=None
    ),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_counterfactual_does_not_depend_on_batch_mates(name):
    torch.manual_seed(1)
    images = torch.rand(6, 1, 28, 28)
    method = METHODS[name]()
    method.attach(make_classifier(batch_norm=True))
    a = method.optimise(make_batch(images[[0, 1, 2]], [3, 4, 5], [10, 11, 12]))
    b = method.optimise(make_batch(images[[4, 0]], [7, 3], [14, 10]))
    torch.testing.assert_close(a["counterfactual"][0], b["counterfactual"][1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a["counterfactual"][0], images[0])  # it did change


def test_batch_statistics_switch_couples_images():
    """The original DeepInversion batch statistics make results depend on chunk-mates."""
    torch.manual_seed(1)
    images = torch.rand(4, 1, 28, 28)
    method = DeepInversionCounterfactual(steps=10, lr=0.05, bn_weight=1.0, bn_statistics="batch", stop_probability=None)
    method.attach(make_classifier(batch_norm=True))
    a = method.optimise(make_batch(images[[0, 1]], [3, 4], [10, 11]))
    b = method.optimise(make_batch(images[[0, 2, 3]], [3, 5, 6], [10, 12, 13]))
    assert not torch.allclose(a["counterfactual"][0], b["counterfactual"][0], atol=1e-5)


def test_stopped_images_freeze_and_record_steps():
    torch.manual_seed(2)
    classifier = make_classifier(batch_norm=False)
    images = torch.rand(8, 1, 28, 28)
    probs = classifier.probabilities(images)
    targets = probs.argsort(-1, descending=True)[:, 1]  # runner-up class: some flip fast, some slow
    method = PixelCounterfactual(steps=60, lr=0.02, l2_weight=0.0, stop_probability=0.6)
    method.attach(classifier)
    out = method.optimise(make_batch(images, targets.tolist(), list(range(8))))
    steps = out["steps"]
    assert steps.min() < steps.max(), "images should stop at different steps"
    stopped = int(steps.argmin())
    # the stopped image equals the same image optimised alone for exactly that many steps
    alone = PixelCounterfactual(steps=int(steps[stopped]), lr=0.02, l2_weight=0.0, stop_probability=None)
    alone.attach(classifier)
    ref = alone.optimise(make_batch(images[[stopped]], [int(targets[stopped])], [stopped]))
    torch.testing.assert_close(out["counterfactual"][stopped], ref["counterfactual"][0], atol=1e-5, rtol=1e-5)
    reached = out["final_probs"][torch.arange(8), targets] >= 0.6
    assert reached[steps < 60].all()


def test_models_stay_frozen_and_bn_statistics_unchanged():
    classifier = make_classifier(batch_norm=True)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    method = DeepInversionCounterfactual(steps=5, stop_probability=None)
    method.attach(classifier)
    method.train()  # a loop calling train() must not unfreeze the classifier
    assert not classifier.training
    assert all(not p.requires_grad for p in classifier.parameters())
    method.optimise(make_batch(torch.rand(3, 1, 28, 28), [1, 2, 3], [0, 1, 2]))
    for k, v in classifier.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_pixel_counterfactual_stays_in_range_and_respects_inference_mode_guard():
    method = PixelCounterfactual(steps=5, lr=1.0, stop_probability=None)
    method.attach(make_classifier(batch_norm=False))
    out = method.optimise(make_batch(torch.rand(2, 1, 28, 28), [1, 2], [0, 1]))
    assert out["counterfactual"].min() >= 0 and out["counterfactual"].max() <= 1
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference mode"):
        method.optimise(make_batch(torch.rand(2, 1, 28, 28), [1, 2], [0, 1]))


def test_jitter_flip_matches_roll_and_flip():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float).view(2, 1, 4, 5)
    shifts = torch.tensor([[1, -2], [0, 3]])
    flips = torch.tensor([False, True])
    out = jitter_flip(x, shifts, flips)
    torch.testing.assert_close(out[0], torch.roll(x[0], shifts=(1, -2), dims=(1, 2)))
    torch.testing.assert_close(out[1], torch.roll(x[1], shifts=(0, 3), dims=(1, 2)).flip(-1))
