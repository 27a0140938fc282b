"""The two probe tasks on real labels, each scoring raw inputs and any number of models.

- crop types (WorldCereal points, Uganda and South Sudan 2017): each point's 12 monthly
  Sentinel-2 L2A + Sentinel-1 values embedded as a pixel time series at the smallest
  footprint the sensors allow (tile embedding); stratified and spatially grouped folds.
- land cover (eo-learn, Slovenia 2015): five Sentinel-2 L1C dates embedded densely (one
  vector per 10 m pixel) in windows; spatially blocked folds.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import AnySat
from ..points import PointSeries, embed_points
from ..train.monitors import rankme
from .landcover import NO_DATA_CLASS, LandCoverScene
from .probes import cross_validate, grid_cells, grouped_folds, stratified_folds
from .worldcereal import LabelledPoints

RAW = "raw-features"
PROBES = ("logreg", "knn")
S2 = "sentinel-2-l2a"


def _normalise(values: np.ndarray, model: AnySat, sensor: str, band_axis: int) -> np.ndarray:
    spec = model.modalities[sensor]
    shape = [1] * values.ndim
    shape[band_axis] = -1
    z = (values - np.reshape(spec.mean, shape)) / np.reshape(spec.std, shape)
    return np.nan_to_num(z.astype("float32"), nan=0.0)


def raw_point_features(series: PointSeries, model: AnySat) -> np.ndarray:
    """Every sensor's values at every date, normalised as the model normalises them
    (missing = 0, the mean): [N, sum T*C]."""
    return np.concatenate([_normalise(v, model, name, 2).reshape(len(v), -1)
                           for name, v in series.values.items()], axis=1)


def _rows(task: str, method: str, features: np.ndarray, labels: np.ndarray,
          splits: dict[str, list], probes=PROBES, seed: int = 0) -> list[dict]:
    spread = rankme(torch.from_numpy(np.ascontiguousarray(features)))
    return [{"task": task, "method": method, "probe": probe, "split": split,
             **cross_validate(features, labels, folds, probe, seed).summary(),
             "rankme": round(spread, 2), "samples": len(labels)}
            for split, folds in splits.items() for probe in probes]


def crop_types(models: dict[str, AnySat], points: LabelledPoints, probes=PROBES,
               seed: int = 0) -> list[dict]:
    """Rows for raw features and each model (by method name) on the crop-type points."""
    splits = {"stratified": stratified_folds(points.labels, seed=seed),
              "spatial": grouped_folds(points.labels, grid_cells(points.lon, points.lat), seed=seed)}
    reference = next(iter(models.values()))
    rows = _rows("crop-types", RAW, raw_point_features(points.series, reference), points.labels,
                 splits, probes, seed)
    for method, model in models.items():
        rows += _rows("crop-types", method, embed_points(model, points.series), points.labels,
                      splits, probes, seed)
    return rows


@torch.inference_mode()
def dense_embeddings(model: AnySat, sensor: str, scene: LandCoverScene, window_px: int,
                     patch_size_m: float, batch_size: int = 16) -> np.ndarray:
    """[H, W, 2D] dense features of a scene (H, W multiples of window_px), embedded in
    windows of window_px x window_px pixels, `batch_size` windows per forward."""
    t, c, h, w = scene.values.shape
    rows, cols = h // window_px, w // window_px
    x = torch.from_numpy(scene.values).view(t, c, rows, window_px, cols, window_px)
    x = x.permute(2, 4, 0, 1, 3, 5).reshape(rows * cols, t, c, window_px, window_px)
    valid = torch.isfinite(x).all(dim=2)
    dates = torch.from_numpy(scene.dates)[None].expand(rows * cols, -1)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        batch = {sensor: torch.nan_to_num(x[i:i + batch_size]).to(device),
                 f"{sensor}_mask": valid[i:i + batch_size].to(device),
                 f"{sensor}_dates": dates[i:i + batch_size].to(device)}
        out.append(model(batch, patch_size_m, output="dense").float().cpu())
    dense = torch.cat(out)                                    # [rows*cols, wp, wp, 2D]
    d = dense.shape[-1]
    return dense.view(rows, cols, window_px, window_px, d).permute(0, 2, 1, 3, 4).reshape(h, w, d).numpy()


def land_cover(models: dict[str, AnySat], scene: LandCoverScene, window_px: int = 20,
               patch_size_m: float = 20.0, block_px: int = 20, min_class_px: int = 50,
               pixel_step: int = 2, probes=PROBES, seed: int = 0) -> list[dict]:
    """Rows for raw features and each model's dense features, per pixel (every pixel_step-th
    row and column: neighbours add little and cost much), folds of whole block_px x block_px
    blocks (no block in both train and test). Classes with fewer than min_class_px pixels
    (and no-data pixels) are left out."""
    side = (min(scene.labels.shape) // window_px) * window_px
    scene = scene.crop(side)
    labels = scene.labels.reshape(-1)
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    blocks = ((yy // block_px) * (side // block_px) + xx // block_px).reshape(-1)
    classes, counts = np.unique(labels, return_counts=True)
    sampled = ((yy % pixel_step == 0) & (xx % pixel_step == 0)).reshape(-1)
    keep = sampled & np.isin(labels, classes[(counts >= min_class_px) & (classes != NO_DATA_CLASS)])
    splits = {"spatial-blocks": grouped_folds(labels[keep], blocks[keep], seed=seed)}
    reference = next(iter(models.values()))
    t, c = scene.values.shape[:2]
    raw = _normalise(scene.values, reference, S2, 1).transpose(2, 3, 0, 1).reshape(side * side, t * c)
    rows = _rows("land-cover", RAW, raw[keep], labels[keep], splits, probes, seed)
    for method, model in models.items():
        dense = dense_embeddings(model, S2, scene, window_px, patch_size_m)
        rows += _rows("land-cover", method, dense.reshape(side * side, -1)[keep], labels[keep],
                      splits, probes, seed)
    return rows
