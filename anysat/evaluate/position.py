"""How much of an embedding layer is explained by a patch's position inside its tile (a
model that encodes its tiling, not the land, paints tile-shaped plaid)."""

from __future__ import annotations

import numpy as np


def position_omega2(layer: np.ndarray, tile_px: int) -> float:
    """Chance-corrected omega^2 of a one-way ANOVA of the layer [y, x, D] (NaN = no data;
    tiles start at pixel 0) over the within-tile positions, sums of squares pooled over the
    D dimensions: about 0 when position explains nothing, 1 when it explains everything."""
    h, w, d = layer.shape
    yy, xx = np.meshgrid(np.arange(h) % tile_px, np.arange(w) % tile_px, indexing="ij")
    groups = (yy * tile_px + xx).reshape(-1)
    values = layer.reshape(-1, d).astype("float64")
    ok = np.isfinite(values).all(axis=1)
    values, groups = values[ok], groups[ok]
    n, k = len(values), len(np.unique(groups))
    if k < 2 or n <= k:
        raise ValueError(f"need more patches than positions ({n} patches, {k} positions)")
    counts = np.bincount(groups)
    sums = np.zeros((len(counts), d))
    np.add.at(sums, groups, values)
    present = counts > 0
    group_means = sums[present] / counts[present, None]
    grand = values.mean(axis=0)
    ss_between = float((counts[present, None] * (group_means - grand) ** 2).sum())
    ss_total = float(((values - grand) ** 2).sum())
    ms_within = (ss_total - ss_between) / (n - k)
    return (ss_between - (k - 1) * ms_within) / (ss_total + ms_within)
