"""Python API for notebooks: :func:`explain` any classifier on any images.

It drives the same engine as ``lit-cf explain`` (:func:`lit_cf.explainers.engine.run_explain`)
and writes the same run directory (resume, grids, manifest), so ``lit-cf evaluate`` reads it.
A classifier given as an in-memory module is saved into the run as a traced TorchScript copy
(``classifier.ts``) for that purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn

from lit_cf.errors import UserError


def _method(method: Any) -> Any:
    import inspect

    from lit_cf.explainers.base import CounterfactualMethod
    from lit_cf.explainers.registry import method_class, method_registry

    if isinstance(method, CounterfactualMethod):
        return method
    if not isinstance(method, str):
        raise UserError(f"method must be a lit_cf.explainers method instance or one of {list(method_registry())}, got {method!r}")
    cls = method_class(method)
    required = [
        n
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise UserError(
            f"{method} needs {', '.join(required)}: pass an instance, e.g. "
            f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}({required[0]}=...)"
        )
    return cls()


def _first_conv_channels(classifier: Any) -> int | None:
    if isinstance(classifier, nn.Module) and not isinstance(classifier, torch.jit.ScriptModule):
        for m in classifier.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
    return None


def _datamodule(images: Any, classifier: Any, image_size: int | None, channels: int | None) -> tuple[L.LightningDataModule, str]:
    from lit_cf.data import ImageFolderDataModule, TensorDataModule

    if isinstance(images, L.LightningDataModule):
        return images, "test"
    if isinstance(images, Tensor):
        return TensorDataModule.from_tensor(images), "all"
    if isinstance(images, (str, Path)) or (isinstance(images, Sequence) and not isinstance(images, (str, bytes))):
        folder: Path | None = None
        files: list[str] | None = None
        if isinstance(images, (str, Path)):
            folder = Path(images)
            if not folder.is_dir():
                raise UserError(f"images: {images} is not a folder (give a folder, a list of image files, or a tensor)")
        else:
            files = [str(f) for f in images]
            if not files:
                raise UserError("images: the list of files is empty")
        if image_size is None or channels is None:
            from PIL import Image

            from lit_cf.data.image_folder import scan_folder

            first = Path(files[0]) if files else scan_folder(cast(Path, folder))[0][0]  # files is None: a folder
            if not first.is_file():
                raise UserError(f"image file not found: {first}")
            with Image.open(first) as im:
                size, mode = min(im.size), im.mode
            image_size = image_size or size
            channels = channels or _first_conv_channels(classifier) or (1 if mode in ("L", "1", "I;16") else 3)
        dm = ImageFolderDataModule(
            root=str(images) if folder is not None else None, files=files, image_size=image_size, channels=channels
        )
        return dm, "all"
    raise UserError(f"images must be a tensor [N, C, H, W], a list of image files or a folder, got {type(images).__name__}")


def explain(
    classifier: nn.Module | Callable[[Tensor], Tensor] | str | Mapping[str, Any],
    images: Tensor | Sequence[str | Path] | str | Path | L.LightningDataModule,
    method: Any,
    output_dir: str | Path,
    target: int | list[int] | str = "most_likely_other",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    split: str | None = None,
    num_queries: int | None = None,
    target_file: str | None = None,
    on_source_equals_target: str = "error",
    chunk_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    num_grid_images: int = 32,
    **trainer: Any,
):
    """Explain ``classifier`` on ``images`` with ``method``; returns the finished ExplainRun.

    Args:
        classifier: Any ``nn.Module`` or callable mapping images ``[N, C, H, W]`` in ``[0, 1]``
            to logits ``[N, C]`` (normalise inside it, or give a mapping with ``input_mean``/
            ``input_std``), or any source ``lit-cf explain --classifier`` takes (path or mapping).
            A module is put in eval mode with gradients off while it is explained; its previous
            mode and ``requires_grad`` flags are restored afterwards.
        images: A tensor batch ``[N, C, H, W]`` in ``[0, 1]``, a list of image files, a folder
            (class subfolders give labels; see :class:`lit_cf.data.ImageFolderDataModule`), or
            a lit-cf datamodule.
        method: A method instance (e.g. ``lit_cf.explainers.PixelCounterfactual(steps=100)``) or
            a registered name (:func:`lit_cf.explainers.registry.method_registry`: ``pixel``,
            ``deepinversion``, ``disc``, ...) with its default settings.
        output_dir: The run directory (new, empty, or an earlier run of the same call: resumed).
        target: Target rule, as for ``lit-cf explain`` (``most_likely_other``, a class, a list,
            ``all``, ``flip``, ``label``, ``file``).
        image_size: Side of the images read from files (default: the first image's shorter side).
        channels: 1 or 3 for images read from files (default: the classifier's first
            convolution, else the first image's mode).
        split: Split of a given datamodule (default ``test``; files and tensors use ``all``).
        num_queries: Keep only the first this many images.
        target_file: Per-image targets for ``target="file"``.
        on_source_equals_target: ``error`` or ``skip``.
        chunk_size: Records optimised together.
        seed: Seed of the method's random choices.
        overwrite: Replace a different or finished run in ``output_dir``.
        num_grid_images: Records drawn in the PNG grids.
        **trainer: Options of :class:`lightning.Trainer` (``accelerator``, ``devices``,
            ``precision``, ...); ``logger`` and the progress bar are off unless given.

    Returns:
        :class:`lit_cf.explainers.ExplainRun` of ``output_dir``.
    """
    from lit_cf.explainers.engine import run_explain
    from lit_cf.explainers.rundir import ExplainRun
    from lit_cf.trainer import LitCFTrainer

    datamodule, default_split = _datamodule(images, classifier, image_size, channels)
    method = _method(method)
    saved: tuple[nn.Module, bool, list[tuple[nn.Parameter, bool]]] | None = None
    if isinstance(classifier, nn.Module):  # restored afterwards: the user's model is theirs
        saved = (classifier, classifier.training, [(p, p.requires_grad) for p in classifier.parameters()])
    options: dict[str, Any] = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(trainer)
    try:
        run_explain(
            LitCFTrainer(**options),
            method,
            datamodule,
            classifier=classifier,
            output_dir=str(output_dir),
            split=split or default_split,
            num_queries=num_queries,
            target=target,
            target_file=target_file,
            on_source_equals_target=on_source_equals_target,
            chunk_size=chunk_size,
            seed=seed,
            overwrite=overwrite,
            num_grid_images=num_grid_images,
        )
    finally:
        if saved is not None:
            module, training, flags = saved
            module.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)
    return ExplainRun(output_dir)


__all__ = ["explain"]
