"""JEPA masks as data (the I-JEPA multi-block collator on a grid x grid patch layout).

Per sample: `targets` rectangular blocks of patches (each `target_scale` of the grid, aspect
ratio in `aspect`) are what the predictor must regress; the context is one large block
(`context_scale` of the grid) with every target patch removed, so the context never sees a
target and cannot solve the task by copying a neighbour inside the same block. Indices are
truncated to the batch's smallest count (random patches dropped), so a batch is rectangular.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MultiBlockMasks:
    context_scale: tuple[float, float] = (0.85, 1.0)
    target_scale: tuple[float, float] = (0.15, 0.2)
    aspect: tuple[float, float] = (0.75, 1.5)
    targets: int = 4
    min_context: int = 1
    tries: int = 20

    def _block(self, grid: int, scale: tuple[float, float], aspect: tuple[float, float],
               generator: torch.Generator) -> torch.Tensor:
        """A random rectangle of about scale * grid^2 patches: bool [grid, grid]."""
        u = torch.rand(2, generator=generator).tolist()
        area = grid * grid * (scale[0] + u[0] * (scale[1] - scale[0]))
        ratio = math.exp(math.log(aspect[0]) + u[1] * (math.log(aspect[1]) - math.log(aspect[0])))
        h = max(1, min(grid, round(math.sqrt(area * ratio))))
        w = max(1, min(grid, round(math.sqrt(area / ratio))))
        top = int(torch.randint(grid - h + 1, (1,), generator=generator))
        left = int(torch.randint(grid - w + 1, (1,), generator=generator))
        block = torch.zeros(grid, grid, dtype=torch.bool)
        block[top:top + h, left:left + w] = True
        return block

    def sample_one(self, grid: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Context and target patch indices (row-major) of one sample."""
        for attempt in range(self.tries):
            n_targets = self.targets if attempt < self.tries // 2 else 1  # small grids: fewer
            target = torch.zeros(grid, grid, dtype=torch.bool)
            for _ in range(n_targets):
                target |= self._block(grid, self.target_scale, self.aspect, generator)
            context = self._block(grid, self.context_scale, (1.0, 1.0), generator) & ~target
            if int(context.sum()) >= self.min_context and bool(target.any()):
                break
        else:  # a grid too small for blocks: one random patch is the target
            target = torch.zeros(grid * grid, dtype=torch.bool)
            target[int(torch.randint(grid * grid, (1,), generator=generator))] = True
            target, context = target.view(grid, grid), ~target.view(grid, grid)
        return context.flatten().nonzero().squeeze(1), target.flatten().nonzero().squeeze(1)

    def __call__(self, batch_size: int, grid: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, Nc] and targets [B, Nt], sorted, disjoint per sample."""
        if grid * grid < 2:
            raise ValueError("JEPA masks need at least 2 patches per sample")
        generator = generator or torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
        pairs = [self.sample_one(grid, generator) for _ in range(batch_size)]
        n_ctx = min(len(c) for c, _ in pairs)
        n_tgt = min(len(t) for _, t in pairs)

        def keep(idx: torch.Tensor, n: int) -> torch.Tensor:
            return idx[torch.randperm(len(idx), generator=generator)[:n]].sort().values

        return (torch.stack([keep(c, n_ctx) for c, _ in pairs]),
                torch.stack([keep(t, n_tgt) for _, t in pairs]))


def context_validity(batch: dict[str, torch.Tensor], time_series: dict[str, bool],
                     date_drop: float, modality_drop: float,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What the context may see, as `{sensor}_mask` entries: each sensor hidden with chance
    `modality_drop` and a share `date_drop` of each time series' dates hidden (through the
    masks, so they are ignored, not zero-filled). Every sample keeps one sensor and every
    kept time series one date. `time_series` names the batch's sensors in a fixed order."""
    names = list(time_series)
    b = batch[names[0]].shape[0]
    dropped = torch.rand(b, len(names), generator=generator) < modality_drop
    all_dropped = dropped.all(dim=1)
    dropped[all_dropped, torch.randint(len(names), (int(all_dropped.sum()),), generator=generator)] = False
    out = {}
    for i, name in enumerate(names):
        mask = batch.get(f"{name}_mask")
        valid = torch.isfinite(batch[name]).all(dim=2) if mask is None else mask.bool()
        keep = ~dropped[:, i].to(valid.device)[:, None, None, None]
        if time_series[name]:
            draw = torch.rand(valid.shape[:2], generator=generator)
            dates = draw >= date_drop
            dates[torch.arange(len(draw)), draw.argmax(dim=1)] = True
            keep = keep & dates.to(valid.device)[:, :, None, None]
        out[f"{name}_mask"] = valid & keep
    return out
