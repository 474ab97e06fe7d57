"""Shared by the reproduction scripts: the subprocess environment, the thread count, the output folder."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

# the environment every `python -m lit_cf` subprocess of a script runs with
ENV = dict(os.environ)


def set_threads(n: int | None) -> None:
    """Intra-op threads of every subprocess and of this process (on a busy machine 1 is often fastest)."""
    if n is None:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        ENV[var] = str(n)
    import torch

    torch.set_num_threads(n)


def prepare_out(out: Path, overwrite: bool, owned: Iterable[str], prog: str) -> None:
    """Make ``out`` ready for a script named ``prog``: new or empty, or, with ``overwrite``,
    emptied of the entries ``owned`` that the script writes there (nothing else is touched)."""
    if out.exists() and not out.is_dir():
        sys.exit(f"{prog}: --out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            sys.exit(f"{prog}: --out {out} is not empty; choose a new folder or pass --overwrite")
        for name in owned:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
