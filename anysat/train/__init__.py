"""JEPA pretraining of AnySat: masking, predictor, EMA target, loss, training loop."""

from .jepa import JEPA, JEPAConfig, Predictor, ema_momentum
from .masks import MultiBlockMasks
from .monitors import collapse_monitors, effective_rank, embedding_std, rankme

__all__ = ["JEPA", "JEPAConfig", "MultiBlockMasks", "Predictor", "collapse_monitors", "effective_rank",
           "ema_momentum", "embedding_std", "rankme"]
