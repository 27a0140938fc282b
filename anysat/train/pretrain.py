"""Pretraining on one footprint: random chips, random patch sizes, AdamW, EMA, checkpoint.

This is the single-process loop (the demo and tests); distributed training over Zarr chip
shards builds on the same `JEPA` module.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ModelInputError
from ..sizes import is_multiple
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


def chip_side_m(batch: dict[str, torch.Tensor], model: AnySat) -> float:
    name = next(k for k in batch if k in model.modalities)
    return batch[name].shape[-1] * model.modalities[name].gsd_m


def patch_sizes_for_chip(side_m: float, patch_sizes_m: list[float]) -> list[float]:
    """The patch sizes that split a chip side_m wide into at least 2 x 2 whole patches."""
    fits = [p for p in patch_sizes_m if side_m / p >= 2 and is_multiple(side_m, p)]
    if not fits:
        raise ModelInputError(f"no patch size of {patch_sizes_m} splits a {side_m:g} m chip "
                              "into 2 x 2 patches or more")
    return fits


def sensors_for_patch(batch: dict[str, torch.Tensor], model: AnySat, patch_size_m: float
                      ) -> dict[str, torch.Tensor]:
    """The batch without the sensors a patch of this size cannot hold (a 10 m patch has no
    30 m DEM pixel), as AnySat draws sensor subsets; an error if none is left."""
    keep = [name for name, spec in model.modalities.items() if name in batch
            and is_multiple(patch_size_m, spec.subpatch_m)]
    if not keep:
        raise ModelInputError(f"no sensor of the batch fits a {patch_size_m:g} m patch")
    return {k: v for k, v in batch.items()
            if k.removesuffix("_dates").removesuffix("_mask") in keep}


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int,
                  final: float = 0.0) -> float:
    """Linear warm-up to `peak`, then a cosine decay to `final` (the I-JEPA schedule)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(model: AnySat, sampler, steps: int, patch_sizes_m: list[float],
             batch_size: int = 8, lr: float = 3e-4, weight_decay: float = 0.04,
             config: JEPAConfig | None = None, seed: int = 0, log_every: int = 50,
             warmup_steps: int | None = None, monitor: Callable[[AnySat], dict] | None = None,
             monitor_every: int = 50) -> tuple[JEPA, list[dict]]:
    """JEPA pretraining; returns the JEPA (its `target` is the encoder to keep) and the
    per-step history (loss, batch monitors, and every `monitor_every` steps what `monitor`
    says of the target encoder, e.g. collapse monitors on a fixed probe set). `sampler` has
    `sample(batch_size) -> batch`. Patch size is drawn per batch, as AnySat does."""
    torch.manual_seed(seed)
    jepa = JEPA(model.train(), config)
    cfg = jepa.config
    params = [*jepa.encoder.parameters(), *jepa.predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    generator = torch.Generator().manual_seed(seed)
    history, started = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        batch = sampler.sample(batch_size)
        side_m = chip_side_m(batch, jepa.encoder)
        fits = patch_sizes_for_chip(side_m, patch_sizes_m)
        patch = fits[int(torch.randint(len(fits), (1,), generator=generator))]
        batch = sensors_for_patch(batch, jepa.encoder, patch)
        # made by the loader, as in I-JEPA (the model checks the batch itself)
        masks = cfg.masks(batch_size, round(side_m / patch), generator)
        out = jepa(batch, patch, generator, masks)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        jepa.update_target(ema_momentum(step, steps, cfg.ema_start, cfg.ema_end))
        record = {"step": step, "patch_m": patch, "lr": optimizer.param_groups[0]["lr"], **{
            k: float(v.detach()) if torch.is_tensor(v) else v for k, v in out.items()}}
        if monitor is not None and (step % monitor_every == 0 or step == steps - 1):
            jepa.target.eval()
            record.update({f"probe_{k}": v for k, v in monitor(jepa.target).items()})
        history.append(record)
        if log_every and (step % log_every == 0 or step == steps - 1):
            probe = {k: v for k, v in record.items() if k.startswith("probe_")}
            log.info("step %d/%d: loss %.4f, patch %g m, std %.4f, rankme %.1f%s, %.1f s",
                     step + 1, steps, record["loss"], patch, record["embedding_std"],
                     record["rankme"], "".join(f", {k} {v:.3g}" for k, v in probe.items()),
                     time.perf_counter() - started)
    jepa.target.eval()
    return jepa, history


def save_pretrained(jepa: JEPA, uri: str, history: list[dict], provenance: dict,
                    dtype: torch.dtype = torch.float32) -> None:
    """Keep the EMA target encoder (the I-JEPA choice) with how it was trained; `dtype`
    float16 halves the file (weights load back into float32)."""
    last = history[-20:]
    save_checkpoint(jepa.target, uri, provenance={
        **provenance, "steps": len(history),
        "final_loss": sum(h["loss"] for h in last) / len(last),
        "first_loss": history[0]["loss"]}, dtype=dtype)
