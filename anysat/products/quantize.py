"""int8 embeddings with a per-pixel scale (as TESSERA's layers): small layers, cosine
similarity to the float32 embeddings above 0.999 (see tests/unit/test_products.py).

    value = embedding * scale        (embedding int8 in [-127, 127], scale float32 per pixel)
    embedding == -128                no data (scale is NaN there)
"""

from __future__ import annotations

import numpy as np

NODATA = -128
RULE = "value = embedding * scale (scale per pixel); embedding -128 = no data"


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., D] float (NaN rows = no data) -> int8 [..., D] and scale [...]"""
    valid = np.isfinite(values).all(axis=-1)
    peak = np.abs(np.where(valid[..., None], values, 0)).max(axis=-1)
    scale = np.where(valid, np.where(peak > 0, peak / 127, 1.0), np.nan).astype("float32")
    safe = np.where(valid, scale, 1.0)[..., None]
    q = np.clip(np.rint(np.where(valid[..., None], values, 0) / safe), -127, 127).astype("int8")
    q[~valid] = NODATA
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse: float32 [..., D], NaN where no data."""
    values = q.astype("float32") * scale[..., None]
    values[q[..., 0] == NODATA] = np.nan
    return values
