"""Input checks of ``lit-cf evaluate``: everything is refused before any number or file exists.

:class:`EvaluateRequest` is what the user asked for; :func:`check_request` checks its values
and the output folder, :func:`check_run_against_data` that a run was explained on the given
data (dataset, shapes, and the stored queries themselves).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_cf.errors import UserError
from lit_cf.runs import ExplainRun

__all__ = ["ClassifierSource", "EvaluateRequest", "check_request", "check_run_against_data", "is_evaluation_dir"]

#: a classifier as ``--classifier`` takes it: a path (``.ckpt``, TorchScript) or a module mapping
ClassifierSource = Mapping[str, Any] | str


@dataclass(frozen=True)
class EvaluateRequest:
    """What ``lit-cf evaluate`` was asked to do (see :meth:`lit_cf.trainer.LitCFTrainer.evaluate`)."""

    runs: list[str]
    output_dir: str
    oracles: Mapping[str, ClassifierSource] = field(default_factory=dict)
    feature_network: ClassifierSource | None = None
    duq: str | None = None
    descriptors: str | None = None
    classifier: ClassifierSource | None = None
    names: list[str] | None = None
    batch_size: int = 256
    cout_steps: int = 50
    num_grid_images: int = 8
    overwrite: bool = False
    config_yaml: str | None = None
    reference: str | None = "test"
    reference_seed: int = 0

    @property
    def run_names(self) -> list[str]:
        """Row names: the given ``names`` or the run folder names."""
        return list(self.names) if self.names else [Path(r).name for r in self.runs]

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


def check_request(request: EvaluateRequest) -> None:
    """Refuse bad values and an output folder evaluate may not write (one UserError line each)."""
    if not request.runs:
        raise UserError("evaluate needs at least one explain run directory (--runs)")
    if request.names is not None and len(request.names) != len(request.runs):
        raise UserError(f"names has {len(request.names)} entries for {len(request.runs)} runs")
    run_names = request.run_names
    if len(set(run_names)) != len(run_names):
        raise UserError(f"run names must be unique, got {run_names}: pass names: [...] to tell the runs apart")
    for key, value, low in (
        ("batch_size", request.batch_size, 1),
        ("cout_steps", request.cout_steps, 1),
        ("num_grid_images", request.num_grid_images, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{key} must be an integer >= {low}, got {value}")
    if not str(request.output_dir).strip():
        raise UserError("output_dir is empty: name the folder to write the evaluation into")
    _check_output_dir(request.out, request.overwrite)


def _check_output_dir(out: Path, overwrite: bool) -> None:
    probe = out
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output directory {out}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable")
    if probe == out and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty: choose a new output_dir or pass overwrite: true")
        if not is_evaluation_dir(out):  # overwrite replaces an evaluation, never other files
            raise UserError(
                f"{out} is not empty and holds no lit-cf evaluation (no valid metrics.json): "
                "choose an empty or new folder (nothing was changed)"
            )


def is_evaluation_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``lit-cf evaluate`` output (its ``metrics.json``)."""
    try:
        payload = json.loads((path / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("meta"), dict) and "lit-cf" in payload["meta"]


def check_run_against_data(run: ExplainRun, datamodule: Any, name: str) -> None:
    """Refuse a run made on other data: dataset facts, image shapes, and its first 16 stored queries."""
    data_meta = run.meta.get("data") or {}
    want = datamodule.describe() if hasattr(datamodule, "describe") else {}
    for key in ("datamodule", "num_classes", "image_shape"):
        if key in data_meta and key in want and data_meta[key] != want[key]:
            raise UserError(
                f"run {name} was made on other data ({key}: {data_meta[key]} vs {want[key]}): "
                "evaluate it with the datamodule it was explained on"
            )
    query, cf = run.tensor("query"), run.tensor("counterfactual")
    if query.shape != cf.shape:
        raise UserError(f"run {name}: counterfactuals {tuple(cf.shape)} and queries {tuple(query.shape)} differ in shape")
    if want.get("image_shape") and list(query.shape[1:]) != list(want["image_shape"]):
        raise UserError(f"run {name}: images of shape {tuple(query.shape[1:])}, the data has {tuple(want['image_shape'])}")
    data = datamodule.dataset(run.meta.get("split", "test"))
    for row_in_run, r in enumerate(run.manifest[:16]):  # the stored queries must be the data's images
        if r["index"] >= len(data) or not torch.allclose(data[r["index"]]["image"], query[row_in_run], atol=1e-4):
            raise UserError(
                f"run {name}: its query for dataset index {r['index']} is not the image the given data holds "
                "there (different dataset, split, seed or corruption)"
            )
