"""AnySat: any mix of sensors at any GSD -> tile, patch or dense embeddings."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ModelInputError
from .config import AnySatConfig, ModalityConfig
from .layers import Block, sincos_2d_m
from .temporal import PixelTemporalEncoder
from .tokenizer import SubPatchMerger

Output = Literal["tile", "patch", "dense"]


def _multiple(value: float, step: float) -> bool:
    ratio = value / step
    return ratio >= 1 - 1e-9 and abs(ratio - round(ratio)) < 1e-6


class AnySat(nn.Module):
    """Scale-adaptive multi-sensor encoder.

    Batch: for each sensor `m` the model was built for (any subset):
      `m`: Tensor[B, T, C, H, W] in physical units (reflectance, dB, metres),
      `m_dates`: Tensor[B, T], days since 1970-01-01,
      `m_mask` (optional): bool Tensor[B, T, H, W], True where the pixel-date is valid
      (default: all bands finite). Invalid values are ignored, never averaged in.
    Every sensor covers the same footprint: H * GSD equal for all. Patch size is in metres.
    """

    def __init__(self, config: AnySatConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.encoders = nn.ModuleDict(
            {m.name: PixelTemporalEncoder(m, d, config.temporal_heads) for m in config.modalities}
        )
        self.modality_embed = nn.ParameterDict(
            {m.name: nn.Parameter(torch.randn(d) * 0.02) for m in config.modalities}
        )
        self.merger = SubPatchMerger(d, config.heads, config.subpatch_depth, config.mlp_ratio)
        self.tile_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)

    @property
    def modalities(self) -> dict[str, ModalityConfig]:
        return {m.name: m for m in self.config.modalities}

    # -- input checks -------------------------------------------------------------------------
    def check_batch(self, batch: dict[str, torch.Tensor], patch_size_m: float
                    ) -> tuple[list[str], float]:
        """Names of the sensors present and the footprint side in metres; clear errors otherwise."""
        known = self.modalities
        present = [k for k in batch if not k.endswith(("_dates", "_mask"))]
        unknown = [k for k in present if k not in known]
        if unknown:
            raise ModelInputError(f"model has no sensor {unknown}; it was built for {list(known)}")
        if not present:
            raise ModelInputError(f"batch holds no sensor; the model takes any of {list(known)}")
        sides = {}
        for name in present:
            x, spec = batch[name], known[name]
            if x.ndim != 5 or x.shape[2] != len(spec.bands):
                raise ModelInputError(
                    f"{name}: expected Tensor[B, T, {len(spec.bands)}, H, W], got {tuple(x.shape)}")
            if f"{name}_dates" not in batch or batch[f"{name}_dates"].shape != x.shape[:2]:
                raise ModelInputError(f"{name}: needs '{name}_dates' of shape {tuple(x.shape[:2])}")
            if not _multiple(patch_size_m, spec.gsd_m):
                raise ModelInputError(
                    f"patch size {patch_size_m:g} m is not a multiple of {name}'s GSD {spec.gsd_m:g} m")
            sides[name] = (x.shape[3] * spec.gsd_m, x.shape[4] * spec.gsd_m)
            valid = self._valid(batch, name)
            if torch.isnan(x).any(dim=2).logical_and(valid).any():
                raise ModelInputError(f"{name}: NaN values in pixels marked valid")
        if len(set(sides.values())) != 1:
            raise ModelInputError(f"sensors cover different footprints (metres): {sides}")
        height_m, width_m = next(iter(sides.values()))
        if height_m != width_m or not _multiple(height_m, patch_size_m):
            raise ModelInputError(
                f"footprint {height_m:g} x {width_m:g} m is not a square multiple of the "
                f"{patch_size_m:g} m patch size")
        return present, height_m

    @staticmethod
    def _valid(batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        mask = batch.get(f"{name}_mask")
        return torch.isfinite(batch[name]).all(dim=2) if mask is None else mask.bool()

    # -- forward ------------------------------------------------------------------------------
    def tokenize(self, batch: dict[str, torch.Tensor], patch_size_m: float):
        """Per sensor: patch tokens [B, Np, D], patch validity [B, Np], sub-patch tokens."""
        present, side_m = self.check_batch(batch, patch_size_m)
        grid = round(side_m / patch_size_m)
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch_size_m
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        position = sincos_2d_m(cx.reshape(-1), cy.reshape(-1), self.config.dim)
        tokens, valid, subs = {}, {}, {}
        for name in present:
            spec = self.modalities[name]
            pixels, pixel_valid = self.encoders[name](batch[name], batch[f"{name}_dates"],
                                                     self._valid(batch, name))
            patch, patch_valid, sub = self.merger(pixels, pixel_valid, spec.gsd_m, patch_size_m)
            tokens[name] = patch + position.to(patch) + self.modality_embed[name]
            valid[name], subs[name] = patch_valid, (sub, pixel_valid)
        return present, grid, tokens, valid, subs

    def forward(self, batch: dict[str, torch.Tensor], patch_size_m: float,
                output: Output = "patch") -> torch.Tensor:
        """`tile` [B, D]; `patch` [B, H/P, W/P, D]; `dense` [B, H', W', 2D] at the finest GSD."""
        if output not in ("tile", "patch", "dense"):
            raise ModelInputError(f"output must be 'tile', 'patch' or 'dense', not {output!r}")
        present, grid, tokens, valid, subs = self.tokenize(batch, patch_size_m)
        b, n = tokens[present[0]].shape[:2]
        x = torch.cat([self.tile_token.expand(b, 1, -1), *tokens.values()], dim=1)
        keep = torch.cat([valid[present[0]].new_ones(b, 1), *valid.values()], dim=1)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        if output == "tile":
            return x[:, 0]
        per_sensor = x[:, 1:].view(b, len(present), n, -1)
        weight = torch.stack(list(valid.values()), dim=1)[..., None].to(x.dtype)
        patch = (per_sensor * weight).sum(1) / weight.sum(1).clamp(min=1)   # fuse sensors per patch
        if output == "patch":
            return patch.view(b, grid, grid, -1)
        return self._dense(patch, present, grid, subs, patch_size_m)

    def _dense(self, patch, present, grid, subs, patch_size_m):
        finest = min(self.modalities[m].gsd_m for m in present)
        names = [m for m in present if self.modalities[m].gsd_m == finest]
        k = round(patch_size_m / finest)
        b, n, d = patch.shape
        sub = torch.stack([subs[m][0] for m in names], 1)                   # [B, S, Np, k*k, D]
        sub_valid = torch.stack([
            subs[m][1].view(b, grid, k, grid, k).permute(0, 1, 3, 2, 4).reshape(b, n, k * k)
            for m in names], 1)[..., None].to(sub.dtype)
        sub = (sub * sub_valid).sum(1) / sub_valid.sum(1).clamp(min=1)     # [B, Np, k*k, D]
        dense = torch.cat([patch[:, :, None].expand(-1, -1, k * k, -1), sub], dim=-1)
        dense = dense.view(b, grid, grid, k, k, 2 * d).permute(0, 1, 3, 2, 4, 5)
        return dense.reshape(b, grid * k, grid * k, 2 * d)

    @torch.no_grad()
    def patch_validity(self, batch: dict[str, torch.Tensor], patch_size_m: float) -> torch.Tensor:
        """[B, H/P, W/P] bool: patches where at least one sensor has a valid pixel-date."""
        present, side_m = self.check_batch(batch, patch_size_m)
        grid = round(side_m / patch_size_m)
        out = None
        for name in present:
            k = round(patch_size_m / self.modalities[name].gsd_m)
            v = self._valid(batch, name).any(dim=1)
            v = v.view(v.shape[0], grid, k, grid, k).any(dim=(2, 4))
            out = v if out is None else out | v
        return out
