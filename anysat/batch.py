"""Model batches: a dict of tensors, per sensor `s`: `s` pixels [B, T, C, H, W] in physical
units (NaN where invalid), `s_dates` [B, T] days since 1970-01-01, `s_mask` [B, T, H, W] True
where every band is valid. B = 1 batches (a tile, a chip) stack into one, so that many go
through one forward: time series of different lengths are padded with masked dates (the model
ignores them), so the stacked batch is rectangular. (Cubes become batches in `cube.batch`.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def stack_samples(samples: list[Batch], pin_memory: bool = False,
                  without_empty: bool = False) -> Batch:
    """B = 1 batches with the same keys (pixels, `_mask`, `_dates` per sensor) -> one batch,
    in page-locked memory if `pin_memory` (copied to a GPU without blocking the host);
    `without_empty`: each sample's dates with no valid pixel left out (`without_empty_dates`),
    copied once, straight into the batch."""
    keys = samples[0].keys()
    if any(s.keys() != keys for s in samples):
        raise ValueError("samples to stack must hold the same sensors")
    kept = [kept_dates(s) if without_empty else {} for s in samples]
    return {key: pad_stack(key, [s[key][0] for s in samples], pin_memory,
                           [k.get(_sensor(key)) for k in kept]) for key in keys}


def _sensor(key: str) -> str:
    return key.removesuffix("_dates").removesuffix("_mask")


def kept_dates(sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dates to keep of each sensor of a B = 1 batch that has dates without a valid pixel
    (a cloud over the whole tile): they weigh nothing in the model's output (a time series
    pools over its valid dates only, a single image takes each pixel's latest valid date),
    yet an accelerator computes every pixel-date (it never waits to look at the mask). A
    sensor with no valid pixel at all keeps its first date, so that it keeps its shape."""
    kept = {}
    for name in [k for k in sample if not k.endswith(("_dates", "_mask"))]:
        mask = sample.get(f"{name}_mask")
        if mask is None:
            continue
        # numpy's any: torch's took 40-50 us a sensor of a 600 m tile, on the run's main thread
        seen = mask[0].flatten(1).cpu().numpy().any(1)
        if not seen.all():
            kept[name] = torch.from_numpy(np.flatnonzero(seen) if seen.any() else np.zeros(1, np.int64))
    return kept


def without_empty_dates(sample: Mapping[str, torch.Tensor]) -> Batch:
    """A B = 1 batch without the dates on which a sensor has no valid pixel (`kept_dates`)."""
    kept = kept_dates(sample)
    return {key: value.index_select(1, kept[_sensor(key)]) if _sensor(key) in kept else value
            for key, value in sample.items()}


def pad_stack(key: str, tensors: list[torch.Tensor], pin_memory: bool = False,
              kept: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Stack [T, ...] tensors along a new batch axis, padding T to the longest: pixels with
    0, masks with False, dates with the last date (finite, and masked anyway). `kept`: per
    tensor, the indices of its dates to take (None: all). Each tensor is copied once, into
    its row of the batch (a run's main thread stacks every tile it embeds)."""
    kept = kept or [None] * len(tensors)
    lengths = [x.shape[0] if k is None else len(k) for x, k in zip(tensors, kept)]
    t = max(lengths)
    out = torch.empty((len(tensors), t, *tensors[0].shape[1:]), dtype=tensors[0].dtype,
                      pin_memory=pin_memory)
    for row, x, k, n in zip(out, tensors, kept, lengths):
        if k is None:
            row[:n].copy_(x)
        else:
            torch.index_select(x, 0, k, out=row[:n])
        if n < t:
            row[n:] = row[n - 1] if key.endswith("_dates") else 0
    return out
