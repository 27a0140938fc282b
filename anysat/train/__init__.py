"""JEPA pretraining of AnySat: masking, predictor, EMA target, loss, training loop."""

from .jepa import JEPA, JEPAConfig, Predictor, ema_momentum, rankme

__all__ = ["JEPA", "JEPAConfig", "Predictor", "ema_momentum", "rankme"]
