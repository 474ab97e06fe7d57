"""Explain run directories: a plan, atomic per-chunk shards with checksums, resume, merge, reading.

Layout of ``output_dir``::

    run.json              plan + status ("running" until the merge, then "complete") + checksums
    config.yaml           the resolved CLI config (when run from the CLI)
    classifier.ts         TorchScript copy of an in-memory classifier (Python API), for evaluate
    records.jsonl         the planned (query, target) records with the original prediction
    shards/chunk-000012.safetensors   tensors of one chunk (counterfactual, query, extras)
    shards/chunk-000012.jsonl         manifest rows of that chunk + a commit line; written last
    manifest.jsonl        all rows in record order (written by the merge)
    grids/grid-000.png    query | counterfactual | signed difference

Every file is written through :func:`lit_cf.runs.atomic.atomic_write`, so no partial file is
ever seen under a final name. A chunk counts as done only when its ``.jsonl`` exists; its
tensors are written before it, and its last line (the *commit*) records the sha256 of the
tensors and of the rows above it. ``run.json`` carries a checksum of its own content and, once
complete, the sha256 of ``manifest.jsonl`` and of every shard. Readers verify all of it: a
flipped byte, a truncated or deleted file or a manifest cut short is refused with an error that
names the file, never scored; a resumed run recomputes a damaged chunk.

A folder is only written into when it is new, empty, or holds a lit-cf run (recognised by a
valid ``run.json``, not by file names).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_cf.errors import UserError
from lit_cf.runs.atomic import atomic_save_tensors, atomic_write_text, is_temp_name
from lit_cf.runs.manifest import PLAN_KEYS, ManifestRow, RunIntegrityError, parse_rows

__all__ = [
    "PLAN_VERSION",
    "ExplainRun",
    "RunDir",
    "check_output_dir",
    "check_writable",
    "fingerprint",
    "plan_fingerprint",
    "read_run_file",
]

PLAN_VERSION = 2  # 2: checksums of run.json, chunks, shards and manifest
RUN_FILE = "run.json"


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def plan_fingerprint(plan: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Hash of what defines a run: settings and the discrete records (not model-computed floats,
    which may differ in the last bits across devices, ranks or library versions)."""
    return fingerprint({"plan": plan, "records": _plans(records)})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_checksum(meta: dict[str, Any]) -> str:
    return fingerprint({k: v for k, v in meta.items() if k != "checksum"})


def _redo_hint(root: Path) -> str:
    return f"re-run the `lit-cf explain` command that made {root} (it recomputes damaged parts)"


