"""anysat: a STAC-native pipeline around an AnySat-style multi-sensor foundation model."""

__version__ = "0.1.0"

from .model import AnySat, load_model  # noqa: E402

__all__ = ["AnySat", "__version__", "load_model"]
