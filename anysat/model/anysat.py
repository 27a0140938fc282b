"""AnySat: any mix of sensors at any GSD -> tile, patch or dense embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ModelInputError
from ..sizes import is_multiple
from .config import AnySatConfig, ModalityConfig
from .layers import Block, FusionBlock, branch_on_values, patch_codes_m
from .projectors import BlockProjector, TemporalProjector
from .subpatch import SubPatchEncoder

Output = Literal["tile", "patch", "dense"]
POSITION_UNIT_M = 10.0
# Patch positions enter the tokens at a tenth of the content's scale: at full scale (norm ~
# sqrt(D/2), as large as a LayerNorm'd patch token) a patch's place in its tile explained
# 72 % of the demo layer's variance (omega^2) at init; at 0.1 about none (see evaluate.position).
POSITION_SCALE = 0.1


@dataclass
class Layout:
    """The patch grid of a batch: grid x grid patches of patch_size_m, row-major."""

    sensors: list[str]
    side_m: float
    patch_size_m: float

    @property
    def grid(self) -> int:
        return round(self.side_m / self.patch_size_m)

    def codes(self, dim: int, device=None) -> torch.Tensor:
        """[N, dim] sine-cosine codes of the patch centres, in units of POSITION_UNIT_M."""
        return patch_codes_m(self.grid, self.patch_size_m, dim, POSITION_UNIT_M,
                             torch.device(device or "cpu"))


@dataclass
class SensorTokens:
    tokens: torch.Tensor                  # [B, N, D] patch tokens (positions, sensor embedding)
    valid: torch.Tensor                   # [B, N]
    subpatches: torch.Tensor | None       # [B, N, S, D], for dense output
    subpatch_valid: torch.Tensor          # [B, N, S]


class AnySat(nn.Module):
    """Scale-adaptive multi-sensor encoder.

    Batch: for each sensor `m` the model was built for (any subset):
      `m`: Tensor[B, T, C, H, W] in physical units (reflectance, dB, metres), T >= 1,
      `m_dates`: Tensor[B, T], days since 1970-01-01,
      `m_mask` (optional): bool Tensor[B, T, H, W], True where the pixel-date is valid
      (default: all bands finite). Invalid values are ignored, never averaged in.
    Every sensor covers the same footprint: H * GSD equal for all. Patch size is in metres
    and a multiple of each sensor's sub-patch (its GSD, or s x s pixels for VHR images).
    """

    def __init__(self, config: AnySatConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.projectors = nn.ModuleDict({
            m.name: (TemporalProjector(m, d, config.temporal_heads, config.temporal_key_dim)
                     if m.time_series else BlockProjector(m, d))
            for m in config.modalities})
        self.modality_embed = nn.ParameterDict(
            {m.name: nn.Parameter(torch.randn(d) * 0.02) for m in config.modalities})
        self.subpatch_encoder = SubPatchEncoder(d, config.heads, config.subpatch_depth,
                                                config.mlp_ratio)
        self.tile_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, config.heads, config.mlp_ratio)
                                    for _ in range(config.depth))
        self.fusion = FusionBlock(d, config.heads, config.mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        # Per-feature mean and std of the tile and patch embeddings over the pretraining data
        # (running averages kept by JEPA pretraining, the statistics its targets are
        # standardised with; identity until then). Outputs are standardised with them, so an
        # embedding is its deviation from the typical one, not a large shared constant.
        for kind in ("tile", "patch"):
            self.register_buffer(f"{kind}_mean", torch.zeros(d))
            self.register_buffer(f"{kind}_std", torch.ones(d))
        self.register_buffer("statistics_updates", torch.zeros((), dtype=torch.long))

    @property
    def modalities(self) -> dict[str, ModalityConfig]:
        return {m.name: m for m in self.config.modalities}

    # -- input checks -------------------------------------------------------------------------
    def check_batch(self, batch: dict[str, torch.Tensor], patch_size_m: float,
                    values: bool = True) -> Layout:
        """The sensors present and the footprint; one clear error for anything that does not fit.
        `values=False` leaves out the checks of the values (finite dates, no NaN where the mask
        says valid), which make the host wait for an accelerator: for batches already checked."""
        known = self.modalities
        present = [k for k in batch if not k.endswith(("_dates", "_mask"))]
        unknown = [k for k in present if k not in known]
        if unknown:
            raise ModelInputError(f"model has no sensor {unknown}; it was built for {list(known)}")
        if not present:
            raise ModelInputError(f"batch holds no sensor; the model takes any of {list(known)}")
        if not patch_size_m > 0:
            raise ModelInputError(f"patch size must be positive metres, not {patch_size_m!r}")
        sides = {}
        for name in present:
            x, spec = batch[name], known[name]
            if x.ndim != 5 or x.shape[2] != len(spec.bands):
                raise ModelInputError(
                    f"{name}: expected Tensor[B, T, {len(spec.bands)}, H, W], got {tuple(x.shape)}")
            dates = batch.get(f"{name}_dates")
            if dates is None or dates.shape != x.shape[:2]:
                raise ModelInputError(f"{name}: needs '{name}_dates' of shape {tuple(x.shape[:2])}")
            if values and not torch.isfinite(dates).all():
                raise ModelInputError(f"{name}: '{name}_dates' holds NaN or infinite dates")
            mask = batch.get(f"{name}_mask")
            if mask is not None and mask.shape != (*x.shape[:2], *x.shape[3:]):
                raise ModelInputError(f"{name}: '{name}_mask' must have shape "
                                      f"{(*x.shape[:2], *x.shape[3:])}, got {tuple(mask.shape)}")
            if not is_multiple(patch_size_m, spec.subpatch_m):
                what = "GSD" if spec.subpatch_px == 1 else f"{spec.subpatch_px}-pixel sub-patch"
                raise ModelInputError(f"patch size {patch_size_m:g} m is not a multiple of "
                                      f"{name}'s {what} {spec.subpatch_m:g} m")
            sides[name] = (x.shape[3] * spec.gsd_m, x.shape[4] * spec.gsd_m)
            if values and mask is not None and torch.isnan(x).any(dim=2).logical_and(mask.bool()).any():
                raise ModelInputError(f"{name}: NaN values in pixels its mask marks valid")
        if len(set(sides.values())) != 1:
            raise ModelInputError(f"sensors cover different footprints (metres): {sides}")
        height_m, width_m = next(iter(sides.values()))
        if height_m != width_m or not is_multiple(height_m, patch_size_m):
            raise ModelInputError(
                f"footprint {height_m:g} x {width_m:g} m is not a square multiple of the "
                f"{patch_size_m:g} m patch size")
        return Layout(present, height_m, patch_size_m)

    @staticmethod
    def _valid(batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        mask = batch.get(f"{name}_mask")
        return torch.isfinite(batch[name]).all(dim=2) if mask is None else mask.bool()

    # -- tokenization -------------------------------------------------------------------------
    def _subpatch_pixels(self, batch, name: str, layout: Layout, patches: torch.Tensor | None):
        """The pixels of each sub-patch of each (kept) patch: [B, N, S, ...] and validity."""
        spec = self.modalities[name]
        x, valid, dates = batch[name], self._valid(batch, name), batch[f"{name}_dates"]
        b, t, c = x.shape[:3]
        g, s = layout.grid, spec.subpatch_px
        k = round(layout.patch_size_m / spec.subpatch_m)
        if spec.time_series:   # [B, T, C, g, k, g, k] -> [B, g*g, k*k, T, C]
            x = x.view(b, t, c, g, k, g, k).permute(0, 3, 5, 4, 6, 1, 2).reshape(b, g * g, k * k, t, c)
            valid = valid.view(b, t, g, k, g, k).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, k * k, t)
        else:  # one image: per pixel its latest valid date; blocks of s x s pixels
            latest = torch.where(valid, dates[:, :, None, None], float("-inf")).argmax(dim=1)
            x = x.gather(1, latest[:, None, None].expand(b, 1, c, *x.shape[3:]))[:, 0]
            valid = valid.any(dim=1)
            x = x.view(b, c, g, k, s, g, k, s).permute(0, 2, 5, 3, 6, 1, 4, 7)
            x = x.reshape(b, g * g, k * k, c, s * s)
            valid = valid.view(b, g, k, s, g, k, s).permute(0, 1, 4, 2, 5, 3, 6)
            valid = valid.reshape(b, g * g, k * k, s * s)
        if patches is not None:
            rows = torch.arange(b, device=x.device)[:, None]
            x, valid = x[rows, patches], valid[rows, patches]
        return x, valid, dates

    def embed_sensor(self, batch, name: str, layout: Layout, position: torch.Tensor,
                     patches: torch.Tensor | None = None, keep_subpatches: bool = False
                     ) -> SensorTokens:
        """One sensor -> one token per (kept) patch, with its position and sensor embedding."""
        spec = self.modalities[name]
        x, valid, dates = self._subpatch_pixels(batch, name, layout, patches)
        b, n, s = x.shape[:3]
        if spec.time_series:
            sub, sub_valid = self.projectors[name](x.flatten(1, 2), valid.flatten(1, 2), dates)
        else:
            sub, sub_valid = self.projectors[name](x.flatten(1, 2), valid.flatten(1, 2))
        sub, sub_valid = sub.view(b, n, s, -1), sub_valid.view(b, n, s)
        patch, patch_valid, subs = self.subpatch_encoder(
            sub, sub_valid, layout.patch_size_m, spec.subpatch_m, keep_subpatches)
        tokens = (patch + position + self.modality_embed[name]) * patch_valid[..., None]
        return SensorTokens(tokens, patch_valid, subs, sub_valid)

    def positions(self, layout: Layout, patches: torch.Tensor | None, batch_size: int,
                  device=None) -> torch.Tensor:
        """[B, N, D] sine-cosine codes of the (kept) patch centres, in metres."""
        code = layout.codes(self.config.dim, device) * POSITION_SCALE
        if patches is None:
            return code.expand(batch_size, -1, -1)
        return code[patches]

    # -- encoder ------------------------------------------------------------------------------
    def encode(self, sensors: dict[str, SensorTokens], position: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transformer over the tile token and every sensor's patch tokens, then the fusion
        block -> tile [B, D], patches [B, N, D], per-sensor tokens before fusion [B, M, N, D]."""
        names = list(sensors)
        first = sensors[names[0]].tokens
        b, n, d = first.shape
        x = torch.cat([self.tile_token.expand(b, 1, d).to(first.dtype),
                       *(sensors[m].tokens for m in names)], dim=1)
        keep = torch.cat([first.new_ones(b, 1, dtype=torch.bool),
                          *(sensors[m].valid for m in names)], dim=1)
        keep_mask = None if branch_on_values(keep) and bool(keep.all()) else keep
        for block in self.blocks:
            x = block(x, keep_mask)
        tokens = x[:, 1:].view(b, len(names), n, d)
        tile, patches = self.fusion(x[:, 0], tokens, keep[:, 1:].view(b, len(names), n), position)
        return self.norm(tile), self.norm(patches), tokens

    def forward_features(self, batch: dict[str, torch.Tensor], patch_size_m: float,
                         patches: torch.Tensor | None = None, keep_subpatches: bool = False,
                         check_values: bool = True):
        """(layout, sensor tokens, tile [B, D], patches [B, N, D], pre-fusion tokens);
        `patches` [B, N] selects the patches to encode (the JEPA context), default all."""
        layout = self.check_batch(batch, patch_size_m, values=check_values)
        b = batch[layout.sensors[0]].shape[0]
        device = batch[layout.sensors[0]].device
        position = self.positions(layout, patches, b, device)
        sensors = {m: self.embed_sensor(batch, m, layout, position, patches, keep_subpatches)
                   for m in layout.sensors}
        tile, patch_tokens, per_sensor = self.encode(sensors, position)
        return layout, sensors, tile, patch_tokens, per_sensor

    @torch.no_grad()
    def update_output_statistics(self, tile: torch.Tensor, patches: torch.Tensor,
                                 momentum: float) -> None:
        """Running per-feature mean/std of tile [B, D] and patch [..., D] embeddings (plain
        averages over the first updates, then exponential with `momentum`)."""
        n = self.statistics_updates
        if branch_on_values(n):
            n = int(n)
            momentum = min(momentum, n / (n + 1))
        else:  # the same, on the device
            momentum = (n / (n + 1)).clamp(max=momentum)
        self.statistics_updates += 1
        for kind, z in (("tile", tile), ("patch", patches)):
            flat = z.detach().float().reshape(-1, z.shape[-1])
            if flat.shape[0] < 2:   # no spread to learn from one vector
                continue
            mean, std = getattr(self, f"{kind}_mean"), getattr(self, f"{kind}_std")
            mean.mul_(momentum).add_((1 - momentum) * flat.mean(0))
            std.mul_(momentum).add_((1 - momentum) * flat.std(0).clamp(min=1e-6))

    def forward(self, batch: dict[str, torch.Tensor], patch_size_m: float,
                output: Output = "patch", check_values: bool = True) -> torch.Tensor:
        """`tile` [B, D]; `patch` [B, H/P, W/P, D]; `dense` [B, H', W', 2D] at the finest
        sub-patch size (each sub-patch: its patch token and its own token); tile and patch
        features standardised with the statistics of pretraining. `check_values`: as
        `check_batch`'s `values` (False: the forward never waits for an accelerator)."""
        if output not in ("tile", "patch", "dense"):
            raise ModelInputError(f"output must be 'tile', 'patch' or 'dense', not {output!r}")
        layout, sensors, tile, patches, _ = self.forward_features(
            batch, patch_size_m, keep_subpatches=output == "dense", check_values=check_values)
        if output == "tile":
            return (tile - self.tile_mean) / self.tile_std
        patches = (patches - self.patch_mean) / self.patch_std
        b, n, d = patches.shape
        g = layout.grid
        if output == "patch":
            return patches.view(b, g, g, d)
        finest = min(self.modalities[m].subpatch_m for m in layout.sensors)
        names = [m for m in layout.sensors if self.modalities[m].subpatch_m == finest]
        k = round(patch_size_m / finest)
        sub = torch.stack([sensors[m].subpatches for m in names], 1)            # [B, M, N, S, D]
        weight = torch.stack([sensors[m].subpatch_valid for m in names], 1)[..., None].to(sub.dtype)
        sub = (sub * weight).sum(1) / weight.sum(1).clamp(min=1)
        dense = torch.cat([patches[:, :, None].expand(-1, -1, k * k, -1), sub], dim=-1)
        dense = dense.view(b, g, g, k, k, 2 * d).permute(0, 1, 3, 2, 4, 5)
        return dense.reshape(b, g * k, g * k, 2 * d)

    @torch.no_grad()
    def patch_validity(self, batch: dict[str, torch.Tensor], patch_size_m: float,
                       check_values: bool = True) -> torch.Tensor:
        """[B, H/P, W/P] bool: patches where at least one sensor has a valid pixel-date."""
        layout = self.check_batch(batch, patch_size_m, values=check_values)
        g, out = layout.grid, None
        for name in layout.sensors:
            k = round(patch_size_m / self.modalities[name].gsd_m)
            v = self._valid(batch, name).any(dim=1)
            v = v.view(v.shape[0], g, k, g, k).any(dim=(2, 4))
            out = v if out is None else out | v
        return out
