"""The eo-learn Slovenia land-cover scene: five Sentinel-2 L1C dates (13 bands, TOA
reflectance, 10 m, EPSG:32633) and a per-pixel land-cover mask (`LULC_labels.tif`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnySatError

LABEL_FILE = "LULC_labels.tif"
SCENE_PATTERN = re.compile(r"S2L1C_SI_(\d{4}-\d{2}-\d{2})_13band\.tif$")
NO_DATA_CLASS = 0
CLASS_NAMES = {1: "cultivated", 2: "forest", 3: "grassland", 4: "shrubland", 8: "artificial"}


@dataclass
class LandCoverScene:
    """values [T, C, H, W] TOA reflectance of the sensor's bands (NaN missing), dates [T]
    days since 1970, labels [H, W] (0 = no data), gsd_m."""

    values: np.ndarray
    dates: np.ndarray
    labels: np.ndarray
    gsd_m: float

    def crop(self, side_px: int) -> LandCoverScene:
        return self.window(0, 0, side_px)

    def window(self, row: int, col: int, side_px: int) -> LandCoverScene:
        rows, cols = slice(row, row + side_px), slice(col, col + side_px)
        return LandCoverScene(self.values[..., rows, cols], self.dates, self.labels[rows, cols],
                              self.gsd_m)


def read_land_cover(folder: str | Path, bands: list[str]) -> LandCoverScene:
    """The scene with the named bands (e.g. the S2 spec's B02..B12), dates in order."""
    import rasterio  # here: the crop-type task alone runs where rasterio is not installed

    folder = Path(folder)
    scenes = sorted((m.group(1), p) for p in folder.glob("*.tif")
                    if (m := SCENE_PATTERN.search(p.name)))
    if not scenes or not (folder / LABEL_FILE).exists():
        raise AnySatError(f"{folder}: expected S2L1C_SI_<date>_13band.tif scenes and {LABEL_FILE}")
    stacks = []
    for _, path in scenes:
        with rasterio.open(path) as src:
            names = list(src.descriptions)
            missing = [b for b in bands if b not in names]
            if missing:
                raise AnySatError(f"{path.name} has no band(s) {missing}; it has {names}")
            stacks.append(src.read([names.index(b) + 1 for b in bands]).astype("float32"))
            gsd = abs(src.transform.a)
    with rasterio.open(folder / LABEL_FILE) as src:
        labels = src.read(1).astype("int64")
    dates = np.array([d for d, _ in scenes], dtype="datetime64[D]").astype("int64")
    return LandCoverScene(np.stack(stacks), dates.astype("float32"), labels, round(gsd))
