"""Per-pixel projection of one sensor and attention pooling over its dates."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModalityConfig
from .layers import sincos_1d

DAYS_PER_YEAR = 365.2425


def day_of_year(dates_days: torch.Tensor) -> torch.Tensor:
    """Days since 1970-01-01 -> fractional day of year (off by under a day: fine for encoding)."""
    return torch.remainder(dates_days.to(torch.float64), DAYS_PER_YEAR).to(torch.float32)


class PixelTemporalEncoder(nn.Module):
    """[B, T, C, H, W] + dates [B, T] + valid [B, T, H, W] -> pixel tokens [B, H, W, D].

    Each pixel-date is normalised and projected by an MLP, given its day-of-year code, and the
    dates are pooled by multi-head attention from a learned query. Invalid pixel-dates get no
    weight; a pixel with no valid date is reported invalid.
    """

    def __init__(self, modality: ModalityConfig, dim: int, heads: int):
        super().__init__()
        channels = len(modality.bands)
        self.heads = heads
        self.register_buffer("mean", torch.tensor(modality.mean).view(1, 1, -1), persistent=False)
        self.register_buffer("std", torch.tensor(modality.std).view(1, 1, -1), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(channels, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim))
        self.date_proj = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(heads, dim // heads) * 0.02)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor, dates_days: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c, h, w = x.shape
        pixels = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)          # [N, T, C]
        keep = valid.permute(0, 2, 3, 1).reshape(b * h * w, t)              # [N, T]
        pixels = torch.where(keep[..., None], (pixels - self.mean) / self.std, 0.0)
        date_code = self.date_proj(sincos_1d(day_of_year(dates_days), self.mlp[-1].out_features,
                                             DAYS_PER_YEAR))                 # [B, T, D]
        tokens = self.mlp(pixels).view(b, h * w, t, -1) + date_code[:, None]
        tokens = tokens.view(b * h * w, t, -1)
        n, _, d = tokens.shape
        keys = self.key(tokens).view(n, t, self.heads, d // self.heads)
        logits = (keys * self.query).sum(-1) / math.sqrt(d // self.heads)  # [N, T, heads]
        any_valid = keep.any(dim=1)
        logits = logits.masked_fill(~keep[..., None], float("-inf"))
        logits = torch.where(any_valid[:, None, None], logits, 0.0)         # no NaN for empty pixels
        weights = logits.softmax(dim=1)
        values = self.value(tokens).view(n, t, self.heads, d // self.heads)
        pooled = (weights[..., None] * values).sum(1).reshape(n, d)
        pooled = self.out(pooled) * any_valid[:, None]
        return pooled.view(b, h, w, d), any_valid.view(b, h, w)
