"""A fixed tile grid per UTM zone: tile ids depend only on zone, tile size and position."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
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


def square_order(cols: np.ndarray, rows: np.ndarray, origin: tuple[int, int],
                 side: int = 16) -> np.ndarray:
    """Indices that order grid cells by `side` x `side` squares counted from `origin` (a
    north-west tile: column, row), north to south then west to east, and inside each square
    in Z (Morton) order: every aligned run of 4 or 16 cells is a 2 x 2 or 4 x 4 square, so
    consecutive tiles make compact blocks to read (row-major runs of a wide region are 1-tile
    strips)."""
    c = np.asarray(cols, dtype=np.int64) - origin[0]
    r = origin[1] - np.asarray(rows, dtype=np.int64)  # rows grow northwards
    cm, rm = c % side, r % side
    z = np.zeros(len(c), dtype=np.int64)
    for bit in range(int(side - 1).bit_length()):
        z |= ((cm >> bit) & 1) << (2 * bit) | ((rm >> bit) & 1) << (2 * bit + 1)
    return np.lexsort((z, c // side, r // side))


def square_index(cols, rows, west, north, side: int):
    """Column and row of the `side` x `side` square each grid cell lies in, counted from the
    north-west cell (`west`, `north`) of its extent; scalars or arrays."""
    return (cols - west) // side, (north - rows) // side


def square_groups(tiles: list[Tile], extents: list[tuple[int, int, int, int]], side: int
                  ) -> list[tuple[list[Tile], tuple[Tile, Tile]]]:
    """The tiles grouped by the `side` x `side` square each lies in, counted from the
    north-west corner of its extent (west column, north row, east column, south row: a fixed
    part of its zone's grid, such as a search block's tiles), in order of first appearance;
    with each group, the north-west and south-east tiles of its square cut to the extent. A
    tile read inside that box gets the same pixels whichever of its neighbours are read with
    it."""
    groups: dict[tuple, list[Tile]] = {}
    for tile, extent in zip(tiles, extents):
        west, north = extent[0], extent[1]
        key = (tile.epsg, extent, *square_index(tile.col, tile.row, west, north, side))
        groups.setdefault(key, []).append(tile)
    out = []
    for (epsg, (west, north, east, south), kc, kr), members in groups.items():
        col, row, size = west + kc * side, north - kr * side, members[0].size_m
        out.append((members, (Tile(epsg, col, row, size),
                              Tile(epsg, min(col + side - 1, east), max(row - side + 1, south), size))))
    return out


def block_geobox(tiles: Sequence[Tile], gsd_m: float) -> GeoBox:
    """The pixel grid at `gsd_m` over the tiles' bounding box: every tile's own geobox is a
    window of it (both snap to the same multiples of the GSD)."""
    b = np.array([t.bounds for t in tiles])
    bounds = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    return GeoBox.from_bbox(bounds, crs=f"EPSG:{tiles[0].epsg}", resolution=gsd_m)


@dataclass(frozen=True)
class ZoneTiles:
    """The tiles of one UTM zone's grid that a region covers, as arrays (a continent's
    millions of tiles never become a Python object each), row-major from the north-west."""

    epsg: int
    size_m: float
    cols: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.cols)

    @property
    def area_km2(self) -> float:
        return len(self) * self.size_m ** 2 / 1e6

    def tiles(self) -> list[Tile]:
        return [Tile(self.epsg, int(c), int(r), self.size_m) for c, r in zip(self.cols, self.rows)]


def utm_zones(region_lonlat: BaseGeometry) -> dict[int, BaseGeometry]:
    """The region's part in each UTM zone it touches (6-degree strips, north and south of
    the equator; the Norway/Svalbard exceptions are not applied), by EPSG code."""
    west, south, east, north = region_lonlat.bounds
    parts = {}
    for zone in range(int((west + 180) // 6) + 1, min(int((east + 180) // 6) + 1, 60) + 1):
        lon0 = -180 + 6 * (zone - 1)
        for base, lat0, lat1 in ((32600, 0, 90), (32700, -90, 0)):
            part = region_lonlat.intersection(box(lon0, lat0, lon0 + 6, lat1))
            if not part.is_empty and part.area > 0:
                parts[base + zone] = part
    return parts


def zone_tiles(region_lonlat: BaseGeometry, tile_size_m: float, epsg: int,
               block_rows: int = 256) -> ZoneTiles:
    """The tiles of zone `epsg`'s grid whose interior meets the region, found with vectorised
    shapely over blocks of grid rows (memory bounded by one block)."""
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    region = shapely_transform(to_utm.transform, region_lonlat.segmentize(0.01))
    shapely.prepare(region)
    s = tile_size_m
    x0, y0, x1, y1 = region.bounds
    cols = np.arange(math.floor(x0 / s), math.ceil(x1 / s))
    all_rows = np.arange(math.ceil(y1 / s) - 1, math.floor(y0 / s) - 1, -1)
    found_cols, found_rows = [], []
    for start in range(0, len(all_rows), block_rows):
        rr, cc = np.meshgrid(all_rows[start:start + block_rows], cols, indexing="ij")
        boxes = shapely.box(cc * s, rr * s, (cc + 1) * s, (rr + 1) * s)
        # touching at an edge or corner only is no overlap
        hit = shapely.intersects(region, boxes) & ~shapely.touches(region, boxes)
        found_cols.append(cc[hit])
        found_rows.append(rr[hit])
    return ZoneTiles(epsg, s, np.concatenate(found_cols) if found_cols else cols[:0],
                     np.concatenate(found_rows) if found_rows else cols[:0])


def plan_zones(region_lonlat: BaseGeometry, tile_size_m: float) -> list[ZoneTiles]:
    """The region split per UTM zone, each part on its zone's tile grid: every place in
    exactly one zone, tile ids stable between runs."""
    return [zone_tiles(part, tile_size_m, epsg) for epsg, part in sorted(utm_zones(region_lonlat).items())]


def plan_tiles(region_lonlat: BaseGeometry, tile_size_m: float, epsg: int | None = None) -> list[Tile]:
    """Tiles of one zone's grid that intersect the region, row-major from the north-west
    (the zone of the region's centroid unless `epsg` is given)."""
    centroid = region_lonlat.centroid
    epsg = epsg or utm_epsg(centroid.x, centroid.y)
    return zone_tiles(region_lonlat, tile_size_m, epsg).tiles()
