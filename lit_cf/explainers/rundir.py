"""Moved to :mod:`lit_cf.runs` (the run format is its own package); kept as a re-export."""

from lit_cf.runs import *  # noqa: F401,F403
from lit_cf.runs import __all__  # noqa: F401
from lit_cf.runs.rundir import _chunk_number  # noqa: F401
