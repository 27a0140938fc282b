"""Scale-adaptive tokenization: a modality's sub-patch tokens -> one token per metric patch."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Block, branch_on_values, kept_codes


def subpatch_offsets_m(patch_size_m: float, subpatch_m: float, device=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of the k x k sub-patch centres relative to their patch centre, in metres."""
    k = round(patch_size_m / subpatch_m)
    offsets = (torch.arange(k, dtype=torch.float32, device=device) + 0.5) * subpatch_m
    oy, ox = torch.meshgrid(offsets - patch_size_m / 2, offsets - patch_size_m / 2, indexing="ij")
    return ox.reshape(-1), oy.reshape(-1)


def subpatch_codes_m(patch_size_m: float, subpatch_m: float, dim: int, device: torch.device
                     ) -> torch.Tensor:
    """[k * k, dim] codes of the sub-patch offsets, kept (`layers.kept_codes`)."""
    k = round(patch_size_m / subpatch_m)
    return kept_codes(subpatch_offsets_m, (patch_size_m, subpatch_m), k * k, dim, 1.0, device)


class SubPatchEncoder(nn.Module):
    """A class token and the k x k sub-patch tokens of each patch (with their offsets in metres
    inside the patch) go through a small transformer; the class token becomes the patch token.
    One module for all modalities, as in the official AnySat (its `spatial_encoder`)."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, patch_size_m: float,
                subpatch_m: float, keep_subpatches: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """tokens [B, N, S, D], valid [B, N, S] -> patch tokens [B, N, D], patch valid [B, N],
        and the contextualised sub-patch tokens [B, N, S, D] when asked (for dense output)."""
        b, n, s, d = tokens.shape
        x = tokens + subpatch_codes_m(patch_size_m, subpatch_m, d, tokens.device).to(tokens.dtype)
        x = torch.cat([self.cls.expand(b * n, 1, d).to(x.dtype), x.view(b * n, s, d)], dim=1)
        keep = None
        if not branch_on_values(valid) or not bool(valid.all()):
            keep = torch.cat([valid.new_ones(b * n, 1), valid.view(b * n, s)], dim=1)
        for i, block in enumerate(self.blocks):
            last_only_cls = i == len(self.blocks) - 1 and not keep_subpatches
            x = block(x, keep, queries=1 if last_only_cls else None)
        x = self.norm(x)
        patch_valid = valid.any(dim=2)
        patch = x[:, 0].view(b, n, d) * patch_valid[..., None]
        return patch, patch_valid, (x[:, 1:].view(b, n, s, d) if keep_subpatches else None)
