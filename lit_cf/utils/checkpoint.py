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


#: packages whose classes a checkpoint may name (``_class_path`` and nested ``class_path``):
#: lit-cf and its declared model dependencies (diffusers supplies the DDPM's denoiser)
TRUSTED_PACKAGES = ("lit_cf", "torch", "torchvision", "torchmetrics", "diffusers")


def trusted_module(module_name: str) -> bool:
    """Whether ``module_name`` lies under one of :data:`TRUSTED_PACKAGES`."""
    return any(module_name == p or module_name.startswith(p + ".") for p in TRUSTED_PACKAGES)


def class_paths(obj: Any, where: str = "hyper_parameters") -> list[tuple[str, Any]]:
    """Every ``class_path`` / ``_class_path`` value in a (nested) hyperparameter structure."""
    found: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("class_path", "_class_path", "_instantiator"):
                found.append((f"{where}.{key}", value))
            else:
                found.extend(class_paths(value, f"{where}.{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found.extend(class_paths(value, f"{where}[{i}]"))
    return found


def check_class_paths(hparams: Any, path: str | Path) -> None:
    """Refuse a checkpoint that names a class outside :data:`TRUSTED_PACKAGES` anywhere.

    The one exception is the top-level ``_class_path`` of a module that is already imported
    (a class the user defined and imported in-process): checking it imports nothing.

    The config parser imports every ``class_path`` it rebuilds (e.g. a backbone's), and an
    import runs module code: nothing read from a file may decide what is imported.
    """
    for where, value in class_paths(hparams):
        if where.endswith("._instantiator"):
            if value != "lightning.pytorch.cli.instantiate_module":
                raise CheckpointError(f"{path} names an unknown instantiator {value!r} ({where}): refused")
            continue
        module_name = value.rpartition(".")[0] if isinstance(value, str) else ""
        # the model's own class may come from a module the user imported (a notebook, a test):
        # that imports nothing; nested classes (backbones, ...) must be trusted packages'
        own_and_loaded = where == "hyper_parameters._class_path" and module_name in sys.modules
        if not (isinstance(value, str) and module_name and (trusted_module(module_name) or own_and_loaded)):
            raise CheckpointError(
                f"{path} names class {value!r} ({where}), outside {', '.join(TRUSTED_PACKAGES)}: refused, "
                "nothing was imported (a checkpoint must not decide what code runs)"
            )


def checkpoint_class(path: str | Path) -> tuple[type, dict[str, Any]]:
    """The class a ``lit-cf fit`` checkpoint records (``_class_path``) and its hyperparameters.

    Importing runs module code, so every class the checkpoint names (also nested ones, e.g. a
    backbone's) must lie under :data:`TRUSTED_PACKAGES`; nothing is imported otherwise, and
    nothing is instantiated.
    """
    hparams = dict(read_checkpoint(path).get("hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    if not class_path:
        raise CheckpointError(
            f"{path} does not record its model class (`_class_path`); checkpoints written by `lit-cf fit` do. "
            "Re-train with the CLI or save with LightningCLI."
        )
    check_class_paths(hparams, path)
    module_name, _, cls_name = class_path.rpartition(".")
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
