"""Pieces of pretraining that need no chip store: random chips from one in-memory footprint
(`ChipSampler`, for quick experiments and tests) and the learning-rate schedule. The
training loop itself is `trainer.train` (single process or torchrun DDP, from chip stores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ModelInputError


@dataclass
class ChipSampler:
    """Random square chips (all sensors, same ground footprint) from one footprint batch
    (B = 1, e.g. a tile loaded by `cube.batch.load_tile_batch`). Chip sides and offsets are
    multiples of `step_m`, a common multiple of every sensor's GSD and the patch sizes."""

    footprint: dict[str, torch.Tensor]
    gsd_m: dict[str, float]
    chip_m: float
    step_m: float
    seed: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        name = next(iter(self.gsd_m))
        self.side_m = self.footprint[name].shape[-1] * self.gsd_m[name]
        if self.chip_m > self.side_m or not math.isclose(self.chip_m / self.step_m,
                                                         round(self.chip_m / self.step_m)):
            raise ModelInputError(f"chip {self.chip_m:g} m must fit the {self.side_m:g} m "
                                  f"footprint and be a multiple of {self.step_m:g} m")

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        positions = int((self.side_m - self.chip_m) // self.step_m) + 1
        offsets = torch.randint(positions, (batch_size, 2), generator=self.generator) * self.step_m
        out: dict[str, list[torch.Tensor]] = {}
        for name, gsd in self.gsd_m.items():
            px = round(self.chip_m / gsd)
            for oy, ox in offsets.tolist():
                y, x = round(oy / gsd), round(ox / gsd)
                out.setdefault(name, []).append(self.footprint[name][0, :, :, y:y + px, x:x + px])
                out.setdefault(f"{name}_dates", []).append(self.footprint[f"{name}_dates"][0])
                if f"{name}_mask" in self.footprint:
                    mask = self.footprint[f"{name}_mask"][0, :, y:y + px, x:x + px]
                    out.setdefault(f"{name}_mask", []).append(mask)
        return {k: torch.stack(v) for k, v in out.items()}


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int,
                  final: float = 0.0) -> float:
    """Linear warm-up to `peak`, then a cosine decay to `final` (the I-JEPA schedule)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
