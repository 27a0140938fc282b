"""The saved run plan: what a run does, decided once and written under its output URI.

- `plan.json`: the request's fingerprint (everything the embeddings depend on: region, dates,
  sensors, sizes, catalog, model and its weights' sha256...) and its hash, the zones with
  their layer grids. Written last, so its presence means the plan is complete.
- `plan/tiles.parquet` (GeoParquet): one row per tile: id, zone (EPSG), grid column and row,
  footprint in lon/lat, block, how many items it has per sensor, and `status` (`pending`, or
  `no-items` where no sensor has an item). Fixed-width rows: every worker reads the table
  whole (a continent's 1.6 M tiles), so a tile's item ids are not in it.
- `plan/items/<block>.json`: the STAC items one search of a block of tiles found (hrefs
  absolute and unsigned: signing happens at read time, so no token is stored), and under
  `tiles` each of the block's tiles' items per sensor, as positions in `features`: a worker
  reads the blocks it embeds.

Embedding reads the items from the plan, never searching again, so a resumed tile sees
the catalog as the plan did. A rerun into the same output with another request is refused,
naming what differs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import cached_property, lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pystac
import shapely
from pyproj import Transformer
from shapely.geometry import box, shape

from . import geoparquet, storage
from .cube.load import plain_item
from .errors import AnySatError, RequestError
from .modalities import ModalitySpec
from .products.zarr_layer import LayerGrid
from .request import RegionRequest
from .stac import search_sensors
from .tiles import Tile, ZoneTiles, plan_zones, square_groups, square_index, square_order

log = logging.getLogger("anysat")

PLAN_VERSION = 2  # 2: item ids per tile moved from the tile table to the block files
MAX_TILES = 5_000_000  # tiles one plan holds (its table is read whole by each worker)
WARN_TILES = 100_000
BLOCK_TILES = 16  # a block is up to 16 x 16 tiles of one zone's grid, searched once
# Blocks searched at once on a STAC API (`ANYSAT_SEARCH_THREADS`): a block's search is a few
# paged requests of 1-3 s, and Europe at 2,560 m is some 6,000 blocks, hours in turn. A
# static catalog is searched in turn (in memory, and pystac resolves its links unlocked).
SEARCH_THREADS = 8
# Tiles read as one box: up to READ_SIDE x READ_SIDE, their cubes up to READ_BYTES (a reader
# holds a square's cubes at once, about 3x that at its peak with the tiles' copies). A
# square's read costs about the same whatever its area (per asset: an open, odc-stac's
# set-up): on 2 cores, 256 tiles of 600 m read at 16-18 km2/s in squares of 8 x 8 against 8
# in 4 x 4, 16 tiles of 2,400 m at 52 in 4 x 4 against 28 in 2 x 2, and 4 x 4 tiles of 600 m
# read 10x faster than tile by tile. Bytes, not km2: a year of S2 holds 6x the demo's dates.
READ_SIDE, READ_BYTES = 8, 2**30
OLD_READ_SIDE = 4  # what plans saved without `read_side` read in
# What the embeddings depend on; batch sizes, device and output location do not.
FINGERPRINT_FIELDS = ("bbox", "geojson", "start", "end", "sensors", "patch_size_m",
                      "tile_size_m", "catalog", "model", "max_cloud", "time_bin",
                      "cube_backend", "dtype", "quantize")


class PlanMismatchError(AnySatError):
    """The output already holds the plan of another request."""


def fingerprint(request: RegionRequest, specs: list[ModalitySpec], model_sha256: str) -> dict:
    fields = request.model_dump(mode="json", include=set(FINGERPRINT_FIELDS))
    # what the layer holds, so `auto` and the dtype it resolves to are the same run
    quantize = "int8" if request.layer_dtype == "int8" else "none"
    naming = {"catalog_naming": request.catalog_naming} if request.catalog_naming else {}
    return {**fields, **naming, "quantize": quantize, "sensors": [s.name for s in specs],
            "model_sha256": model_sha256}


def fingerprint_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ZonePlan:
    epsg: int
    grid: LayerGrid
    tiles: int

    @property
    def area_km2(self) -> float:
        return self.tiles * self.grid.tile_size_m ** 2 / 1e6


@dataclass(frozen=True, eq=False)
class RunPlan:
    uri: str                    # the run's output URI
    request: RegionRequest
    fingerprint: dict
    hash: str
    zones: tuple[ZonePlan, ...]
    tiles: pd.DataFrame         # one row per tile, indexed by tile id (no geometry column)
    sensors: tuple[str, ...]
    read_side: int              # tiles a side of a reading square (`reading_blocks`)

    @property
    def plan_uri(self) -> str:
        return storage.join(self.uri, "plan.json")

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, "run.json")

    @property
    def area_km2(self) -> float:
        return sum(z.area_km2 for z in self.zones)

    @property
    def tile_ids(self) -> list[str]:
        return list(self.tiles.index)

    def zone(self, epsg: int) -> ZonePlan:
        return next(z for z in self.zones if z.epsg == epsg)

    def layer_uri(self, epsg: int) -> str:
        p = self.request.patch_size_m
        return storage.join(self.uri, "embeddings", f"EPSG{epsg}_patch{p:g}m.zarr")

    def preview_uri(self, epsg: int) -> str:
        return storage.join(self.uri, "preview", f"EPSG{epsg}_pca.png")

    def marker_uri(self, tile_id: str) -> str:
        return storage.join(self.uri, "tiles", f"{tile_id}.json")

    @cached_property
    def block_extents(self) -> dict[str, tuple[int, int, int, int]]:
        """Each search block's tiles' extent (west column, north row, east column, south
        row): where its reading squares start and end (`reading_blocks`)."""
        g = self.tiles.groupby("block")
        extent = g.agg(west=("col", "min"), north=("row", "max"), east=("col", "max"),
                       south=("row", "min"))
        return {b: tuple(int(v) for v in row) for b, row in zip(extent.index, extent.to_numpy())}

    def in_reading_order(self, tile_ids: list[str]) -> list[str]:
        """The tiles search block by search block (zone by zone, in the plan's order), each
        block's in `square_order` from its north-west tile: consecutive tiles are read as
        compact blocks, and no reading square straddles two search blocks (two block runs
        of a continental flow)."""
        rows = self.tiles.loc[tile_ids, ["col", "row", "block"]]
        ordered: list[str] = []
        for block, part in rows.groupby("block", sort=False):
            order = square_order(part["col"].to_numpy(), part["row"].to_numpy(),
                                 self.block_extents[block][:2], BLOCK_TILES)
            ordered += list(part.index[order])
        return ordered

    def reading_blocks(self, tiles: list[Tile]) -> list[tuple[list[Tile], tuple[Tile, Tile]]]:
        """The tiles grouped as they are read: by squares of `read_side` x `read_side` tiles
        from their search block's north-west tile, each group with the corners of its square
        cut to the search block's tiles, whose box is read. Fixed by the plan (saved in it):
        neither the batch size, nor the tiles a resumed run has left, nor another version's
        READ_SIDE change what a tile reads."""
        if not tiles:
            return []
        blocks = self.tiles.loc[[t.id for t in tiles], "block"]
        return square_groups(tiles, [self.block_extents[b] for b in blocks], self.read_side)

    def task_batches(self, tile_ids: list[str], size: int) -> list[list[str]]:
        """The tiles in reading order, in batches (task runs) of whole reading squares, up
        to `size` tiles each, or one square where a square holds more. A square split
        between tasks would be read once by each, whole: its box is fixed by the plan."""
        ids = self.in_reading_order(tile_ids)
        if not ids:
            return []
        rows = self.tiles.loc[ids, ["col", "row", "block"]]
        extents = pd.DataFrame.from_dict(self.block_extents, orient="index",
                                         columns=["west", "north", "east", "south"])
        corner = extents.loc[rows["block"], ["west", "north"]].to_numpy()
        square = np.stack([pd.factorize(rows["block"])[0],
                           *square_index(rows["col"].to_numpy(), rows["row"].to_numpy(),
                                         corner[:, 0], corner[:, 1], self.read_side)], axis=1)
        # a square's tiles are consecutive in reading order (its side divides BLOCK_TILES)
        starts = np.flatnonzero(np.r_[True, (square[1:] != square[:-1]).any(axis=1)])
        batches, first = [], 0
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            if end - first > size and start > first:
                batches.append(ids[first:start])
                first = start
        return [*batches, ids[first:]]

    def tile(self, tile_id: str) -> Tile:
        row = self.tiles.loc[tile_id]
        return Tile(int(row["epsg"]), int(row["col"]), int(row["row"]), self.request.tile_size_m)

    def items(self, tile_id: str) -> dict[str, list[pystac.Item]]:
        """The items of each sensor over the tile (sensors without any are left out), in the
        order the search gave them (by date)."""
        items, tiles = _block_items(self.uri, self.hash, self.tiles.at[tile_id, "block"])
        return {s: [items[i] for i in positions] for s, positions in tiles[tile_id].items()
                if positions}


@lru_cache(maxsize=64)
def _block_items(uri: str, plan_hash: str, block: str
                 ) -> tuple[list[pystac.Item], dict[str, dict[str, list[int]]]]:
    """A block's items, and each of its tiles' per sensor (positions in the items)."""
    # keyed by the plan's hash too: a long-lived worker may see an output planned anew
    raw = json.loads(storage.read_bytes(_items_uri(uri, block)))
    return ([pystac.Item.from_dict(f, preserve_dict=False) for f in raw["features"]],
            raw["tiles"])


def _items_uri(uri: str, block: str) -> str:
    return storage.join(uri, "plan", "items", f"{block}.json")


def _tiles_uri(uri: str) -> str:
    return storage.join(uri, "plan", "tiles.parquet")


def tile_footprints(zone: ZoneTiles) -> np.ndarray:
    """Each tile's square as a lon/lat polygon; a tile across the antimeridian becomes the
    multipolygon of its two sides."""
    s = zone.size_m
    corners = np.array([(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)], dtype=float)
    x = (zone.cols[:, None] + corners[:, 0]) * s
    y = (zone.rows[:, None] + corners[:, 1]) * s
    lon, lat = Transformer.from_crs(zone.epsg, 4326, always_xy=True).transform(x, y)
    crosses = (lon.max(axis=1) - lon.min(axis=1)) > 180
    lon = np.where(crosses[:, None] & (lon < 0), lon + 360, lon)
    polygons = shapely.polygons(np.stack([lon, lat], axis=-1))
    if crosses.any():
        east = shapely.intersection(polygons[crosses], box(-180, -90, 180, 90))
        west = shapely.transform(shapely.intersection(polygons[crosses], box(180, -90, 540, 90)),
                                 lambda xy: xy - [360, 0])
        polygons[crosses] = shapely.union(east, west)
    return polygons


def _search_block(request: RegionRequest, specs: list[ModalitySpec], footprints: np.ndarray
                  ) -> dict[str, list[pystac.Item]]:
    """One search (per group of sensors, paged) over a block: its tiles' union in lon/lat,
    as a bbox unless it crosses the antimeridian."""
    region = shapely.union_all(footprints)
    west, south, east, north = region.bounds
    where = region if east - west > 180 else (west, south, east, north)
    return search_sensors(request.provider(), specs, where, request.start,
                          request.end, max_cloud=request.max_cloud)


def _zone_blocks(zone: ZoneTiles) -> np.ndarray:
    return np.array([f"{zone.epsg}_{c}_{r}" for c, r in zip(zone.cols // BLOCK_TILES,
                                                              zone.rows // BLOCK_TILES)])


def _members(blocks: np.ndarray) -> dict[str, np.ndarray]:
    """Each block's tiles (their positions, ascending), blocks in order of first appearance:
    one sort, not a comparison over the zone per block (1.5 s for a zone of 240,000 tiles)."""
    names, first, inverse = np.unique(blocks, return_index=True, return_inverse=True)
    by_block = np.argsort(inverse, kind="stable")
    ends = np.cumsum(np.bincount(inverse, minlength=len(names)))
    starts = ends - np.bincount(inverse, minlength=len(names))
    return {str(names[k]): by_block[starts[k]:ends[k]] for k in np.argsort(first)}


def _plan_zone(uri: str, request: RegionRequest, specs: list[ModalitySpec], zone: ZoneTiles,
               found_ids: dict[str, set[str]]) -> pa.Table:
    """Search each block of the zone once, assign items to tiles by footprint, write each
    block's items and its tiles' share of them; the zone's rows of the tile table (their
    item counts). `found_ids` gathers each sensor's distinct item ids."""
    footprints = tile_footprints(zone)
    blocks = _zone_blocks(zone)
    ids = np.array([f"{zone.epsg}_{zone.size_m:g}m_{c}_{r}" for c, r in zip(zone.cols, zone.rows)])
    counts = {s.name: np.zeros(len(zone), dtype="int32") for s in specs}
    members_of = _members(blocks)
    searches = _in_order(list(members_of), lambda block: _search_block(
        request, specs, footprints[members_of[block]]), _search_threads(request))
    for block, found in searches:
        members = members_of[block]
        tree = shapely.STRtree(footprints[members])
        kept: dict[str, int] = {}   # item id -> its position in the block's features
        features: list[dict] = []
        tiles: dict[str, dict[str, list[int]]] = {tile: {} for tile in ids[members]}
        for sensor, items in found.items():
            geoms = np.array([shape(i.geometry) for i in items], dtype=object)
            if not len(geoms):
                continue
            item_idx, tile_idx = tree.query(geoms, predicate="intersects")
            for i, t in sorted(zip(item_idx, tile_idx)):  # the search's (date) order per tile
                if items[i].id not in kept:
                    kept[items[i].id] = len(features)
                    features.append(plain_item(items[i]))
                tiles[ids[members[t]]].setdefault(sensor, []).append(kept[items[i].id])
                counts[sensor][members[t]] += 1
            found_ids[sensor].update(items[i].id for i in set(item_idx.tolist()))
        collection = {"type": "FeatureCollection", "features": features, "tiles": tiles}
        storage.write_bytes_atomic(_items_uri(uri, block), json.dumps(collection).encode())
        log.info("block %s: %d tiles, %s", block, len(members),
                 ", ".join(f"{len(v)} {k} items" for k, v in found.items()))
    has_items = np.logical_or.reduce([c > 0 for c in counts.values()])
    columns = {
        "id": ids,
        "epsg": np.full(len(zone), zone.epsg, dtype="int32"),
        "col": zone.cols.astype("int64"), "row": zone.rows.astype("int64"),
        "block": blocks, "status": np.where(has_items, "pending", "no-items"),
        **{f"n_items.{s}": c for s, c in counts.items()},
    }
    return geoparquet.with_geometry(columns, footprints)


