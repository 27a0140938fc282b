"""Shared transformer pieces: fused attention blocks and sine-cosine encodings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D]; keep [B, L] bool: keys that may be attended to (None = all)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


def sincos_1d(values: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """[...] -> [..., dim] sine-cosine encoding of scalar values with periods up to max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = values.to(torch.float32)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d_m(x_m: torch.Tensor, y_m: torch.Tensor, dim: int, unit_m: float = 10.0) -> torch.Tensor:
    """2-D sine-cosine encoding of positions in metres ([...] -> [..., dim]).

    Positions stay in metres, so a place gets the same code whatever the pixel size.
    """
    return torch.cat([sincos_1d(x_m / unit_m, dim // 2, 10000.0),
                      sincos_1d(y_m / unit_m, dim // 2, 10000.0)], dim=-1)
