"""Pretraining on one footprint: random chips, random patch sizes, AdamW, EMA, checkpoint.

This is the single-process loop (the demo and tests); distributed training over Zarr chip
shards builds on the same `JEPA` module.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from ..errors import ModelInputError
from ..model import AnySat, save_checkpoint
from .jepa import JEPA, JEPAConfig, ema_momentum

log = logging.getLogger("anysat")


@dataclass
class ChipSampler:
    """Random square chips (all sensors, same ground footprint) from one footprint batch
    (B = 1, e.g. a tile loaded by `pipeline.load_tile_batch`). Chip sides and offsets are
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


def pretrain(model: AnySat, sampler: ChipSampler, steps: int, patch_sizes_m: list[float],
             batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.05,
             config: JEPAConfig | None = None, seed: int = 0, log_every: int = 50
             ) -> tuple[JEPA, list[dict]]:
    """JEPA pretraining; returns the JEPA (its `target` is the encoder to keep) and the
    per-step history (loss, monitors). Patch size is drawn per batch, as AnySat does."""
    torch.manual_seed(seed)
    jepa = JEPA(model.train(), config)
    params = [*jepa.encoder.parameters(), *jepa.predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    history, started = [], time.perf_counter()
    for step in range(steps):
        batch = sampler.sample(batch_size)
        patch = patch_sizes_m[int(torch.randint(len(patch_sizes_m), (1,), generator=generator))]
        out = jepa(batch, patch, generator)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        cfg = jepa.config
        jepa.update_target(ema_momentum(step, steps, cfg.ema_start, cfg.ema_end))
        history.append({"step": step, "patch_m": patch, **{
            k: float(v.detach()) if torch.is_tensor(v) else v for k, v in out.items()}})
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("step %d/%d: loss %.4f, patch %g m, std %.4f, rankme %.1f, %.1f s", step + 1,
                     steps, history[-1]["loss"], patch, out["embedding_std"], out["rankme"],
                     time.perf_counter() - started)
    jepa.target.eval()
    return jepa, history


def save_pretrained(jepa: JEPA, uri: str, history: list[dict], provenance: dict) -> None:
    """Keep the EMA target encoder (the I-JEPA choice) with how it was trained."""
    last = history[-20:]
    save_checkpoint(jepa.target, uri, provenance={
        **provenance, "steps": len(history),
        "final_loss": sum(h["loss"] for h in last) / len(last),
        "first_loss": history[0]["loss"]})
