"""The error boundary of ``lit-cf``: which failures are the user's to fix, and their one line.

:func:`user_message` turns an expected failure (bad input, a missing or damaged file, a full
disk, permissions, data that does not fit) into the line ``lit-cf`` prints; anything else is a
bug and keeps its traceback. :class:`CreatedPaths` removes what a failed command created.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from lit_cf.errors import UserError

__all__ = ["CreatedPaths", "user_message"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _os_message(err: OSError) -> str:
    name = err.filename if err.filename is not None else None
    where = f" ({name})" if name else ""
    if err.errno is None:
        return " ".join(str(err).split()) or type(err).__name__
    if err.errno == errno.ENOSPC:
        return (
            f"no space left on device{where}: free some space and run the same command again "
            "(explain resumes where it stopped; nothing partial was kept under a final name)"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a location you can write to, or fix the permissions"
    if name is None:  # raised with a message of its own (e.g. a datamodule's "not found, to fix: ...")
        return " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, FileNotFoundError):
        return f"file or folder not found: {name}"
    if isinstance(err, NotADirectoryError):
        return f"{name} (or a folder above it) is a file, not a directory: choose another path"
    if isinstance(err, IsADirectoryError):
        return f"{name} is a directory, a file was expected"
    return f"{err.strerror or _first_line(err)}: {name}"


def user_message(err: BaseException) -> str | None:
    """The one-line message of an expected failure, or ``None`` for a bug (keep the traceback)."""
    if isinstance(err, UserError):
        return str(err)
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return f"out of memory ({_first_line(err)}): use a smaller batch_size / chunk_size or another device"
    except (ImportError, AttributeError):
        pass
    if isinstance(err, OSError):
        return _os_message(err)
    safetensor_errors: tuple[type[BaseException], ...] = ()
    try:
        from safetensors import SafetensorError

        safetensor_errors = (SafetensorError,)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    if isinstance(err, safetensor_errors):
        text = _first_line(err)
        if "No space left" in text or "os error 28" in text:
            return _os_message(OSError(errno.ENOSPC, "No space left on device"))
        return f"cannot read or write a safetensors file: {text}"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg}, line {err.lineno} column {err.colno}): fix the file you passed"
    misconfiguration: tuple[type[BaseException], ...] = ()
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        misconfiguration = (MisconfigurationException,)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, misconfiguration):
        return _first_line(err)
    return None


class CreatedPaths:
    """Folders a command may create; :meth:`remove_new` deletes those that did not exist before.

    Call :meth:`watch` with each path *before* the command can create it.
    """

    def __init__(self) -> None:
        self._new: list[Path] = []

    def watch(self, path: str | Path | None) -> None:
        if path is None or not str(path).strip():
            return
        path = Path(path).absolute()
        # the outermost missing folder: removing it removes everything the command put there
        top = None
        probe = path
        while not probe.exists() and probe != probe.parent:
            top = probe
            probe = probe.parent
        if top is not None and top not in self._new:
            self._new.append(top)

    def remove_new(self) -> None:
        for path in self._new:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                path.unlink(missing_ok=True)
