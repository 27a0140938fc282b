"""Scale-adaptive tokenization: pixel tokens of one sensor -> one token per metric patch."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Block, sincos_2d_m


class SubPatchMerger(nn.Module):
    """Merge the sub-patch tokens inside each patch into one patch token.

    A patch of `patch_size_m` holds k x k sub-patches of the sensor's GSD (k = P / GSD). A
    learned query token attends over them (with their in-patch offsets in metres) through a
    small transformer; the contextualised sub-patch tokens are kept for dense outputs.
    """

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor, valid: torch.Tensor, gsd_m: float, patch_size_m: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels [B, H, W, D], valid [B, H, W] ->
        patch tokens [B, Hp*Wp, D], patch valid [B, Hp*Wp], sub-patch tokens [B, Hp*Wp, k*k, D]."""
        b, h, w, d = pixels.shape
        k = round(patch_size_m / gsd_m)
        hp, wp = h // k, w // k
        sub = pixels.view(b, hp, k, wp, k, d).permute(0, 1, 3, 2, 4, 5).reshape(b * hp * wp, k * k, d)
        keep = valid.view(b, hp, k, wp, k).permute(0, 1, 3, 2, 4).reshape(b * hp * wp, k * k)
        offsets = (torch.arange(k, device=pixels.device, dtype=torch.float32) + 0.5) * gsd_m - patch_size_m / 2
        oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
        sub = sub + sincos_2d_m(ox.reshape(-1), oy.reshape(-1), d, unit_m=gsd_m)
        x = torch.cat([self.query.expand(sub.shape[0], 1, d), sub], dim=1)
        keep_all = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)
        for block in self.blocks:
            x = block(x, keep_all)
        x = self.norm(x)
        patch_valid = keep.any(dim=1)
        patch = x[:, 0] * patch_valid[:, None]
        return (patch.view(b, hp * wp, d), patch_valid.view(b, hp * wp),
                x[:, 1:].reshape(b, hp * wp, k * k, d))
