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

import numpy as np
from shapely.geometry import shape

from .. import storage
from ..cube.batch import load_tile_batch
from ..errors import NoItemsError, TilesFailedError
from ..modalities import ModalitySpec
from ..plan import RunPlan, fingerprint, fingerprint_hash, make_plan
from ..readers import BlockReaders
from ..stac.providers import Provider
from ..request import RegionRequest
from ..tiles import Tile, ZoneTiles, plan_zones, zone_tiles
from .chips import chip_record, write_chip, write_index

log = logging.getLogger("anysat")
# Chips are read in squares of at most 4 x 4, as when the shipped checkpoint's chips were
# ingested: a sensor warped from another grid depends a little on the box read (the demo's
# 10 m DEM at 30 m: up to 0.07 m between 4 x 4 and 8 x 8 squares of 240 m chips), and
# `make pretrain-demo` trains on the same chips as before (same weights as at ed3ad96).
CHIP_READ_SIDE = 4


@dataclass(frozen=True)
class IngestPlan:
    request: RegionRequest      # tile_size_m is the chip size
    store_uri: str
    run: RunPlan                # the saved plan: chips to write and each one's items

    @property
    def area_km2(self) -> float:
        return self.run.area_km2

    @property
    def tiles(self) -> list[str]:
        return self.run.tile_ids


def ingest_request(chip_size_m: float, store_uri: str, **fields) -> RegionRequest:
    """A region request for chips: the chip size must be a multiple of every sensor's GSD."""
    request = RegionRequest.build(tile_size_m=chip_size_m, patch_size_m=chip_size_m,
                                  output_uri=store_uri, **fields)
    request.modality_specs()
    return request


def chip_zones(request: RegionRequest) -> list[ZoneTiles]:
    """The chip grid's tiles over the region, split per UTM zone (training regions are often
    scattered over a continent). A GeoJSON feature with an `epsg` property is planned in
    that zone only (e.g. the zone its data come in, so nothing is resampled)."""
    size = request.tile_size_m
    features = (request.geojson or {}).get("features") if request.geojson else None
    zones = []
    for geometry, epsg in ([(shape(f["geometry"]), (f.get("properties") or {}).get("epsg"))
                            for f in features] if features else [(request.geometry, None)]):
        zones += [zone_tiles(geometry, size, int(epsg))] if epsg else plan_zones(geometry, size)
    merged = []
    for epsg in sorted({z.epsg for z in zones}):  # features may share tiles: each chip once
        cells = np.concatenate([np.stack([z.cols, z.rows], axis=1) for z in zones if z.epsg == epsg])
        _, first = np.unique(cells, axis=0, return_index=True)
        cells = cells[np.sort(first)]
        merged.append(ZoneTiles(epsg, size, cells[:, 0], cells[:, 1]))
    return merged


def plan_ingest(request: RegionRequest) -> IngestPlan:
    """Check the store is writable, plan the chips and their items (saved in the store under
    plans/<hash>/, so that a rerun of the same ingest resumes from it) and check that some
    chip has items."""
    specs = request.modality_specs()
    store = storage.normalize_uri(request.output_uri)
    storage.check_writable(store)
    key = fingerprint_hash(fingerprint(request, specs, ""))[:16]
    run = make_plan(request, "", 0, uri=storage.join(store, "plans", key),
                    zones=chip_zones(request), max_read_side=CHIP_READ_SIDE)
    if (run.tiles["status"] == "no-items").all():
        raise NoItemsError(f"{request.catalog} has no items of {[s.name for s in specs]} in "
                           f"{request.search_region} between {request.start} and {request.end}")
    plan = IngestPlan(request, store, run)
    log.info("planned %d chips of %g m (%.2f km2) -> %s", len(run.tiles), request.tile_size_m,
             plan.area_km2, store)
    return plan


def ingest_tiles(plan: IngestPlan, tile_ids: list[str]) -> list[dict]:
    """Write the chips of some tiles (complete ones skipped); their index rows. Chips are read
    in the squares `embed` reads tiles in (`RunPlan.reading_blocks`): one read per asset and
    square, and a chip's values do not depend on which chips are read with it."""
    request = plan.request
    provider, specs = request.provider(), request.modality_specs()
    rows, todo = [], []
    for tile_id in tile_ids:
        done = chip_record(plan.store_uri, tile_id)
        if done is not None:
            rows.append({**done, "skipped": True})
        else:
            todo.append(plan.run.tile(tile_id))
    with BlockReaders(plan.run, overlap=False) as readers:  # read as embed reads on a CPU
        for tiles, square in plan.run.reading_blocks(todo):
            for loaded in readers.result(readers.submit(tiles, square)):
                if isinstance(loaded, dict):  # this chip fails, the others go on; a rerun retries it
                    rows.append({"id": loaded["tile"], "failed": loaded["failed"]})
                    continue
                tile, batch, dates, _ = loaded
                row = _write_chip(plan.store_uri, tile, batch, dates, specs, request.start,
                                  request.end, provider)
                if row is not None:
                    rows.append(row)
    return rows


def tile_batches(plan: IngestPlan) -> list[list[str]]:
    """Chip ids in task-sized batches of whole reading squares, in reading order (see
    `ingest_tiles`)."""
    return plan.run.task_batches(plan.tiles, plan.request.tiles_per_batch)


def finish_ingest(plan: IngestPlan, rows: list[dict], seconds: float) -> dict:
    """Write the index of the chips written (last: what a trainer reads) and a summary;
    raise, listing them, if some chips failed (a rerun retries only those)."""
    failed = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    index = write_index(plan.store_uri, rows)
    if failed:
        listed = "; ".join(r["failed"] for r in failed[:10])
        raise TilesFailedError(f"{len(failed)} of {len(plan.tiles)} chips failed ({len(rows)} "
                               f"written or complete, in the index): {listed}. Rerun the same "
                               "command to retry only the failed chips.")
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


def _write_chip(store_uri: str, tile: Tile, batch: dict, dates: dict, specs: list[ModalitySpec],
                start: dt.date, end: dt.date, provider: Provider) -> dict | None:
    """Write a loaded tile as a chip; None when no sensor has valid pixels over it."""
    if not batch or not any(bool(batch[f"{s.name}_mask"].any()) for s in specs if s.name in batch):
        log.info("tile %s: no sensor has valid pixels, no chip", tile.id)
        return None
    catalog = provider.name.split("?")[0]  # a URL's query may hold a token
    record = write_chip(store_uri, tile, batch, specs, {"start": str(start), "end": str(end),
                                                        "catalog": catalog})
    log.info("chip %s: dates %s, %.3f km2", tile.id, dates, tile.area_km2)
    return record


def ingest_tile(provider: Provider, specs: list[ModalitySpec], tile: Tile, start: dt.date,
                end: dt.date, store_uri: str, *, max_cloud: float | None = None,
                time_bin: str | None = None, backend: str = "odc-stac") -> dict | None:
    """Search, load and write one chip, without a plan; a complete chip already in the
    store is kept (its row is returned with `skipped`). None when no sensor has data."""
    done = chip_record(store_uri, tile.id)
    if done is not None:
        return {**done, "skipped": True}
    batch, dates = load_tile_batch(provider, specs, tile, start, end, max_cloud=max_cloud,
                                   time_bin=time_bin, backend=backend)
    return _write_chip(store_uri, tile, batch, dates, specs, start, end, provider)


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
