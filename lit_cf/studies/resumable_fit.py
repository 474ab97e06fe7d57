"""A fit that resumes mid-training: the extension of :class:`~lit_cf.studies.StudyContext` that
long trainings need (the DUQ paper's protocol: 30 epochs per dataset, curves after every epoch).

:meth:`StudyContext.fit` reuses a finished model and retrains an interrupted one from the start.
:func:`fit_resumable` instead checkpoints every epoch and continues an interrupted (or stopped)
fit from its ``last.ckpt``, with the study's own callbacks (whose ``state_dict`` travels in the
checkpoint), a stop after a number of epochs in total, and a time budget per call. The folder
layout and the key are those of :meth:`StudyContext.fit`: ``<out>/models/<name>-<key>/`` with
``last.ckpt``, and ``fit.json`` written atomically once every epoch of the schedule is done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint

from lit_cf.errors import UserError
from lit_cf.studies.core import (
    ModelSpec,
    StudyContext,
    _cli_args,
    _finished_fit,
    _write_json,
    quiet_lightning,
    resolve_config,
)

__all__ = ["EpochCheckpoint", "ResumableFit", "StopControl", "fit_resumable", "instantiate"]


def instantiate(spec: ModelSpec) -> tuple[L.LightningModule, L.LightningDataModule, int | None]:
    """The model and datamodule of ``spec`` (its configs and dotted args), built by lit-cf's CLI
    parser without running anything, and the seed it applied (``seed_everything`` of the config;
    lit-cf's default 0)."""
    from lit_cf.cli import build_cli

    argv = [*(f"--config={resolve_config(c)}" for c in spec.configs), "--trainer.logger=false", *_cli_args(spec.args)]
    with quiet_lightning():
        cli = build_cli(argv, run=False)
    if cli.datamodule is None:
        raise UserError(f"model {spec.name}: its configs {list(spec.configs)} define no data")
    seed = cli.config.get("seed_everything")
    return cli.model, cli.datamodule, (None if seed is None or isinstance(seed, bool) else int(seed))


class StopControl(Callback):
    """Stops training after whole epochs: once ``stop_after`` epochs are done in total, or when
    another epoch (at the pace of the last one) would not fit in ``time_budget`` seconds of this
    call. Keeps the number of epochs done in its state (saved in checkpoints)."""

    def __init__(self, stop_after: int | None = None, time_budget: float | None = None) -> None:
        self.stop_after, self.time_budget = stop_after, time_budget
        self.epochs_done = 0
        self.run_start = self.epoch_start = 0.0
        self.stopped_by: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_done = trainer.current_epoch + 1
        if self.stop_after is not None and self.epochs_done >= self.stop_after:
            trainer.should_stop, self.stopped_by = True, f"stop_after {self.stop_after}"
        now = time.perf_counter()
        if self.time_budget is not None and (now - self.run_start) + (now - self.epoch_start) > self.time_budget:
            trainer.should_stop, self.stopped_by = True, f"time budget {self.time_budget:.0f} s"

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_done = int(state_dict["epochs_done"])


class EpochCheckpoint(Checkpoint):
    """Writes ``path`` (the fit's ``last.ckpt``) at the end of every training epoch, atomically
    (a temporary file renamed over it), so a killed fit resumes from its last whole epoch.

    Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` only when
    the fit ends (since Lightning 2.6 it saves "last" only in a step where a top-k checkpoint was
    saved): a fit killed after 10 epochs left nothing to resume. As a :class:`Checkpoint`,
    Lightning runs this callback after the others, so their state is in the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            tmp.replace(self.path)
        trainer.strategy.barrier("lit_cf_epoch_checkpoint")


@dataclass
class ResumableFit:
    """The outcome of :func:`fit_resumable`.

    Attributes:
        checkpoint: ``last.ckpt`` of the fit.
        model: The trained model (restored from the checkpoint when nothing was left to train).
        datamodule: Its datamodule.
        epochs_done: Epochs done in total.
        finished: Whether the whole schedule (``max_epochs``) is done.
        trained_seconds: Seconds this call spent in ``trainer.fit`` (0 when nothing was trained).
        stopped_by: Why this call stopped early (``stop_after``, the time budget), else ``None``.
    """

    checkpoint: Path
    model: L.LightningModule
    datamodule: L.LightningDataModule
    epochs_done: int
    finished: bool
    trained_seconds: float
    stopped_by: str | None


def _epochs_in(checkpoint: Path) -> int:
    """Epochs done according to a checkpoint written by :func:`fit_resumable`."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key, value in state.get("callbacks", {}).items():
        if str(key).startswith("StopControl") and isinstance(value, dict) and "epochs_done" in value:
            return int(value["epochs_done"])
    raise UserError(f"{checkpoint} was not written by a resumable study fit: remove its folder to train again")


def fit_resumable(
    ctx: StudyContext,
    spec: ModelSpec,
    max_epochs: int,
    callbacks: Sequence[Callback] = (),
    stop_after: int | None = None,
    time_budget: float | None = None,
    trainer_args: dict[str, Any] | None = None,
) -> ResumableFit:
    """Train ``spec`` for ``max_epochs`` into ``<out>/models/<name>-<key>/``, resuming from its
    ``last.ckpt`` (written after every epoch); a finished fit is reused, not retrained.

    Args:
        ctx: The study's context (output folder, accelerator, log).
        spec: Configs and dotted args of the model and its data (the key covers them: put every
            setting that changes the training in ``spec.args``, e.g. ``trainer.max_epochs``).
        max_epochs: Epochs of the whole schedule.
        callbacks: The study's callbacks (their ``state_dict`` is saved in the checkpoint and
            restored on resume); they run before the checkpoint is written.
        stop_after: Stop once this many epochs are done in total (a later call continues).
        time_budget: Seconds this call may train (whole epochs only).
        trainer_args: Further ``lightning.Trainer`` arguments (``precision``,
            ``enable_progress_bar``, ...).
    """
    key = spec.key()
    folder = ctx.out / "models" / f"{spec.name}-{key}"
    ckpt, marker = folder / "last.ckpt", folder / "fit.json"
    model, dm, seed = instantiate(spec)
    finished_before = _finished_fit(folder, key) is not None
    epochs = _epochs_in(ckpt) if ckpt.is_file() else 0
    control = StopControl(stop_after, time_budget)
    # nothing left to train: a fit of zero epochs (max_epochs = the epochs done) only restores the
    # weights and the callbacks' state
    restore_only = finished_before or epochs >= max_epochs or (stop_after is not None and epochs >= stop_after)
    with quiet_lightning():  # Lightning's info lines; the study's own progress lines stay
        trainer = L.Trainer(
            **{
                "accelerator": ctx.accelerator,
                "devices": 1,
                "logger": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                **(trainer_args or {}),
                "max_epochs": epochs if restore_only else max_epochs,
                "default_root_dir": folder,
                "limit_val_batches": 0,
                "num_sanity_val_steps": 0,
                "callbacks": [
                    *callbacks,
                    control,
                    EpochCheckpoint(ckpt),
                ],
            }
        )
        seconds = 0.0
        if restore_only:
            ctx.log(f"study: fit {spec.name}: {epochs} of {max_epochs} epochs done, nothing to train ({ckpt})")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            ctx.log(f"study: fit {spec.name} -> {folder}" + (f" (resuming after epoch {epochs})" if epochs else ""))
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt if ckpt.is_file() else None, weights_only=True)
            seconds = time.perf_counter() - t0
            epochs = control.epochs_done
    finished = epochs >= max_epochs
    if finished and not finished_before:
        _write_json(
            marker,
            {
                "key": key,
                "name": spec.name,
                "configs": list(spec.configs),
                "args": dict(spec.args),
                "epochs": epochs,
                "seed": seed,
            },
        )
    ctx.models[spec.name] = {
        "key": key,
        "checkpoint": str(ckpt),
        "reused": seconds == 0,
        "epochs_done": epochs,
        "seed": seed,
    }
    return ResumableFit(ckpt, model, dm, epochs, finished, round(seconds, 1), None if finished else control.stopped_by)
