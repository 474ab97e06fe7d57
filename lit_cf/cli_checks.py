"""Checks ``lit-cf`` runs before a verb writes anything: numbers, ``--ckpt_path``, data, classes.

Every check raises :class:`~lit_cf.errors.UserError`; the CLI prints it as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_cf.errors import UserError

__all__ = ["check_before_run", "check_ckpt_path", "check_trainer_config"]

#: trainer settings that are counts: (smallest allowed value, what it means)
_TRAINER_COUNTS = {
    "max_epochs": (-1, "-1 for no limit"),
    "min_epochs": (0, ""),
    "max_steps": (-1, "-1 for no limit"),
    "min_steps": (0, ""),
    "accumulate_grad_batches": (1, ""),
    "check_val_every_n_epoch": (1, ""),
    "log_every_n_steps": (1, ""),
    "num_sanity_val_steps": (-1, "-1 for all"),
    "fast_dev_run": (0, ""),
}
_TRAINER_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches")


def _get(ns: Any, key: str) -> Any:
    try:
        return ns.get(key) if hasattr(ns, "get") else getattr(ns, key, None)
    except (KeyError, AttributeError):
        return None


def check_trainer_config(config: Any) -> None:
    """Counts and fractions of the trainer settings (before the Trainer is built)."""
    trainer = _get(config, "trainer")
    if trainer is None:
        return
    for key, (low, note) in _TRAINER_COUNTS.items():
        value = _get(trainer, key)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int) or value < low:
            raise UserError(f"trainer.{key} must be an integer >= {low}{f' ({note})' if note else ''}, got {value}")
    for key in _TRAINER_LIMITS:
        value = _get(trainer, key)
        if value is None or isinstance(value, bool):
            continue
        # Lightning reads a whole float above 1 (2.0, from YAML's int|float) as a batch count
        if value < 0 or isinstance(value, float) and value > 1.0 and not value.is_integer():
            raise UserError(f"trainer.{key} must be a batch count >= 0 or a fraction in [0, 1], got {value}")


def check_ckpt_path(config: Any) -> None:
    """``--ckpt_path`` of fit/validate/test/predict: present, weights-only readable, trusted classes."""
    from lit_cf.utils.checkpoint import check_class_paths, read_checkpoint

    subcommand = _get(config, "subcommand")
    if not subcommand:
        return
    ckpt_path = _get(_get(config, subcommand), "ckpt_path")
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return  # Lightning's own keywords for checkpoints it tracks
    ckpt = read_checkpoint(Path(ckpt_path))  # CheckpointError: missing, corrupt, or needs unpickling
    check_class_paths(ckpt.get("hyper_parameters") or {}, ckpt_path)


def _data_error(datamodule: Any, err: BaseException) -> UserError:
    from lit_cf.utils.boundary import user_message

    message = user_message(err) or " ".join(str(err).split()) or type(err).__name__
    return UserError(f"cannot load the data of {type(datamodule).__name__}: {message}")


_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


def check_before_run(subcommand: str, cli: Any) -> None:
    """Before Lightning starts (and a logger creates its folder): the data loads, classes match."""
    datamodule, model = getattr(cli, "datamodule", None), getattr(cli, "model", None)
    if datamodule is None or subcommand not in ("fit", "validate", "test", "predict"):
        return
    if hasattr(datamodule, "dataset"):
        splits = _SPLITS.get(subcommand) or (getattr(datamodule, "predict_split", "test"),)
        for split in splits:
            if split not in getattr(datamodule, "split_names", splits):
                continue
            try:
                datamodule.dataset(split)
            except UserError:
                raise
            except (ValueError, OSError, RuntimeError, AssertionError, EOFError) as err:
                # damaged or missing dataset files surface here (e.g. torchvision's IDX reader asserts)
                raise _data_error(datamodule, err) from err
    model_classes = getattr(model, "num_classes", None)
    try:
        data_classes = getattr(datamodule, "num_classes", None)
    except (ValueError, OSError, RuntimeError) as err:
        raise _data_error(datamodule, err) from err
    if isinstance(model_classes, int) and isinstance(data_classes, int) and data_classes and model_classes != data_classes:
        raise UserError(
            f"the model has num_classes={model_classes} but {type(datamodule).__name__} has {data_classes} classes: "
            f"set the model's num_classes to {data_classes}"
        )