def _search_threads(request: RegionRequest) -> int:
    from .readers import count_from_env  # readers imports this module

    if request.provider().kind == "static":
        return 1
    return count_from_env("ANYSAT_SEARCH_THREADS", SEARCH_THREADS, "blocks searched at once")


def _in_order(blocks: list[str], search, threads: int) -> Iterator[tuple[str, object]]:
    """(block, search(block)) in the blocks' order, up to `threads` searches running at once
    and at most twice that many results waiting: memory stays flat in the number of blocks."""
    if threads == 1:
        yield from ((block, search(block)) for block in blocks)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="search")
    try:
        waiting: deque = deque()
        for block in blocks:
            waiting.append((block, pool.submit(search, block)))
            if len(waiting) >= 2 * threads:
                done, future = waiting.popleft()
                yield done, future.result()
        while waiting:
            done, future = waiting.popleft()
            yield done, future.result()
    finally:  # a failed search: the others not started are dropped
        pool.shutdown(cancel_futures=True)


def read_side(tile_bytes: int, most: int = READ_SIDE) -> int:
    """Tiles a side of a reading square: `most`, halved while the square's cubes, at
    `tile_bytes` a tile, would pass READ_BYTES."""
    side = most
    while side > 1 and side * side * tile_bytes > READ_BYTES:
        side //= 2
    return side


