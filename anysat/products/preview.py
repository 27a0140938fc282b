"""PCA-to-RGB preview of an embedding layer, as a PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .. import storage


def pca_rgb(embeddings: np.ndarray) -> np.ndarray:
    """[H, W, D] with NaN where empty -> [H, W, 4] uint8 RGBA (first 3 principal components,
    2-98 % stretched; empty pixels transparent)."""
    h, w, d = embeddings.shape
    flat = embeddings.reshape(-1, d)
    valid = np.isfinite(flat).all(axis=1)
    rgba = np.zeros((h * w, 4), dtype=np.uint8)
    if valid.sum() >= 2:
        x = flat[valid] - flat[valid].mean(axis=0)
        # principal axes from the D x D covariance (an SVD of x would build an N x D matrix)
        _, axes = np.linalg.eigh((x.T @ x).astype(np.float64))
        comps = x @ axes[:, ::-1][:, :3].astype(x.dtype)
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
        lo, hi = np.percentile(comps, [2, 98], axis=0)
        scaled = np.clip((comps - lo) / np.where(hi > lo, hi - lo, 1), 0, 1)
        rgba[valid, :3] = (scaled * 255).round().astype(np.uint8)
        rgba[valid, 3] = 255
    return rgba.reshape(h, w, 4)


def write_pca_preview(embeddings: np.ndarray, uri: str, min_side_px: int = 256) -> tuple[int, int]:
    """Write the preview PNG (nearest-upscaled to at least `min_side_px`); returns its size."""
    rgba = pca_rgb(embeddings)
    factor = max(1, int(np.ceil(min_side_px / max(rgba.shape[:2]))))
    image = Image.fromarray(rgba, mode="RGBA").resize(
        (rgba.shape[1] * factor, rgba.shape[0] * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return image.size
