"""Joint-embedding predictive pretraining (JEPA) of the AnySat encoder.

A context encoder sees one large block of the patches with the target blocks removed (and
many dates and sensors hidden); a narrow predictor, given the context's tile and patch tokens
and the positions of the target patches as mask tokens, regresses the embeddings an EMA copy
of the encoder (the target) gives those patches from the full input, standardised per
feature over the batch and layer-normalised over the features (`normalise_targets`):

    L = mean_k d(g(z_ctx, m_k), sg[N(f_target(x)_k)]) + w * decorrelation(z_ctx),
    theta_t <- tau theta_t + (1 - tau) theta

with d the smooth-L1 distance (the official choice) or the squared L2 distance, averaged
over the feature dimension so that every patch size weighs the same.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..model import AnySat
from ..model.anysat import Layout
from ..model.config import SIZES
from ..model.layers import Block, branch_on_values
from .masks import MultiBlockMasks, context_validity
from .monitors import embedding_std, rankme


@dataclass(frozen=True)
class JEPAConfig:
    masks: MultiBlockMasks = MultiBlockMasks()
    loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    target_norm: Literal["layer", "batch"] = "batch"
    statistics_momentum: float = 0.99  # running output mean/std kept in the target encoder
    # Shares of a time series' dates, and chance of each sensor, hidden from the context (one
    # sensor always kept). Hard corruption makes the context predict across sensors and
    # seasons: at 0.7/0.7 the crop-type probe (WorldCereal, logreg) rose to 0.44 after 300
    # steps, vs 0.37 at 0.5/0.5, 0.31 at 0.25/0.15 and 0.41 at init (256-d, same seed).
    date_drop: float = 0.7
    modality_drop: float = 0.7
    ema_start: float = 0.996         # tau, raised linearly to ema_end (official: 0.996 -> 1.0)
    ema_end: float = 1.0
    # Weight of a decorrelation term on the context's patch embeddings (mean squared
    # off-diagonal correlation between features). The predictor and the EMA target alone did
    # not hold: over 1500 steps the centred effective rank of a fixed probe set fell from 33
    # to 2.2 and the crop-type probe from 0.34 (random init) to 0.23 (192-d).
    decorrelation_weight: float = 1.0
    milnce_weight: float = 0.0       # > 0 adds the official cross-sensor MIL-NCE term
    milnce_temperature: float = 0.1


def ema_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """The tau schedule: linear from start to end over the run."""
    return start + (end - start) * min(step, total_steps) / max(total_steps, 1)


def normalise_targets(z: torch.Tensor, how: str) -> torch.Tensor:
    """Target embeddings [B, N, D] -> what the predictor regresses. `layer`: layer norm over
    the features (I-JEPA). `batch`: first each feature standardised over the batch's patches
    (data2vec's instance norm), then the layer norm: a constant prediction never scores well."""
    if how == "batch":
        flat = z.reshape(-1, z.shape[-1])
        z = (z - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-6).sqrt()
    return F.layer_norm(z, z.shape[-1:])


class Predictor(nn.Module):
    """Narrow transformer: the context's tile token and patch tokens + mask tokens at the
    hidden patches' positions -> predicted target embeddings of the hidden patches. The tile
    token is among the inputs so that the encoder's tile output (the `tile` embedding users
    get) is trained too: it must carry what helps predict the hidden patches."""

    def __init__(self, dim: int, pred_dim: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.pred_dim = pred_dim
        self.embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, pred_dim) * 0.02)
        self.tile_position = nn.Parameter(torch.randn(1, 1, pred_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(pred_dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.proj = nn.Linear(pred_dim, dim)

    def forward(self, tile: torch.Tensor, context: torch.Tensor, context_pos: torch.Tensor,
                target_pos: torch.Tensor) -> torch.Tensor:
        """tile [B, D]; context [B, Nc, D]; positions [B, Nc, P] and [B, Nt, P] -> [B, Nt, D]."""
        x = torch.cat([self.embed(tile[:, None]) + self.tile_position,
                       self.embed(context) + context_pos,
                       self.mask_token.expand(*target_pos.shape[:2], -1) + target_pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, 1 + context.shape[1]:]))


class JEPA(nn.Module):
    """Context encoder (the model being trained), EMA target encoder and predictor."""

    def __init__(self, encoder: AnySat, config: JEPAConfig | None = None,
                 predictor: tuple[int, int, int] | None = None):
        super().__init__()
        self.config = config or JEPAConfig()
        self.encoder = encoder
        self.target = copy.deepcopy(encoder).requires_grad_(False)
        pred_dim, depth, heads = predictor or SIZES.get(encoder.config.size, SIZES["tiny"])["predictor"]
        self.predictor = Predictor(encoder.config.dim, pred_dim, depth, heads, encoder.config.mlp_ratio)

    # -- masks ---------------------------------------------------------------------------------
    def context_batch(self, batch: dict[str, torch.Tensor], layout: Layout,
                      generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The batch the context sees (`context_validity`: some dates and sensors hidden)."""
        series = {n: self.encoder.modalities[n].time_series for n in layout.sensors}
        return {**batch, **context_validity(batch, series, self.config.date_drop,
                                            self.config.modality_drop, generator)}

    # -- loss ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], patch_size_m: float,
                generator: torch.Generator | None = None,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None,
                context_valid: dict[str, torch.Tensor] | None = None, monitors: bool = True
                ) -> dict[str, torch.Tensor | float]:
        """Loss and collapse monitors for one batch. `masks` (context [B, Nc], targets
        [B, Nt] patch indices) and `context_valid` (the context's `{sensor}_mask`s, see
        `context_validity`) come from the data loader; drawn here when not given. `monitors`
        adds the batch's collapse monitors (an SVD: a GPU sync, so not every step)."""
        # checked once, values too where that costs no host sync (the loader's batches are
        # clean: an accelerator need not wait for that check at every step)
        layout = self.encoder.check_batch(batch, patch_size_m,
                                          values=branch_on_values(next(iter(batch.values()))))
        b = batch[layout.sensors[0]].shape[0]
        device = batch[layout.sensors[0]].device
        if masks is None:
            masks = self.config.masks(b, layout.grid, generator)
        context_idx, target_idx = (m.to(device) for m in masks)
        with torch.no_grad():
            _, _, full_tile, full, _ = self.target.forward_features(batch, patch_size_m,
                                                                    check_values=False)
            if self.training:
                self.target.update_output_statistics(full_tile, full, self.config.statistics_momentum)
            full = normalise_targets(full, self.config.target_norm)
            rows = torch.arange(b, device=device)[:, None]
            targets = full[rows, target_idx]
        seen = ({**batch, **context_valid} if context_valid is not None
                else self.context_batch(batch, layout, generator))
        _, sensors, tile, context, per_sensor = self.encoder.forward_features(
            seen, patch_size_m, patches=context_idx, check_values=False)
        codes = layout.codes(self.predictor.pred_dim, device)
        predicted = self.predictor(tile, context, codes[context_idx], codes[target_idx])
        targets = targets.to(predicted.dtype)
        if self.config.loss == "smooth_l1":
            jepa = F.smooth_l1_loss(predicted, targets)
        else:
            jepa = F.mse_loss(predicted, targets)
        out = {"jepa": jepa, "loss": jepa}
        if self.config.decorrelation_weight > 0:
            out["decorrelation"] = decorrelation(context.reshape(-1, context.shape[-1]))
            out["loss"] = out["loss"] + self.config.decorrelation_weight * out["decorrelation"]
        if self.config.milnce_weight > 0 and len(sensors) > 1:
            valid = torch.stack([s.valid for s in sensors.values()], 1)
            out["milnce"] = milnce(per_sensor, valid, self.config.milnce_temperature)
            out["loss"] = out["loss"] + self.config.milnce_weight * out["milnce"]
        if monitors:
            flat = context.detach().reshape(-1, context.shape[-1]).float()
            out["embedding_std"] = embedding_std(flat)
            out["rankme"] = rankme(flat)
        return out

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """theta_target <- tau * theta_target + (1 - tau) * theta, as one in-place lerp (a third
        of the time of multiply, multiply, add: base 37 vs 114 ms a step on one CPU thread)."""
        torch._foreach_lerp_(list(self.target.parameters()), list(self.encoder.parameters()), 1 - tau)


def decorrelation(z: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation between the features of z [N, D] (0 when the
    features vary independently, 1 when they all move together: dimensional collapse)."""
    z = z.float()
    z = (z - z.mean(0)) / (z.std(0) + 1e-4)
    corr = z.T @ z / max(1, z.shape[0] - 1)
    off = corr - torch.diag_embed(torch.diagonal(corr))
    d = z.shape[1]
    return (off ** 2).sum() / (d * (d - 1))


def milnce(tokens: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-sensor MIL-NCE: a sensor's token of a patch should be closer to the other sensors'
    tokens of the same patch (the positives) than to tokens of the tile's other patches.
    tokens [B, M, N, D], valid [B, M, N]."""
    b, m, n, d = tokens.shape
    z = F.normalize(tokens.float(), dim=-1).reshape(b, m * n, d)
    sim = z @ z.transpose(1, 2) / temperature                            # [B, MN, MN]
    patch = torch.arange(n, device=z.device).repeat(m)
    ok = valid.reshape(b, m * n)
    pair = ok[:, :, None] & ok[:, None, :] & ~torch.eye(m * n, dtype=torch.bool, device=z.device)
    positive = pair & (patch[:, None] == patch[None, :])
    neg_inf = torch.finfo(sim.dtype).min
    log_all = torch.logsumexp(sim.masked_fill(~pair, neg_inf), dim=-1)
    log_pos = torch.logsumexp(sim.masked_fill(~positive, neg_inf), dim=-1)
    anchors = positive.any(dim=-1)
    if not anchors.any():
        return sim.new_zeros(())
    return (log_all - log_pos)[anchors].mean()
