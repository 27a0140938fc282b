"""Lazy multi-sensor datacubes on a common UTM grid."""

from .composite import bin_time
from .load import BACKENDS, load_cube, read_cube

__all__ = ["BACKENDS", "bin_time", "load_cube", "read_cube"]