def tile_read_bytes(table: pa.Table, specs: list[ModalitySpec], tile_size_m: float) -> int:
    """The most bytes a tile's cubes take in a reader: float32, every band and the cloud
    mask, a plane per item over the tile (items of one day are mosaicked: fewer)."""
    total = 0.0
    for spec in specs:
        items = pc.max(table.column(f"n_items.{spec.name}")).as_py() or 0
        planes = items * (len(spec.bands) + (1 if spec.cloud_mask else 0))
        total += planes * (tile_size_m / spec.gsd_m) ** 2 * 4
    return int(total)


def read_plan(uri: str, request: RegionRequest | None = None) -> RunPlan | None:
    """The plan saved under an output URI, or None when there is none (yet). `request` gives
    the run's options that do not change the embeddings (batch size, device); without it
    they are the defaults."""
    uri = storage.normalize_uri(uri)
    plan_uri = storage.join(uri, "plan.json")
    if not storage.exists(plan_uri):
        return None
    saved = json.loads(storage.read_bytes(plan_uri))
    if saved.get("version") != PLAN_VERSION:
        raise PlanMismatchError(f"{plan_uri} is a plan of version {saved.get('version')}, this "
                                f"anysat writes version {PLAN_VERSION}; use another output")
    columns = ["id", "epsg", "col", "row", "block", "status",
               *(f"n_items.{s}" for s in saved["fingerprint"]["sensors"])]  # not the footprints
    tiles = geoparquet.read(_tiles_uri(uri), columns).to_pandas().set_index("id")
    zones = tuple(ZonePlan(z["epsg"], LayerGrid(**z["grid"]), z["tiles"]) for z in saved["zones"])
    fields = saved["fingerprint"]
    if request is None:
        request = RegionRequest.model_validate(
            {**{k: fields[k] for k in FINGERPRINT_FIELDS}, "output_uri": uri})
    return RunPlan(uri, request, fields, saved["hash"], zones, tiles, tuple(fields["sensors"]),
                   saved.get("read_side", OLD_READ_SIDE))


