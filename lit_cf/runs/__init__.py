"""The explain run format: run directory, :class:`ExplainRun`, atomic writes and integrity.

This package is the contract between ``lit-cf explain`` (which writes runs) and everything
that reads them (``evaluate``, attribution, the counterfactual datamodule). It depends on no
other lit-cf package but :mod:`lit_cf.errors`.
"""

from lit_cf.runs.atomic import atomic_save_tensors, atomic_write, atomic_write_bytes, atomic_write_text, is_temp_name
from lit_cf.runs.manifest import PLAN_KEYS, ManifestRow, RunIntegrityError, parse_row, parse_rows
from lit_cf.runs.rundir import (
    PLAN_VERSION,
    ExplainRun,
    RunDir,
    check_output_dir,
    check_writable,
    fingerprint,
    plan_fingerprint,
    read_run_file,
)

__all__ = [
    "PLAN_KEYS",
    "PLAN_VERSION",
    "ExplainRun",
    "ManifestRow",
    "RunDir",
    "RunIntegrityError",
    "atomic_save_tensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_writable",
    "fingerprint",
    "is_temp_name",
    "parse_row",
    "parse_rows",
    "plan_fingerprint",
    "read_run_file",
]
