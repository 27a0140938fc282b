"""Lazy multi-sensor datacubes on a common UTM grid."""

from .load import load_cube, read_cube

__all__ = ["load_cube", "read_cube"]