@lru_cache(maxsize=4)
def _cached_plan(uri: str, plan_hash: str) -> RunPlan:
    plan = read_plan(uri)
    if plan is None or plan.hash != plan_hash:
        raise PlanMismatchError(f"the plan under {uri} was removed or replaced during the run")
    return plan


def plan_for_worker(request: RegionRequest, plan_hash: str, uri: str | None = None) -> RunPlan:
    """The plan a task works from (under `uri`, by default the request's output), read once
    per process, with the run's own options."""
    uri = storage.normalize_uri(uri or request.output_uri)
    return replace(_cached_plan(uri, plan_hash), request=request)


def check_same_request(saved: RunPlan, fields: dict) -> None:
    """Refuse to resume into an output planned for another request, naming each difference."""
    if saved.hash == fingerprint_hash(fields):
        return
    differs = [f"{k}: planned {saved.fingerprint.get(k)!r}, now {fields.get(k)!r}"
               for k in sorted(set(fields) | set(saved.fingerprint))
               if saved.fingerprint.get(k) != fields.get(k)]
    raise PlanMismatchError(
        f"output {saved.uri} holds a run planned for another request ({'; '.join(differs)}); "
        "use another output or remove this one (resuming would mix both runs in one layer)")


def check_run_size(request: RegionRequest) -> None:
    """Refuse a plan too big to hold (ANYSAT_MAX_TILES, default 5 M tiles) and warn, with the
    estimate, before a very large one."""
    area = request.area_km2
    tiles = area / (request.tile_size_m / 1000) ** 2
    limit = int(os.environ.get("ANYSAT_MAX_TILES", MAX_TILES))
    if tiles > limit:
        raise RequestError(
            f"the region ({area:,.0f} km2) makes about {tiles:,.0f} tiles of "
            f"{request.tile_size_m:g} m, over the {limit:,} one plan holds (ANYSAT_MAX_TILES); "
            "use larger tiles or split the region")
    if tiles > WARN_TILES:
        log.warning("a large run: about %s tiles of %g m over %s km2 (`anysat plan --estimate` "
                    "gives the device-hours)", f"{tiles:,.0f}", request.tile_size_m, f"{area:,.0f}")


