"""Explain run directories: a plan, atomic per-chunk shards, resume, merge and reading back.

Layout of ``output_dir``::

    run.json              plan + status ("running" until the merge, then "complete")
    config.yaml           the resolved CLI config (when run from the CLI)
    classifier.ts         TorchScript copy of an in-memory classifier (Python API), for evaluate
    records.jsonl         the planned (query, target) records with the original prediction
    shards/chunk-000012.safetensors   tensors of one chunk (counterfactual, query, extras)
    shards/chunk-000012.jsonl         manifest rows of that chunk; written last = chunk done
    manifest.jsonl        all rows in record order (written by the merge)
    grids/grid-000.png    query | counterfactual | signed difference

Every file is written to a temporary name in the same folder and renamed into place, so a
reader (or a resumed run) never sees a partial file under a final name. A chunk counts as done
only when its ``.jsonl`` exists; its tensors are written before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_cf.errors import UserError

PLAN_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename (never a partial file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


PLAN_KEYS = ("record", "index", "source_label", "orig_pred", "target", "seed")


def plan_fingerprint(plan: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Hash of what defines a run: settings and the discrete records (not model-computed floats,
    which may differ in the last bits across devices, ranks or library versions)."""
    return fingerprint({"plan": plan, "records": [[r[k] for k in PLAN_KEYS] for r in records]})


def check_writable(output_dir: Path) -> None:
    """Fail early, before any work, if ``output_dir`` cannot be created or written."""
    probe_parent = output_dir
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir():
        raise UserError(f"output directory {output_dir}: {probe_parent} exists and is not a directory")
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise UserError(f"output directory {output_dir} is not writable ({probe_parent} denies writing); choose another")
    lit_cf_files = {"run.json", "config.yaml", "records.jsonl", "manifest.jsonl", "shards", "grids", "classifier.ts"}
    if output_dir.exists() and any(p.name not in lit_cf_files and not p.name.endswith(".tmp") for p in output_dir.iterdir()):
        raise UserError(
            f"output directory {output_dir} is not empty and holds no lit-cf explain run: choose an empty or new folder"
        )


