"""The one atomic writer of lit-cf: a file appears complete under its final name, or not at all.

Every file lit-cf writes (run files, shards, grids, metrics, reports) goes through
:func:`atomic_write`: the content is written to a hidden temporary file in the same folder
(``.<name>.<random>.tmp``), flushed to disk, then renamed over the final name. A reader, or a
run resumed after a kill, never sees a partial file; a failed write (full disk, permissions)
leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

__all__ = ["atomic_save_tensors", "atomic_write", "atomic_write_bytes", "atomic_write_text", "is_temp_name"]

TMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> str:
    """Let ``write(tmp_path)`` produce the file, then move it to ``path`` atomically.

    Returns the sha256 of the bytes that were committed (read back from the temporary file
    before the rename, so it is the checksum of exactly what lies under ``path``).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            os.fsync(f.fileno())
        try:  # keep the mode of the file replaced; mkstemp creates 0600 files
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> str:
    """Write UTF-8 ``text`` to ``path`` atomically; returns its sha256."""
    return atomic_write_bytes(path, text.encode())


def atomic_save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> str:
    """Write ``tensors`` as a safetensors file atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp)))
