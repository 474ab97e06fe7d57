"""The DUQ paper's protocol from the shipped configs: Fashion-MNIST (vs MNIST) and MNIST (vs Fashion-MNIST).

``lit-cf study --config configs/study/repro_duq.yaml``. The model, optimizer and schedule come
from the configs, not from the study: ``configs/model/duq_cnn.yaml`` (Fashion-MNIST; the
authors' network and initialisation, normalisation 0.2861 / 0.3530 inside the model) and
``configs/model/duq_cnn_mnist.yaml`` (MNIST, 0.1307 / 0.3081), with
``configs/data/{fashion_mnist,mnist}.yaml`` (5,000 training images held out, batch 128) and
``configs/trainer/duq_paper.yaml`` (30 epochs). The paper's figures (the goal, not measured
here): Fashion-MNIST accuracy 92.4%, AUROC vs MNIST 0.955; MNIST accuracy >= 99.3%.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_cf.data import CORRUPTIONS, FashionMNISTDataModule, MNISTDataModule, RenderedDigitsDataModule
from lit_cf.data.base import ImageDataModule
from lit_cf.data.mnist import TorchvisionIDXDataModule
from lit_cf.errors import UserError
from lit_cf.metrics.ood import KernelModel, duq_certainties, ood_auroc
from lit_cf.runs.atomic import atomic_write_text
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study
from lit_cf.studies.resumable_fit import fit_resumable

__all__ = ["DATASETS", "EpochCurve", "ReproDUQ"]

Dataset = Literal["fashion_mnist", "mnist"]

#: dataset -> (data config, model config, datamodule class, OOD datamodule class, the paper's figures)
DATASETS: dict[str, tuple[str, str, type[TorchvisionIDXDataModule], type[TorchvisionIDXDataModule], str]] = {
    "fashion_mnist": (
        "data/fashion_mnist.yaml",
        "model/duq_cnn.yaml",
        FashionMNISTDataModule,
        MNISTDataModule,
        "accuracy 0.924, AUROC 0.955",
    ),
    "mnist": ("data/mnist.yaml", "model/duq_cnn_mnist.yaml", MNISTDataModule, FashionMNISTDataModule, "accuracy >= 0.993"),
}
RAW_FOLDER = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
PAPER_EPOCHS = 30
EVAL_BATCH = 1000
#: dotted overrides the study passes on to the model's configs
OVERRIDE_PREFIXES = ("model.", "data.", "seed_everything")


class EpochCurve(Callback):
    """Test accuracy and OOD AUROC after every ``every`` epochs; the curve is saved in checkpoints.

    Args:
        test_data: In-distribution datamodule (its ``test`` split is evaluated).
        ood_data: Out-of-distribution datamodule (its ``test`` split).
        path: JSON file rewritten (atomically) with the curve after every evaluation.
        every: Evaluate every this many epochs (and after the last one, and at ``stop_after``).
        stop_after: The epoch a stop is planned at (evaluated too).
        say: Where the progress line of each point goes (not ``log``: Lightning sets a callback's
            ``log`` to the module's).
    """

    def __init__(
        self,
        test_data: ImageDataModule,
        ood_data: ImageDataModule,
        path: Path,
        every: int = 1,
        stop_after: int | None = None,
        say: Any = print,
    ) -> None:
        self.test_data, self.ood_data, self.path, self.every, self.stop_after = test_data, ood_data, path, every, stop_after
        self.say = say
        self.curve: list[dict[str, float]] = []
        self.epoch_start = 0.0
        self.lr = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.perf_counter()
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs done
        seconds = time.perf_counter() - self.epoch_start
        if epoch % self.every and epoch != trainer.max_epochs and epoch != self.stop_after:
            return
        start = time.perf_counter()
        model: KernelModel = pl_module  # type: ignore[assignment]  # a DUQClassifier (checked by the study)
        cert, pred, label = duq_certainties(model, self.test_data.loader("test"))
        row = {
            "epoch": epoch,
            "accuracy": float((pred == label).float().mean()),
            "auroc_ood": ood_auroc(cert, duq_certainties(model, self.ood_data.loader("test"))[0]),
            "train_seconds": round(seconds, 2),
            "eval_seconds": round(time.perf_counter() - start, 2),
            "lr": self.lr,
        }
        self.curve = [r for r in self.curve if r["epoch"] != epoch] + [row]
        atomic_write_text(self.path, json.dumps(self.curve, indent=1))
        self.say(
            f"epoch {epoch:>3}  accuracy {row['accuracy']:.4f}  AUROC {row['auroc_ood']:.4f}  "
            f"({seconds:.1f} s training, {row['eval_seconds']:.1f} s evaluation)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = list(state_dict["curve"])


@register_study
class ReproDUQ(Study):
    """The DUQ paper's protocol on Fashion-MNIST (OOD: MNIST) and MNIST (OOD: Fashion-MNIST).

    After every ``eval_every`` epochs the test accuracy (10,000 images) and the AUROC against
    the other dataset's test split (OOD positive, score ``-max_c K_c``; the OOD images go
    through the model's own normalisation) are added to the curve, which lives in the checkpoint
    (so a resumed fit keeps it) and in ``models/duq-<dataset>-<key>/curve.json``, next to
    ``result.json`` (the dataset's figures and curve).

    Resuming: every epoch writes the fit's ``last.ckpt``; the same command continues an
    interrupted fit where it stopped, and with ``time_budget`` trains another budget each
    time. A fit stopped by ``stop_after`` continues once ``stop_after`` is raised or dropped,
    which changes the settings: pass ``--overwrite`` (the results are replaced, the trained
    models of the same configs are kept and continue).

    Args:
        root: Data root holding ``FashionMNIST/raw`` and ``MNIST/raw`` (writable: gzipped files
            are unpacked beside themselves).
        datasets: The datasets to train on, in order.
        epochs: Schedule length (30: the paper's); a shorter one puts the learning-rate
            milestones at 1/3 and 2/3 of it (the results say which ran).
        eval_every: Add a curve point every this many epochs (and after the last one).
        stop_after: Stop once this many epochs are done in total (``null``: never).
        time_budget: Seconds of training per dataset and call; stops after the last whole
            epoch that fits (``null``: no limit).
        corruptions: After a finished fit also the AUROC against corrupted Fashion-MNIST (every
            corruption, severities 1-5; Fashion-MNIST model) or the rendered digits (MNIST model).
        overrides: Dotted overrides of the model and data configs (keys starting with
            ``model.``, ``data.`` or ``seed_everything``), e.g.
            ``{model.init_args.backbone.init_args.channels: [8, 16, 16]}``.
        accelerator: Lightning accelerator.
        precision: Lightning precision of the training.
        progress: Show Lightning's progress bar.
    """

    name: ClassVar[str] = "repro_duq"

    def __init__(
        self,
        root: str = "data",
        datasets: list[Dataset] | None = None,
        epochs: int = PAPER_EPOCHS,
        eval_every: int = 1,
        stop_after: int | None = None,
        time_budget: float | None = None,
        corruptions: bool = False,
        overrides: dict[str, Any] | None = None,
        accelerator: str = "auto",
        precision: str = "32-true",
        progress: bool = False,
    ) -> None:
        self.datasets: list[str] = list(DATASETS) if datasets is None else list(datasets)
        if not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise UserError(f"repro_duq: datasets must name each of {list(DATASETS)} at most once, and at least one")
        if epochs < 1 or eval_every < 1 or (stop_after is not None and stop_after < 1):
            raise UserError("repro_duq: epochs, eval_every and stop_after must be >= 1")
        if time_budget is not None and time_budget <= 0:
            raise UserError(f"repro_duq: time_budget must be a positive number of seconds, got {time_budget}")
        bad = [k for k in overrides or {} if not k.startswith(OVERRIDE_PREFIXES)]
        if bad:
            raise UserError(f"repro_duq: overrides {bad} are not model.*, data.* or seed_everything keys")
        # the data each fit and its OOD evaluation read, before anything is written
        for name in {n for d in self.datasets for n in (d, "mnist" if d == "fashion_mnist" else "fashion_mnist")}:
            raw = Path(root) / RAW_FOLDER[name] / "raw"
            if not raw.is_dir():
                raise UserError(
                    f"repro_duq: {raw} not found ({name} is trained on or used as OOD data); "
                    "copy the data first: bash scripts/prepare_data.sh ../shared/data data (then root: data)"
                )
        self.root, self.epochs, self.eval_every = root, epochs, eval_every
        self.stop_after, self.time_budget, self.corruptions = stop_after, time_budget, corruptions
        self.overrides = dict(overrides or {})
        self.precision, self.progress = precision, progress

    def spec(self, dataset: str) -> ModelSpec:
        """The configs and arguments of one dataset's model (its key names its folder)."""
        data_cfg, model_cfg = DATASETS[dataset][:2]
        args: dict[str, Any] = {"data.init_args.root": self.root, "trainer.max_epochs": self.epochs}
        if self.epochs != PAPER_EPOCHS:  # shortened schedule: milestones at 1/3 and 2/3
            args["model.init_args.scheduler.init_args.milestones"] = [
                max(1, round(self.epochs / 3)),
                max(2, round(2 * self.epochs / 3)),
            ]
        args.update(self.overrides)
        return ModelSpec(f"duq-{dataset}", (data_cfg, model_cfg, "trainer/duq_paper.yaml"), args)

    def run_dataset(self, ctx: StudyContext, dataset: str) -> dict[str, Any]:
        from lit_cf.models import DUQClassifier

        _, _, data_cls, ood_cls, goal = DATASETS[dataset]
        spec = self.spec(dataset)
        folder = ctx.out / "models" / f"{spec.name}-{spec.key()}"
        folder.mkdir(parents=True, exist_ok=True)
        test_dm, ood_dm = data_cls(root=self.root, batch_size=EVAL_BATCH), ood_cls(root=self.root, batch_size=EVAL_BATCH)
        curve = EpochCurve(test_dm, ood_dm, folder / "curve.json", self.eval_every, self.stop_after, say=ctx.log)
        fit = fit_resumable(
            ctx,
            spec,
            self.epochs,
            callbacks=[curve],
            stop_after=self.stop_after,
            time_budget=self.time_budget,
            trainer_args={"precision": self.precision, "enable_progress_bar": self.progress},
        )
        if not isinstance(fit.model, DUQClassifier):
            raise UserError(f"repro_duq: {spec.configs[1]} does not build a DUQClassifier")
        res: dict[str, Any] = {
            "dataset": dataset,
            "epochs_done": fit.epochs_done,
            "epochs": self.epochs,
            "finished": fit.finished,
            "stopped_by": fit.stopped_by,
            "seconds_this_run": fit.trained_seconds,
            "curve": curve.curve,
            "config": [*spec.configs, *(f"{k}={v}" for k, v in self.overrides.items())],
            "goal": goal,
            "checkpoint": str(fit.checkpoint),
        }
        if curve.curve:
            res["accuracy"], res["auroc_ood"] = curve.curve[-1]["accuracy"], curve.curve[-1]["auroc_ood"]
        if fit.finished and self.corruptions:
            model = fit.model.eval()
            res.update(
                ctx.cached(f"{spec.name}-{spec.key()}-corruptions", str(fit.checkpoint), lambda: self.corrupted(model, dataset))
            )
        atomic_write_text(folder / "result.json", json.dumps(res, indent=1))
        return res

    def corrupted(self, model: KernelModel, dataset: str) -> dict[str, Any]:
        """AUROC against corrupted Fashion-MNIST (Fashion-MNIST model) or rendered digits (MNIST model)."""
        cert = duq_certainties(model, DATASETS[dataset][2](root=self.root, batch_size=EVAL_BATCH).loader("test"))[0]
        if dataset == "mnist":
            rendered = RenderedDigitsDataModule(test_size=10000, train_size=10, val_size=10, batch_size=EVAL_BATCH)
            return {"auroc_vs_rendered_digits": ood_auroc(cert, duq_certainties(model, rendered.loader("test"))[0])}
        corr: dict[str, Any] = {}
        for name in CORRUPTIONS:
            per_sev = [
                ood_auroc(
                    cert,
                    duq_certainties(
                        model,
                        FashionMNISTDataModule(
                            root=self.root, batch_size=EVAL_BATCH, test_corruption=name, corruption_severity=s
                        ).loader("test"),
                    )[0],
                )
                for s in range(1, 6)
            ]
            corr[name] = {"mean": sum(per_sev) / 5, "by_severity": per_sev}
        return {"auroc_vs_corrupted_fashion_mnist": corr}

    def run(self, ctx: StudyContext) -> StudyResult:
        protocol = "paper" if self.epochs == PAPER_EPOCHS else "shortened"
        rows, notes = [], [f"{protocol} schedule ({self.epochs} epochs); curves in models/duq-<dataset>-<key>/curve.json"]
        for dataset in self.datasets:
            r = self.run_dataset(ctx, dataset)
            rows.append(
                {
                    "dataset": dataset,
                    "OOD": "mnist" if dataset == "fashion_mnist" else "fashion_mnist",
                    "epochs done": r["epochs_done"],
                    "finished": r["finished"],
                    "accuracy": r.get("accuracy", float("nan")),
                    "AUROC": r.get("auroc_ood", float("nan")),
                    "paper": r["goal"],
                    "train s (this run)": r["seconds_this_run"],
                }
            )
            if r["stopped_by"]:
                notes.append(f"{dataset}: stopped by {r['stopped_by']} after {r['epochs_done']} of {self.epochs} epochs")
            if "auroc_vs_rendered_digits" in r:
                notes.append(f"{dataset}: AUROC vs rendered digits {r['auroc_vs_rendered_digits']:.4f}")
            if "auroc_vs_corrupted_fashion_mnist" in r:
                corr = r["auroc_vs_corrupted_fashion_mnist"]
                notes.append(
                    f"{dataset}: AUROC vs corrupted Fashion-MNIST (mean over severities 1-5): "
                    + ", ".join(f"{k} {v['mean']:.3f}" for k, v in corr.items())
                )
        return StudyResult(rows=rows, notes=notes)