@dataclass
class RunDir:
    """One explain run directory (see the module docstring for the layout)."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def chunk_paths(self, chunk: int) -> tuple[Path, Path]:
        return self.shards / f"chunk-{chunk:06d}.safetensors", self.shards / f"chunk-{chunk:06d}.jsonl"

    def read_meta(self) -> dict[str, Any] | None:
        path = self.root / "run.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.root / "run.json", json.dumps(meta, indent=2, sort_keys=True))

    def is_complete(self) -> bool:
        meta = self.read_meta()
        return bool(meta and meta.get("status") == "complete" and (self.root / "manifest.jsonl").exists())

    def clear(self) -> None:
        """Remove the files lit-cf wrote here (for an explicit overwrite); ``run.json`` goes last."""
        for name in ("manifest.jsonl", "config.yaml", "records.jsonl", "classifier.ts"):
            (self.root / name).unlink(missing_ok=True)
        for folder in (self.shards, self.root / "grids"):
            shutil.rmtree(folder, ignore_errors=True)
        (self.root / "run.json").unlink(missing_ok=True)

    def state(self, plan: dict[str, Any], records: list[dict[str, Any]], overwrite: bool) -> str:
        """``"new"``, ``"resume"`` or ``"complete"`` for this plan, without changing anything.

        Raises if the folder holds a different run and ``overwrite`` is off.
        """
        meta = self.read_meta()
        if meta is None or overwrite:
            return "new"
        if meta.get("fingerprint") != plan_fingerprint(plan, records):
            raise UserError(
                f"{self.root} holds a different explain run (other method, classifier, data, targets or seed); "
                "use a new output_dir, or pass overwrite: true to replace it"
            )
        return "complete" if self.is_complete() else "resume"

    def prepare(self, plan: dict[str, Any], records: list[dict[str, Any]], overwrite: bool) -> str:
        """Create, clear (``overwrite``) or resume the run folder; returns :meth:`state`."""
        check_writable(self.root)
        state = self.state(plan, records, overwrite)
        if state == "complete":
            return state
        if state == "resume":
            self.cleanup_partial()
            if not (self.root / "records.jsonl").exists():
                atomic_write_text(self.root / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            return state
        if self.read_meta() is not None:  # overwrite requested
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        # run.json first: a run killed at any later point is recognised and resumed
        self.write_meta({"version": PLAN_VERSION, "status": "running", "fingerprint": plan_fingerprint(plan, records), **plan})
        self.shards.mkdir(exist_ok=True)
        atomic_write_text(self.root / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return "new"

    def cleanup_partial(self) -> None:
        """Drop temp files and tensor shards whose manifest rows were never committed."""
        self.shards.mkdir(exist_ok=True)
        for tmp in self.shards.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for tmp in [*self.root.glob(".*.tmp"), *self.root.glob("grids/.*.tmp")]:
            tmp.unlink(missing_ok=True)
        for tensors in self.shards.glob("chunk-*.safetensors"):
            if not tensors.with_suffix(".jsonl").exists():
                tensors.unlink(missing_ok=True)

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.shards.glob("chunk-*.jsonl")}

    def write_chunk(self, chunk: int, tensors: dict[str, Tensor], rows: list[dict[str, Any]]) -> None:
        tensor_path, rows_path = self.chunk_paths(chunk)
        atomic_save_tensors(tensor_path, tensors)
        for i, row in enumerate(rows):
            row["shard"] = tensor_path.name
            row["row"] = i
        atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))

    def merge(self, num_records: int) -> list[dict[str, Any]]:
        """Merge the chunk manifests into ``manifest.jsonl`` (record order, each record once)."""
        rows: dict[int, dict[str, Any]] = {}
        for path in sorted(self.shards.glob("chunk-*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                rows.setdefault(row["record"], row)
        missing = sorted(set(range(num_records)) - rows.keys())
        if missing:
            raise UserError(
                f"{len(missing)} records were not explained (e.g. {missing[:5]}): the run stopped early; "
                "re-run the same command to resume"
            )
        ordered = [rows[r] for r in range(num_records)]
        atomic_write_text(self.root / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
        return ordered

    def finish(self, extra: dict[str, Any]) -> None:
        meta = self.read_meta() or {}
        meta.update(extra)
        meta["status"] = "complete"
        self.write_meta(meta)


class ExplainRun:
    """Read access to a finished explain run: manifest rows and tensors in record order.

    Args:
        root: The run directory written by ``lit-cf explain``.
    """

    def __init__(self, root: str | Path) -> None:
        self.dir = RunDir(Path(root))
        if not self.dir.root.is_dir():
            raise UserError(f"explain run not found: {root}")
        if not self.dir.is_complete():
            raise UserError(f"{root} is not a complete explain run (no complete run.json + manifest.jsonl); finish or re-run it")
        self.meta: dict[str, Any] = self.dir.read_meta() or {}
        self.manifest: list[dict[str, Any]] = [
            json.loads(line) for line in (self.dir.root / "manifest.jsonl").read_text().splitlines()
        ]
        self._cache: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def _shards(self) -> Iterator[tuple[str, dict[str, Tensor]]]:
        for name in dict.fromkeys(r["shard"] for r in self.manifest):
            yield name, load_file(str(self.dir.shards / name))

    def tensor(self, key: str) -> Tensor:
        """Stack tensor ``key`` (e.g. ``counterfactual``, ``query``) over all records, in record order."""
        if key in self._cache:
            return self._cache[key]
        loaded = {name: shard for name, shard in self._shards()}
        missing = [n for n, s in loaded.items() if key not in s]
        if missing:
            raise UserError(f"{self.dir.root}: shards {missing[:3]} have no tensor {key!r}")
        self._cache[key] = torch.stack([loaded[r["shard"]][key][r["row"]] for r in self.manifest])
        return self._cache[key]
