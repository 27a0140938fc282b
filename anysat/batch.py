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


def stack_samples(samples: list[Batch], pin_memory: bool = False) -> Batch:
    """B = 1 batches with the same keys (pixels, `_mask`, `_dates` per sensor) -> one batch,
    in page-locked memory if `pin_memory` (copied to a GPU without blocking the host)."""
    keys = samples[0].keys()
    if any(s.keys() != keys for s in samples):
        raise ValueError("samples to stack must hold the same sensors")
    return {key: pad_stack(key, [s[key][0] for s in samples], pin_memory) for key in keys}


def without_empty_dates(sample: Mapping[str, torch.Tensor]) -> Batch:
    """A B = 1 batch without the dates on which a sensor has no valid pixel (a cloud over the
    whole tile): they weigh nothing in the model's output (a time series pools over its valid
    dates only, a single image takes each pixel's latest valid date), yet an accelerator
    computes every pixel-date (it never waits to look at the mask). A sensor with no valid
    pixel at all keeps its first date, so that it keeps its shape."""
    out = dict(sample)
    for name in [k for k in out if not k.endswith(("_dates", "_mask"))]:
        mask = out.get(f"{name}_mask")
        if mask is None:
            continue
        # numpy's any: torch's took 40-50 us a sensor of a 600 m tile, on the run's main thread
        seen = mask[0].flatten(1).cpu().numpy().any(1)
        if seen.all():
            continue
        keep = torch.from_numpy(np.flatnonzero(seen) if seen.any() else np.zeros(1, np.int64))
        for key in (name, f"{name}_dates", f"{name}_mask"):
            out[key] = out[key].index_select(1, keep)
    return out


def pad_stack(key: str, tensors: list[torch.Tensor], pin_memory: bool = False) -> torch.Tensor:
    """Stack [T, ...] tensors along a new batch axis, padding T to the longest: pixels with
    0, masks with False, dates with the last date (finite, and masked anyway)."""
    t = max(x.shape[0] for x in tensors)
    padded = []
    for x in tensors:
        if x.shape[0] < t:
            fill = (x[-1:].expand(t - x.shape[0], *x.shape[1:]) if key.endswith("_dates")
                    else torch.zeros(t - x.shape[0], *x.shape[1:], dtype=x.dtype))
            x = torch.cat([x, fill.to(x.dtype)])
        padded.append(x)
    if not pin_memory:
        return torch.stack(padded)
    out = torch.empty((len(padded), *padded[0].shape), dtype=padded[0].dtype, pin_memory=True)
    return torch.stack(padded, out=out)
