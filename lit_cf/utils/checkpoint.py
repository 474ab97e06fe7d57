"""Safe checkpoint loading: ``weights_only=True`` and an allowlist of lit-cf classes."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

from lit_cf.errors import UserError

M = TypeVar("M", bound=L.LightningModule)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not hold the expected kind of model."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``weights_only=True`` (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train one with `lit-cf fit` and pass its .ckpt path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or needs unsafe unpickling
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt, truncated or not a weights-only Lightning checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def checkpoint_class(path: str | Path) -> tuple[type, dict[str, Any]]:
    """The class a ``lit-cf fit`` checkpoint records (``_class_path``) and its hyperparameters.

    Importing runs module code, so only lit-cf's own modules, or modules already imported, are
    imported. Nothing is instantiated.
    """
    hparams = dict(read_checkpoint(path).get("hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    if not class_path:
        raise CheckpointError(
            f"{path} does not record its model class (`_class_path`); checkpoints written by `lit-cf fit` do. "
            "Re-train with the CLI or save with LightningCLI."
        )
    module_name, _, cls_name = class_path.rpartition(".")
    if module_name not in sys.modules and not module_name.startswith("lit_cf."):
        raise CheckpointError(
            f"{path} names class {class_path!r} from a module that is not part of lit-cf and not imported; "
            "import it yourself first if you trust this checkpoint"
        )
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path} names class {class_path!r}, which cannot be imported") from err
    return cls, hparams


def load_module(path: str | Path, expected: type[M], map_location: str | torch.device = "cpu") -> M:
    """Rebuild the LightningModule saved by ``lit-cf fit`` and load its weights strictly.

    The class comes from the checkpoint's ``_class_path`` hyperparameter (written by
    LightningCLI); it must be a subclass of ``expected`` defined in an importable module.
    Weights are loaded with ``strict=True`` so a checkpoint of another architecture fails with
    a clear message instead of explaining a half-initialised model.
    """
    cls, _ = checkpoint_class(path)
    class_path = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)
    if not (isinstance(cls, type) and issubclass(cls, expected)):
        raise CheckpointError(
            f"{path} holds a {class_path}, not a {expected.__name__}: pass a checkpoint of the right kind of model"
        )
    try:
        model = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not match the architecture {class_path}: {err}") from err
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"cannot rebuild {class_path} from {path}: {err}") from err
    return model
