"""Per-pixel quality masks from the spec: Sentinel-2 SCL classes, Landsat QA_PIXEL bits."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..modalities import CloudMaskSpec


def invalid_pixels(quality: xr.DataArray, rule: CloudMaskSpec) -> xr.DataArray:
    """True where the quality band rejects a pixel. Pixels with no quality value (NaN, outside
    every item) are not rejected here: the data bands' nodata covers them."""
    known = quality.notnull()
    codes = quality.fillna(0).astype("uint32")
    if rule.invalid_classes:
        bad = codes.isin(list(rule.invalid_classes))
    else:
        bits = np.uint32(sum(1 << b for b in rule.invalid_bits))
        bad = (codes & bits) != 0
    return bad & known