def make_plan(request: RegionRequest, model_sha256: str, dim: int, *, uri: str | None = None,
              zones: list[ZoneTiles] | None = None, max_read_side: int = READ_SIDE) -> RunPlan:
    """The plan of a request, saved under `uri` (default: the request's output): the one
    saved there if it is the same request (a resume), else a new one, searched block by
    block and written. Raises PlanMismatchError if `uri` holds another request's plan.
    `zones` are the tiles (default: the region's, split per UTM zone); `max_read_side`
    caps the reading squares' side (`read_side`)."""
    specs = request.modality_specs()
    uri = storage.normalize_uri(uri or request.output_uri)
    fields = fingerprint(request, specs, model_sha256)
    saved = read_plan(uri, request)
    if saved is not None:
        check_same_request(saved, fields)
        log.info("resuming the saved plan %s: %d tiles in %d zone(s)", saved.plan_uri,
                 len(saved.tiles), len(saved.zones))
        return saved
    storage.check_writable(uri)
    if zones is None:
        check_run_size(request)
        zones = plan_zones(request.geometry, request.tile_size_m)
    zones = [z for z in zones if len(z)]
    if not zones:
        raise RequestError("the region covers no tile of the grid")
    tables, zone_plans = [], []
    found_ids: dict[str, set[str]] = {s.name: set() for s in specs}
    for zone in zones:
        log.info("zone EPSG:%d: %d tiles of %g m (%.2f km2), %d searches", zone.epsg, len(zone),
                 zone.size_m, zone.area_km2, len(set(_zone_blocks(zone))))
        tables.append(_plan_zone(uri, request, specs, zone, found_ids))
        grid = LayerGrid(zone.epsg, zone.size_m, request.patch_size_m, int(zone.cols.min()),
                         int(zone.rows.max()), int(np.ptp(zone.cols)) + 1,
                         int(np.ptp(zone.rows)) + 1, dim, request.layer_dtype)
        zone_plans.append(ZonePlan(zone.epsg, grid, len(zone)))
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    geometry = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    columns = {name: table.column(name) for name in table.column_names if name != "geometry"}
    geoparquet.write(geoparquet.with_geometry(columns, geometry), _tiles_uri(uri))
    saved = {
        "version": PLAN_VERSION, "fingerprint": fields, "hash": fingerprint_hash(fields),
        "zones": [{"epsg": z.epsg, "tiles": z.tiles, "area_km2": round(z.area_km2, 4),
                   "grid": asdict(z.grid)} for z in zone_plans],
        "tiles": "plan/tiles.parquet", "blocks": len(set(table.column("block").to_pylist())),
        "items": {sensor: len(found) for sensor, found in found_ids.items()},
        "read_side": read_side(tile_read_bytes(table, specs, request.tile_size_m), max_read_side),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes_atomic(storage.join(uri, "plan.json"), json.dumps(saved, indent=2).encode())
    plan = read_plan(uri, request)
    no_items = int((plan.tiles["status"] == "no-items").sum())
    log.info("planned %d tiles in %d zone(s), %d blocks searched, %d tiles without items -> %s",
             len(plan.tiles), len(zone_plans), saved["blocks"], no_items, plan.plan_uri)
    return plan

