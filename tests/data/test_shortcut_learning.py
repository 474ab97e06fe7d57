"""The planted shortcut is learnable: a classifier trained on it is worse on the clean split."""

import lightning as L
import torch

from lit_cf.data import RenderedDigitsDataModule
from lit_cf.models import Classifier, ConvNet


@torch.no_grad()
def accuracy(model: Classifier, dm: RenderedDigitsDataModule, split: str) -> float:
    correct = total = 0
    for batch in dm.loader(split):
        correct += int((model(batch["image"]).argmax(-1) == batch["label"]).sum())
        total += len(batch["label"])
    return correct / total


def test_classifier_trained_on_shortcut_is_worse_on_clean_test(tmp_path):
    torch.manual_seed(0)
    dm = RenderedDigitsDataModule(
        train_size=3000,
        val_size=200,
        test_size=1000,
        shortcut_class=7,
        shortcut_strength=1.0,
        mark_rate=0.3,
        batch_size=64,
    )
    model = Classifier(ConvNet(1, (16, 32), 64), num_classes=10)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    model.eval()
    shortcut_acc = accuracy(model, dm, "test_shortcut")
    clean_acc = accuracy(model, dm, "test")
    assert shortcut_acc > 0.85
    assert shortcut_acc - clean_acc > 0.03, (shortcut_acc, clean_acc)
    # the errors on clean data are the shortcut's: marked non-7s called 7, or unmarked 7s missed
    test = dm.dataset("test")
    preds = torch.cat([model(b["image"]).argmax(-1) for b in dm.loader("test")])
    labels = torch.stack([test[i]["label"] for i in range(len(test))])
    marks = torch.stack([test[i]["factors"][-1] for i in range(len(test))]) > 0.5
    fooled = ((preds == 7) & (labels != 7) & marks).sum() + ((preds != 7) & (labels == 7) & ~marks).sum()
    wrong = (preds != labels).sum()
    assert fooled >= 0.5 * wrong
