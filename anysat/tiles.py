"""A fixed tile grid per UTM zone: tile ids depend only on zone, tile size and position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from odc.geo.geobox import GeoBox
from pyproj import Transformer
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from shapely.ops import transform as shapely_transform


def utm_epsg(lon: float, lat: float) -> int:
    zone = min(int((lon + 180) // 6) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


@dataclass(frozen=True)
class Tile:
    """Square tile `size_m` wide at grid position (col, row) of a UTM zone (EPSG code)."""

    epsg: int
    col: int
    row: int
    size_m: float

    @property
    def id(self) -> str:
        return f"{self.epsg}_{self.size_m:g}m_{self.col}_{self.row}"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        s = self.size_m
        return (self.col * s, self.row * s, (self.col + 1) * s, (self.row + 1) * s)

    @property
    def area_km2(self) -> float:
        return self.size_m**2 / 1e6

    def geobox(self, gsd_m: float) -> GeoBox:
        return GeoBox.from_bbox(self.bounds, crs=f"EPSG:{self.epsg}", resolution=gsd_m)

    @cached_property
    def bbox_lonlat(self) -> tuple[float, float, float, float]:
        to_lonlat = Transformer.from_crs(self.epsg, 4326, always_xy=True)
        return to_lonlat.transform_bounds(*self.bounds)


def plan_tiles(region_lonlat: BaseGeometry, tile_size_m: float, epsg: int | None = None) -> list[Tile]:
    """Tiles of the grid that intersect the region, row-major from the north-west."""
    centroid = region_lonlat.centroid
    epsg = epsg or utm_epsg(centroid.x, centroid.y)
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    region = shapely_transform(to_utm.transform, region_lonlat.segmentize(0.01))
    x0, y0, x1, y1 = region.bounds
    cols = range(math.floor(x0 / tile_size_m), math.ceil(x1 / tile_size_m))
    rows = range(math.ceil(y1 / tile_size_m) - 1, math.floor(y0 / tile_size_m) - 1, -1)
    tiles = [Tile(epsg, c, r, tile_size_m) for r in rows for c in cols]
    return [t for t in tiles if box(*t.bounds).intersection(region).area > 0]
