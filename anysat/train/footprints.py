"""Pretraining footprints from the real pixels that ship with the repository, and a sampler
that draws a footprint, a chip size and chips per batch.

- `demo_footprint`: the demo catalog read through the same STAC -> cube path as a run
  (Sentinel-2 L2A, Sentinel-1 and the DEM, 12 monthly steps, 990 m in Belgium).
- `bigearthnet_footprints`: the six BigEarthNet S2 L2A + S1 patch pairs (1.2 km each;
  Austria, Ireland, Portugal, Finland; one date each), 20 m bands repeated onto the 10 m grid.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from ..modalities import ModalitySpec
from ..pipeline import days_since_epoch, load_tile_batch
from ..stac import resolve_provider
from .pretrain import ChipSampler

DEMO_BOUNDS = (664000.0, 5611130.0, 664990.0, 5612120.0)  # EPSG:32631, 990 m: 33 DEM pixels
DEMO_DATES = (dt.date(2020, 11, 1), dt.date(2021, 10, 31))


@dataclass
class Footprint:
    name: str
    batch: dict[str, torch.Tensor]      # B = 1: pixels, `_dates`, `_mask` per sensor
    gsd_m: dict[str, float]

    @property
    def side_m(self) -> float:
        name, gsd = next(iter(self.gsd_m.items()))
        return self.batch[name].shape[-1] * gsd


@dataclass(frozen=True)
class _Window:
    """An area of a UTM zone off the tile grid, read the way `load_tile_batch` reads a tile."""

    epsg: int
    bounds: tuple[float, float, float, float]

    @property
    def bbox_lonlat(self) -> tuple[float, float, float, float]:
        return Transformer.from_crs(self.epsg, 4326, always_xy=True).transform_bounds(*self.bounds)

    def geobox(self, gsd_m: float) -> GeoBox:
        return GeoBox.from_bbox(self.bounds, crs=f"EPSG:{self.epsg}", resolution=gsd_m)


def demo_footprint(specs: list[ModalitySpec]) -> Footprint:
    """Every sensor of `specs` the demo catalog has, over DEMO_BOUNDS (missing values 0,
    their masks False)."""
    batch, _ = load_tile_batch(resolve_provider("demo"), specs, _Window(32631, DEMO_BOUNDS),
                               *DEMO_DATES)
    gsd = {spec.name: spec.gsd_m for spec in specs if spec.name in batch}
    return Footprint("demo", {k: torch.nan_to_num(v) for k, v in batch.items()}, gsd)


def _read_band(path: Path, side_px: int) -> np.ndarray:
    with rasterio.open(path) as src:
        band = src.read(1).astype("float32")
    factor = side_px // band.shape[0]
    return np.repeat(np.repeat(band, factor, 0), factor, 1)  # 20 m -> the 10 m grid


def bigearthnet_footprints(folder: Path, s2: ModalitySpec, s1: ModalitySpec) -> list[Footprint]:
    """One footprint per S1/S2 pair. S2 DN / 1e4 = reflectance (sen2cor, baseline < 04.00);
    S1 is sigma0 in dB already."""
    footprints = []
    for s1_dir in sorted((folder / "S1").iterdir()):
        meta = json.loads(next(s1_dir.glob("*_labels_metadata.json")).read_text())
        s2_dir = folder / "S2" / meta["corresponding_s2_patch"]
        side = 120
        s2_values = np.stack([_read_band(next(s2_dir.glob(f"*_{b}.tif")), side)
                              for b in s2.band_names]) / 1e4
        s1_values = np.stack([_read_band(next(s1_dir.glob(f"*_{b.upper()}.tif")), side)
                              for b in s1.band_names])
        s2_date = dt.datetime.strptime(s2_dir.name.split("_")[2][:8], "%Y%m%d").date()
        s1_date = dt.date.fromisoformat(meta["acquisition_time"][:10])
        batch = {}
        for spec, values, date in ((s2, s2_values, s2_date), (s1, s1_values, s1_date)):
            x = torch.from_numpy(values.astype("float32"))[None, None]       # [1, 1, C, H, W]
            valid = torch.isfinite(x).all(dim=2) & (x != 0).any(dim=2)
            batch[spec.name] = torch.nan_to_num(x)
            batch[f"{spec.name}_mask"] = valid
            batch[f"{spec.name}_dates"] = days_since_epoch(np.array([date], "datetime64[D]"))[None]
        footprints.append(Footprint(f"bigearthnet/{s1_dir.name}", batch,
                                    {s2.name: s2.gsd_m, s1.name: s1.gsd_m}))
    return footprints


@dataclass
class FootprintSampler:
    """Per batch: one footprint (chance proportional to its area), one chip size from
    `chip_sizes_m` that fits it, then `ChipSampler` chips; `step_m` a common multiple of
    every GSD (30 m with the DEM)."""

    footprints: list[Footprint]
    chip_sizes_m: tuple[float, ...] = (60.0, 120.0)
    step_m: float = 30.0
    seed: int = 0
    samplers: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        for i, fp in enumerate(self.footprints):
            for chip in self.chip_sizes_m:
                if chip <= fp.side_m and math.isclose(chip / self.step_m, round(chip / self.step_m)):
                    self.samplers[(i, chip)] = ChipSampler(fp.batch, fp.gsd_m, chip, self.step_m,
                                                           seed=self.seed + 1000 * i + int(chip))
        if not self.samplers:
            raise ValueError("no chip size fits any footprint")
        areas = torch.tensor([self.footprints[i].side_m ** 2 for i, _ in self.samplers])
        self.weights = areas / areas.sum()

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        key = list(self.samplers)[int(torch.multinomial(self.weights, 1, generator=self.generator))]
        return self.samplers[key].sample(batch_size)
