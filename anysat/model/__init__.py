"""The AnySat model: scale-adaptive tokenizer, encoder, checkpoints."""

from .anysat import AnySat
from .checkpoint import build_model, load_model, save_checkpoint
from .config import SIZES, AnySatConfig, ModalityConfig

__all__ = ["SIZES", "AnySat", "AnySatConfig", "ModalityConfig", "build_model", "load_model",
           "save_checkpoint"]
