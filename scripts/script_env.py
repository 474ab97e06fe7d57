"""Environment shared by the reproduction scripts: the subprocess environment and thread count."""

from __future__ import annotations

import os

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
