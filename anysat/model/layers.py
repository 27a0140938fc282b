"""Shared transformer pieces: fused attention blocks, the modality-fusion block, encodings."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


_SYNC_FREE = False


def branch_on_values(t: torch.Tensor) -> bool:
    """Whether a fast path may branch on t's values (`if mask.all()`, `nonzero`). On the CPU
    that is free and skips work; on an accelerator each one makes the host wait for the
    device, so the next kernels are not queued while it computes: there the code takes the
    path that needs no value (masks always applied) instead. Same results either way."""
    return t.device.type == "cpu" and not _SYNC_FREE


@contextlib.contextmanager
def sync_free() -> Iterator[None]:
    """Take the accelerator's paths on the CPU too (tests, profiling)."""
    global _SYNC_FREE
    before, _SYNC_FREE = _SYNC_FREE, True
    try:
        yield
    finally:
        _SYNC_FREE = before


def mlp(sizes: list[int], norm: bool = False, last_activation: bool = True) -> nn.Sequential:
    """Linear (+ LayerNorm) + ReLU per layer, as in the official AnySat projectors."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.extend([nn.LayerNorm(b)] if norm else [])
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _key_mask(keep: torch.Tensor | None) -> torch.Tensor | None:
    return None if keep is None else keep[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                queries: int | None = None) -> torch.Tensor:
        """x [B, L, D]; keep [B, L] bool: keys that may be attended to (None = all).
        `queries`: only the first n rows are computed (the others are not needed)."""
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads
        if queries is None:
            q, k, v = self.qkv(x).view(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
        else:  # project q for the rows wanted only; k, v for all
            (w_q, w_kv), (b_q, b_kv) = self.qkv.weight.split([d, 2 * d]), self.qkv.bias.split([d, 2 * d])
            q = F.linear(x[:, :queries], w_q, b_q).view(b, queries, h, dh).transpose(1, 2)
            k, v = F.linear(x, w_kv, b_kv).view(b, n, 2, h, dh).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(keep))
        return self.proj(out.transpose(1, 2).reshape(b, q.shape[2], d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                queries: int | None = None) -> torch.Tensor:
        if queries is not None:
            x = x[:, :queries] + self.attn(self.norm1(x), keep, queries)
        else:
            x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class FusionBlock(nn.Module):
    """Last encoder block (the official CrossBlockMulti): per patch, a learned query at the
    patch's position cross-attends over that patch's modality tokens, so the sensors become one
    token per patch; the tile token's query attends over everything.

    Unlike the official block, a patch's query sees the tile token only when none of its
    sensors has data: with the tile token among every patch's keys, JEPA targets drifted to
    the tile's summary (within-chip share of the patch variance 26 % -> 12 % in 300 steps, vs
    30 % -> 34 % without it), a shortcut the predictor reads off the context."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, tile: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor,
                position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tile [B, D]; tokens [B, M, N, D] (M sensors, N patches); keep [B, M, N];
        position [B, N, D] -> tile [B, D], patches [B, N, D]."""
        b, m, n, d = tokens.shape
        h, dh = self.heads, d // self.heads
        tile, tokens = self.norm1(tile), self.norm1(tokens)
        k_t, v_t = self.kv(tile).view(b, 1, 2, h, dh).unbind(2)                  # [B, 1, h, dh]
        k, v = self.kv(tokens).view(b, m, n, 2, h, dh).unbind(3)                 # [B, M, N, h, dh]
        # per patch: keys = the M sensor tokens of that patch (the tile token if none is valid)
        k_p = torch.cat([k_t[:, None].expand(b, n, 1, h, dh), k.transpose(1, 2)], 2)
        v_p = torch.cat([v_t[:, None].expand(b, n, 1, h, dh), v.transpose(1, 2)], 2)
        keep_p = torch.cat([~keep.any(1)[..., None], keep.transpose(1, 2)], 2)   # [B, N, 1+M]
        q_p = self.q(self.query + position).view(b * n, 1, h, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q_p, k_p.reshape(b * n, m + 1, h, dh).transpose(1, 2),
            v_p.reshape(b * n, m + 1, h, dh).transpose(1, 2),
            attn_mask=_key_mask(keep_p.reshape(b * n, m + 1)))
        patches = self.proj(out.reshape(b, n, d))
        # the tile token: keys = tile token + every valid sensor token
        k_all = torch.cat([k_t, k.reshape(b, m * n, h, dh)], 1).transpose(1, 2)
        v_all = torch.cat([v_t, v.reshape(b, m * n, h, dh)], 1).transpose(1, 2)
        keep_all = torch.cat([keep.new_ones(b, 1), keep.reshape(b, m * n)], 1)
        q_t = self.q(self.query).expand(b, 1, d).view(b, 1, h, dh).transpose(1, 2)
        tile_out = self.proj(F.scaled_dot_product_attention(
            q_t, k_all, v_all, attn_mask=_key_mask(keep_all)).reshape(b, d))
        # no residual on the attention (as in the official block): the query is not a token
        patches = patches + self.mlp(self.norm2(patches))
        tile_out = tile_out + self.mlp(self.norm2(tile_out))
        return tile_out, patches


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


def patch_centres_m(grid: int, patch_size_m: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of the centres of a grid x grid layout of patches, row-major, in metres."""
    centres = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) * patch_size_m
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    return cx.reshape(-1), cy.reshape(-1)


CACHED_CODE_ELEMENTS = 2**20  # codes kept up to 4 MB each, CACHED_CODES of them in all
CACHED_CODES = 32


def patch_codes_m(grid: int, patch_size_m: float, dim: int, unit_m: float,
                  device: torch.device) -> torch.Tensor:
    """[grid * grid, dim] `sincos_2d_m` of the patch centres (`patch_centres_m`), kept."""
    return kept_codes(patch_centres_m, (grid, patch_size_m), grid * grid, dim, unit_m, device)


def kept_codes(positions, args: tuple, cells: int, dim: int, unit_m: float,
               device: torch.device) -> torch.Tensor:
    """[cells, dim] `sincos_2d_m` of `positions(*args, device)`, made once per layout and
    device, not in every forward: the patch and sub-patch codes' small ops were about a
    tenth of a training step's ops, each a kernel the host launches on an accelerator. Only
    codes up to CACHED_CODE_ELEMENTS are kept: a wide tile's are made anew (few ops next to
    its forward; those of 2,400 m at 10 m patches, dim 768, are 177 MB). Never an inference
    tensor, whatever mode first asked for it (autograd could not save one for backward);
    callers never write into it."""
    make = code_cache if cells * dim <= CACHED_CODE_ELEMENTS else code_cache.__wrapped__
    return make(positions, args, dim, unit_m, device)


@lru_cache(maxsize=CACHED_CODES)
def code_cache(positions, args: tuple, dim: int, unit_m: float, device: torch.device
               ) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return sincos_2d_m(*positions(*args, device), dim, unit_m)
