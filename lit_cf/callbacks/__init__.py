"""Callbacks: image logging and explain-time writers."""

from lit_cf.callbacks.sample_grid import SampleGridLogger

__all__ = ["SampleGridLogger"]