def read_run_file(root: str | Path) -> dict[str, Any] | None:
    """The verified ``run.json`` of ``root``; ``None`` when there is none.

    Raises:
        RunIntegrityError: ``run.json`` exists but is not a lit-cf run file of this version
            (damaged, truncated, edited or written by another lit-cf version).
    """
    root = Path(root)
    path = root / RUN_FILE
    if not path.exists():
        return None
    advice = f"lit-cf only writes into a folder it recognises as its own run: delete {root} or choose another folder"
    try:
        meta = json.loads(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunIntegrityError(f"{path} is damaged (not readable JSON: {err}); {advice}") from err
    if not isinstance(meta, dict) or "checksum" not in meta:
        raise RunIntegrityError(f"{path} is not a run file of this lit-cf version (no checksum); {advice}")
    if meta["checksum"] != _meta_checksum(meta):
        raise RunIntegrityError(f"{path} is damaged (its checksum does not match its content); {advice}")
    if meta.get("version") != PLAN_VERSION:
        raise RunIntegrityError(f"{path} has run format {meta.get('version')}, this lit-cf reads {PLAN_VERSION}; {advice}")
    return meta


def check_output_dir(output_dir: str | Path) -> None:
    """Fail before any work unless ``output_dir`` can become (or already is) a run directory.

    Accepted: a new folder (its nearest existing parent writable), an empty one, or one holding
    a lit-cf run (a valid ``run.json``). Anything else is refused, whatever ``overwrite`` says:
    files lit-cf did not write are never replaced.
    """
    if not str(output_dir).strip():
        raise UserError("output_dir is empty: name the folder to write the run into")
    output_dir = Path(output_dir)
    probe = output_dir
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output directory {output_dir}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {output_dir} is not writable ({probe} denies writing); choose another")
    if probe != output_dir:
        return  # a new folder
    if not any(not is_temp_name(p.name) for p in output_dir.iterdir()):
        return  # empty (or only temporary files of a write that was interrupted)
    if read_run_file(output_dir) is None:
        raise UserError(
            f"output directory {output_dir} is not empty and holds no lit-cf explain run (no run.json): "
            "choose an empty or new folder (nothing was changed)"
        )


check_writable = check_output_dir  # the name earlier code used


@dataclass
class RunDir:
    """One explain run directory (see the module docstring for the layout)."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def chunk_paths(self, chunk: int) -> tuple[Path, Path]:
        return self.shards / f"chunk-{chunk:06d}.safetensors", self.shards / f"chunk-{chunk:06d}.jsonl"

    # ----------------------------------------------------------------- run.json
    def read_meta(self) -> dict[str, Any] | None:
        return read_run_file(self.root)

    def write_meta(self, meta: dict[str, Any]) -> None:
        meta = {**meta, "version": PLAN_VERSION}
        meta["checksum"] = _meta_checksum(meta)
        atomic_write_text(self.root / RUN_FILE, json.dumps(meta, indent=2, sort_keys=True))

    def is_complete(self) -> bool:
        meta = self.read_meta()
        return bool(meta and meta.get("status") == "complete" and (self.root / "manifest.jsonl").exists())

    # ----------------------------------------------------------------- writing
    def clear(self) -> None:
        """Remove the files lit-cf wrote here (for an explicit overwrite); ``run.json`` goes last."""
        for name in ("manifest.jsonl", "config.yaml", "records.jsonl", "classifier.ts"):
            (self.root / name).unlink(missing_ok=True)
        for folder in (self.shards, self.root / "grids"):
            shutil.rmtree(folder, ignore_errors=True)
        (self.root / RUN_FILE).unlink(missing_ok=True)

    def state(self, plan: dict[str, Any], records: list[dict[str, Any]], overwrite: bool) -> str:
        """``"new"``, ``"resume"`` or ``"complete"`` for this plan, without changing anything.

        A complete run whose files fail verification counts as ``"resume"``: its damaged parts
        are recomputed. Raises if the folder holds a different run and ``overwrite`` is off, or
        anything but a lit-cf run.
        """
        check_output_dir(self.root)
        meta = self.read_meta()
        if meta is None or overwrite:
            return "new"
        if meta.get("fingerprint") != plan_fingerprint(plan, records):
            raise UserError(
                f"{self.root} holds a different explain run (other method, classifier, data, targets or seed); "
                "use a new output_dir, or pass overwrite: true to replace it"
            )
        if not self.is_complete():
            return "resume"
        try:
            ExplainRun(self.root).verify()
        except RunIntegrityError as err:
            print(f"lit-cf explain: {err}; recomputing the damaged parts")
            return "resume"
        return "complete"

    def prepare(self, plan: dict[str, Any], records: list[dict[str, Any]], overwrite: bool) -> str:
        """Create, clear (``overwrite``) or resume the run folder; returns :meth:`state`."""
        state = self.state(plan, records, overwrite)
        if state == "complete":
            return state
        records_text = "".join(json.dumps(r) + "\n" for r in records)
        if state == "resume":
            meta = self.read_meta() or {}
            if meta.get("status") == "complete":  # damaged complete run: back to running first
                self.write_meta({**meta, "status": "running"})
            (self.root / "manifest.jsonl").unlink(missing_ok=True)
            self.cleanup_partial(records, int(plan["chunk_size"]))
            path = self.root / "records.jsonl"
            if not path.is_file() or path.read_bytes() != records_text.encode():
                atomic_write_text(path, records_text)
            return state
        if self.read_meta() is not None:  # overwrite requested
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        # run.json first: a run killed at any later point is recognised and resumed
        self.write_meta({"status": "running", "fingerprint": plan_fingerprint(plan, records), **plan})
        self.shards.mkdir(exist_ok=True)
        atomic_write_text(self.root / "records.jsonl", records_text)
        return "new"

    def cleanup_partial(self, records: list[dict[str, Any]] | None = None, chunk_size: int | None = None) -> list[int]:
        """Drop temp files, uncommitted shards and committed chunks that fail verification.

        Returns the chunks that were dropped as damaged (a resumed run recomputes them).
        """
        self.shards.mkdir(exist_ok=True)
        for folder in (self.root, self.shards, self.root / "grids"):
            if folder.is_dir():
                for p in folder.iterdir():
                    if is_temp_name(p.name):
                        p.unlink(missing_ok=True)
        for tensors in self.shards.glob("chunk-*.safetensors"):
            if not tensors.with_suffix(".jsonl").exists():
                tensors.unlink(missing_ok=True)
        damaged: list[int] = []
        for rows_path in sorted(self.shards.glob("chunk-*.jsonl")):
            chunk = _chunk_number(rows_path)
            expected = None
            if records is not None and chunk_size is not None and chunk is not None:
                expected = records[chunk * chunk_size : (chunk + 1) * chunk_size]
            try:
                if chunk is None:
                    raise RunIntegrityError(f"{rows_path} is not a chunk file lit-cf writes")
                self.read_chunk(chunk, expected)
            except RunIntegrityError as err:
                print(f"lit-cf explain: {err}; recomputing this chunk")
                if chunk is not None:  # a stray chunk-<not a number>.jsonl is dropped, but is no chunk
                    damaged.append(chunk)
                rows_path.unlink(missing_ok=True)
                rows_path.with_suffix(".safetensors").unlink(missing_ok=True)
        return damaged

    def done_chunks(self) -> set[int]:
        return {c for p in self.shards.glob("chunk-*.jsonl") if (c := _chunk_number(p)) is not None}

    def write_chunk(self, chunk: int, tensors: dict[str, Tensor], rows: list[dict[str, Any]]) -> None:
        """Commit one chunk: its tensors, then its rows followed by the commit line (checksums)."""
        tensor_path, rows_path = self.chunk_paths(chunk)
        shard_sha = atomic_save_tensors(tensor_path, tensors)
        for i, row in enumerate(rows):
            row["shard"] = tensor_path.name
            row["row"] = i
        body = "".join(json.dumps(r) + "\n" for r in rows)
        commit = {
            "chunk": chunk,
            "num_rows": len(rows),
            "shard": tensor_path.name,
            "shard_sha256": shard_sha,
            "rows_sha256": _sha256(body.encode()),
        }
        atomic_write_text(rows_path, body + json.dumps({"commit": commit}) + "\n")

    def read_chunk(self, chunk: int, expected: list[dict[str, Any]] | None = None) -> tuple[list[ManifestRow], str]:
        """Rows and shard checksum of a committed chunk, verified against its commit line.

        With ``expected`` (the planned records of the chunk) the rows must be exactly those.
        """
        tensor_path, rows_path = self.chunk_paths(chunk)
        hint = _redo_hint(self.root)
        try:
            data = rows_path.read_bytes()
        except OSError as err:
            raise RunIntegrityError(f"{rows_path} cannot be read ({err.strerror}); {hint}") from err
        body, _, last = data.rstrip(b"\n").rpartition(b"\n")
        body = body + b"\n" if body else b""
        try:
            commit = json.loads(last.decode())["commit"]
            ok = (
                isinstance(commit, dict)
                and commit.get("chunk") == chunk
                and commit.get("rows_sha256") == _sha256(body)
                and commit.get("shard") == tensor_path.name
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise RunIntegrityError(f"{rows_path} is damaged (its commit line or checksum does not match); {hint}")
        rows = parse_rows(body.decode(), rows_path)
        if len(rows) != commit.get("num_rows") or any(
            r["row"] != i or r["shard"] != tensor_path.name for i, r in enumerate(rows)
        ):
            raise RunIntegrityError(f"{rows_path} is damaged (rows do not match its commit line); {hint}")
        if expected is not None and _plans(rows) != _plans(expected):
            raise RunIntegrityError(f"{rows_path} holds other records than planned for chunk {chunk}; {hint}")
        if not tensor_path.is_file():
            raise RunIntegrityError(f"{tensor_path} is missing; {hint}")
        if _file_sha256(tensor_path) != commit["shard_sha256"]:
            raise RunIntegrityError(f"{tensor_path} is damaged (checksum differs from the one recorded at commit); {hint}")
        return rows, commit["shard_sha256"]

    def merge(self, num_records: int) -> tuple[list[ManifestRow], dict[str, Any]]:
        """Merge the chunk manifests into ``manifest.jsonl`` (record order, each record once).

        Returns the rows and the integrity entries for ``run.json`` (``manifest_sha256``,
        ``shards``: sha256 per shard file), which :meth:`finish` records.
        """
        rows: dict[int, ManifestRow] = {}
        shards: dict[str, str] = {}
        for path in sorted(self.shards.glob("chunk-*.jsonl")):
            chunk = _chunk_number(path)
            if chunk is None:
                continue
            chunk_rows, sha = self.read_chunk(chunk)
            shards[self.chunk_paths(chunk)[0].name] = sha
            for row in chunk_rows:
                rows.setdefault(row["record"], row)
        missing = sorted(set(range(num_records)) - rows.keys())
        if missing:
            raise UserError(
                f"{len(missing)} records were not explained (e.g. {missing[:5]}): the run stopped early; "
                "re-run the same command to resume"
            )
        ordered = [rows[r] for r in range(num_records)]
        used = {r["shard"] for r in ordered}
        manifest_sha = atomic_write_text(self.root / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
        return ordered, {"manifest_sha256": manifest_sha, "shards": {k: v for k, v in shards.items() if k in used}}

    def finish(self, extra: dict[str, Any]) -> None:
        meta = self.read_meta() or {}
        meta.update(extra)
        meta["status"] = "complete"
        self.write_meta(meta)

    # ----------------------------------------------------------------- reading
    def load_shard(self, name: str, sha256: str | None = None) -> dict[str, Tensor]:
        """Tensors of ``shards/<name>``, verified against ``sha256`` when given (one read)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        path = self.shards / name
        hint = _redo_hint(self.root)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise RunIntegrityError(f"{path} is missing; {hint}") from err
        except OSError as err:
            raise RunIntegrityError(f"{path} cannot be read ({err.strerror}); {hint}") from err
        if sha256 is not None and _sha256(data) != sha256:
            raise RunIntegrityError(f"{path} is damaged (checksum differs from the one recorded at commit); {hint}")
        try:
            return load_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise RunIntegrityError(f"{path} is damaged (not a readable safetensors file); {hint}") from err


def _plans(rows: Sequence[Mapping[str, object]]) -> list[list[object]]:
    """The plan fields (:data:`PLAN_KEYS`) of each row, in order."""
    return [[r[k] for k in PLAN_KEYS] for r in rows]


def _chunk_number(path: Path) -> int | None:
    stem = path.stem.split("-", 1)
    return int(stem[1]) if len(stem) == 2 and stem[0] == "chunk" and stem[1].isdigit() else None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ExplainRun:
    """Read access to a finished, verified explain run: manifest rows and tensors in record order.

    Opening checks ``run.json`` (its own checksum), the manifest (record count against
    ``run.json``, sha256) and each row; every shard is checked against its sha256 when read.
    A damaged run raises :class:`~lit_cf.runs.manifest.RunIntegrityError` naming the file.

    Args:
        root: The run directory written by ``lit-cf explain``.
    """

    def __init__(self, root: str | Path) -> None:
        self.dir = RunDir(Path(root))
        root = self.dir.root
        if not root.is_dir():
            raise UserError(f"explain run not found: {root}")
        meta = self.dir.read_meta()
        if meta is None:
            raise UserError(f"{root} holds no explain run (no run.json): pass a folder written by `lit-cf explain`")
        if meta.get("status") != "complete":
            raise UserError(f"{root} is not a complete explain run (status {meta.get('status')!r}); finish or re-run it")
        self.meta: dict[str, Any] = meta
        path = root / "manifest.jsonl"
        hint = _redo_hint(root)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise RunIntegrityError(f"{path} is missing or unreadable; {hint}") from err
        lines = data.decode(errors="replace").splitlines()
        expected = meta.get("num_records")
        if len(lines) != expected:
            raise RunIntegrityError(f"{path} holds {len(lines)} records, run.json says {expected}: it was cut or altered; {hint}")
        if _sha256(data) != meta.get("manifest_sha256"):
            raise RunIntegrityError(f"{path} is damaged (checksum differs from the one in run.json); {hint}")
        self.manifest: list[ManifestRow] = parse_rows(data.decode(), path)
        self._shard_sha: dict[str, str] = dict(meta.get("shards") or {})
        for i, r in enumerate(self.manifest):
            if r["record"] != i or r["shard"] not in self._shard_sha:
                raise RunIntegrityError(f"{path} line {i + 1} does not match run.json (record or shard); {hint}")
        self._cache: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def _load(self, name: str) -> dict[str, Tensor]:
        shard = self.dir.load_shard(name, self._shard_sha[name])
        rows = [r["row"] for r in self.manifest if r["shard"] == name]
        sizes = {len(t) for t in shard.values() if t.dim() > 0}
        if not shard or max(rows) >= min(sizes, default=0):
            raise RunIntegrityError(
                f"{self.dir.shards / name} holds fewer rows than the manifest names; {_redo_hint(self.dir.root)}"
            )
        return shard

    def verify(self) -> None:
        """Read every shard and check its checksum (opening the run checked the rest)."""
        for name in dict.fromkeys(r["shard"] for r in self.manifest):
            self._load(name)

    def tensor_names(self) -> list[str]:
        """Names of the tensors the run saved (read from its first shard)."""
        return list(self._load(self.manifest[0]["shard"])) if self.manifest else []

    def has_tensor(self, key: str) -> bool:
        return key in self._cache or key in self.tensor_names()

    def tensor(self, key: str) -> Tensor:
        """Stack tensor ``key`` (e.g. ``counterfactual``, ``query``) over all records, in record order."""
        if key in self._cache:
            return self._cache[key]
        loaded = {name: self._load(name) for name in dict.fromkeys(r["shard"] for r in self.manifest)}
        missing = [n for n, s in loaded.items() if key not in s]
        if missing:
            raise UserError(f"{self.dir.root}: shards {missing[:3]} have no tensor {key!r}")
        self._cache[key] = torch.stack([loaded[r["shard"]][key][r["row"]] for r in self.manifest])
        return self._cache[key]
