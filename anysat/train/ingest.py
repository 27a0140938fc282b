"""Ingest: a region and dates -> training chips (one per tile of the chip grid) in a store.

The CLI (`anysat ingest`) runs the tile batches in a loop, the Prefect flow `ingest` maps them
over Dask workers; both end with `finish_ingest`, which writes the chip index. A chip is the
same square of the fixed tile grid as `embed` uses (chip size = tile size), so chip ids never
change between runs and a rerun skips every complete chip.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from shapely.geometry import shape

from .. import storage
from ..cube.batch import load_tile_batch
from ..errors import NoItemsError
from ..request import RegionRequest
from ..stac import resolve_provider, search_sensors
from ..tiles import Tile, plan_zones, zone_tiles
from ..modalities import ModalitySpec
from ..stac.providers import Provider
from .chips import chip_record, write_chip, write_index

log = logging.getLogger("anysat")


@dataclass(frozen=True)
class IngestPlan:
    request: RegionRequest      # tile_size_m is the chip size
    store_uri: str
    tiles: tuple[Tile, ...]

    @property
    def area_km2(self) -> float:
        return sum(t.area_km2 for t in self.tiles)


def ingest_request(chip_size_m: float, store_uri: str, **fields) -> RegionRequest:
    """A region request for chips: the chip size must be a multiple of every sensor's GSD."""
    request = RegionRequest.build(tile_size_m=chip_size_m, patch_size_m=chip_size_m,
                                  output_uri=store_uri, **fields)
    request.modality_specs()
    return request


def chip_tiles(request: RegionRequest) -> list[Tile]:
    """The chip grid's tiles over the region, split per UTM zone (training regions are often
    scattered over a continent). A GeoJSON feature with an `epsg` property is planned in
    that zone only (e.g. the zone its data come in, so nothing is resampled)."""
    size = request.tile_size_m
    features = (request.geojson or {}).get("features") if request.geojson else None
    zones = []
    for geometry, epsg in ([(shape(f["geometry"]), (f.get("properties") or {}).get("epsg"))
                            for f in features] if features else [(request.geometry, None)]):
        zones += [zone_tiles(geometry, size, int(epsg))] if epsg else plan_zones(geometry, size)
    tiles: dict[str, Tile] = {}
    for zone in zones:
        for tile in zone.tiles():
            tiles.setdefault(tile.id, tile)
    return list(tiles.values())


def plan_ingest(request: RegionRequest) -> IngestPlan:
    """Check the store is writable and that some sensor has items, then list the chips."""
    specs = request.modality_specs()
    store = storage.normalize_uri(request.output_uri)
    storage.check_writable(store)
    provider = resolve_provider(request.catalog)
    found = search_sensors(provider, specs, request.search_region, request.start, request.end,
                           max_cloud=request.max_cloud)
    if not any(found.values()):
        raise NoItemsError(f"{provider.name} has no items of {[s.name for s in specs]} in "
                           f"{request.search_region} between {request.start} and {request.end}")
    for spec in specs:
        log.info("%s: %d items in %s", spec.name, len(found[spec.name]), provider.name)
    tiles = chip_tiles(request)
    plan = IngestPlan(request, store, tuple(tiles))
    log.info("planned %d chips of %g m (%.2f km2) -> %s", len(tiles), request.tile_size_m,
             plan.area_km2, store)
    return plan


def ingest_tiles(plan: IngestPlan, tiles: list[Tile]) -> list[dict]:
    """Write the chips of some tiles (complete ones skipped); their index rows."""
    request = plan.request
    provider, specs = resolve_provider(request.catalog), request.modality_specs()
    rows = []
    for tile in tiles:
        row = ingest_tile(provider, specs, tile, request.start, request.end, plan.store_uri,
                          max_cloud=request.max_cloud, time_bin=request.time_bin,
                          backend=request.cube_backend)
        if row is not None:
            rows.append(row)
    return rows


def tile_batches(plan: IngestPlan) -> list[list[Tile]]:
    n = plan.request.tiles_per_batch
    return [list(plan.tiles[i:i + n]) for i in range(0, len(plan.tiles), n)]


def finish_ingest(plan: IngestPlan, rows: list[dict], seconds: float) -> dict:
    """Write the index (last: what a trainer reads) and a summary."""
    index = write_index(plan.store_uri, rows)
    summary = {"store": plan.store_uri, "chips": len(rows), "chips_in_store": len(index),
               "written": sum(not r.get("skipped") for r in rows),
               "skipped": sum(bool(r.get("skipped")) for r in rows),
               "tiles_without_data": len(plan.tiles) - len(rows),
               "area_km2": round(plan.area_km2, 4), "seconds": round(seconds, 2)}
    log.info("ingest: %d chips (%d written, %d already complete, %d tiles without data), "
             "%d in the store's index", summary["chips"], summary["written"], summary["skipped"],
             summary["tiles_without_data"], summary["chips_in_store"])
    return summary


def run_ingest(request: RegionRequest) -> dict:
    """The whole ingest in this process (what `anysat ingest` does without Prefect)."""
    started = time.perf_counter()
    plan = plan_ingest(request)
    rows: list[dict] = []
    done = 0
    for batch in tile_batches(plan):
        rows.extend(ingest_tiles(plan, batch))
        done += len(batch)
        log.info("progress: %d/%d tiles, %.2f/%.2f km2", done, len(plan.tiles),
                 done * request.tile_size_m ** 2 / 1e6, plan.area_km2)
    return finish_ingest(plan, rows, time.perf_counter() - started)


def ingest_tile(provider: Provider, specs: list[ModalitySpec], tile: Tile, start: dt.date,
                end: dt.date, store_uri: str, *, max_cloud: float | None = None,
                time_bin: str | None = None, backend: str = "odc-stac") -> dict | None:
    """Load and write one chip; a complete chip already in the store is kept (its row is
    returned with `skipped`). None when no sensor has data over the tile."""
    done = chip_record(store_uri, tile.id)
    if done is not None:
        return {**done, "skipped": True}
    batch, dates = load_tile_batch(provider, specs, tile, start, end, max_cloud=max_cloud,
                                   time_bin=time_bin, backend=backend)
    if not batch or not any(bool(batch[f"{s.name}_mask"].any()) for s in specs if s.name in batch):
        log.info("tile %s: no sensor has valid pixels, no chip", tile.id)
        return None
    catalog = provider.name.split("?")[0]  # a URL's query may hold a token
    record = write_chip(store_uri, tile, batch, specs, {"start": str(start), "end": str(end),
                                                        "catalog": catalog})
    log.info("chip %s: dates %s, %.3f km2", tile.id, dates, tile.area_km2)
    return record


def write_chips(provider: Provider, specs: list[ModalitySpec], tiles: list[Tile], start: dt.date,
                end: dt.date, store_uri: str, **options) -> list[str]:
    """Write the chips of `tiles` and update the index; returns the ids written now (complete
    chips already in the store are kept)."""
    store_uri = storage.normalize_uri(store_uri)
    records, written = [], []
    for n, tile in enumerate(tiles, start=1):
        record = ingest_tile(provider, specs, tile, start, end, store_uri, **options)
        if record is not None:
            records.append(record)
            if not record.pop("skipped", False):
                written.append(tile.id)
        log.info("progress: %d/%d chips, %.3f km2", n, len(tiles), n * tile.area_km2)
    write_index(store_uri, records)
    return written
