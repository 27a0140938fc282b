"""embed-region as plain functions: plan, embed tile batches, finish.

The CLI runs them in a loop; the Prefect flow maps `embed_tiles` over tile batches. The plan
is saved under the output (`anysat.plan`): tiles read the items it holds, and a rerun of
another request into the same output is refused. Every step is idempotent: a tile's data is
written first and its done-marker last, a rerun skips tiles whose marker exists, and run.json
(the manifest) is written only once all is done.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from . import geoparquet, lease, storage
from .batch import stack_samples
from .errors import (CheckpointError, NoItemsError, OutputNotWritableError, RequestError,
                     TilesFailedError)
from .model import AnySat, load_model
from .model.checkpoint import weights_sha256
from .modalities import resolve_sensors
from .plan import RunPlan, make_plan
from .products import LayerWriter, create_layer, maps
from .products.cog import export_cogs
from .products.stac import write_stac
from .redact import without_secrets
from .products.vectors import layer_vectors
from .products.zarr_layer import read_layer, read_preview_cells
from .readers import BlockReaders, InTurn, count_from_env, give_back_freed_memory
from .request import INT8_FROM_KM2, RegionRequest
from .stac.search import no_items_message
from .tiles import Tile

log = logging.getLogger("anysat")
PREFETCH_BATCHES = 1  # batches of tiles read ahead of the model (memory: 2 batches in hand)
# threads writing tiles beside an accelerator: a tile is 2-4 requests (its chunk, overview
# and scale chunks, its marker), and one thread, at 20 ms a request, wrote 8-11 tiles of
# 600 m a second, 3-4 km2/s (benchmarks/tile_writes.py)
WRITE_THREADS = {"local": 4, "object store": 16}
PROGRESS_TILES = 256  # a progress line per this many tiles of a run
PREVIEW_MAX_SIDE = 2048  # pixels: previews and map PNGs of a continent stay small


def get_model(name_or_uri: str, sensors: tuple[str, ...], device: str = "cpu") -> AnySat:
    """The model for a run, loaded once per process and device (tasks in a worker reuse it;
    the plan's and the stream's on the CPU are one)."""
    return _loaded_model(name_or_uri, tuple(sensors), device)


@lru_cache(maxsize=4)  # its arguments always given in full: the cache keys on how they are passed
def _loaded_model(name_or_uri: str, sensors: tuple[str, ...], device: str) -> AnySat:
    specs = resolve_sensors(list(sensors))
    model = load_model(name_or_uri, specs)
    missing = [s.name for s in specs if s.name not in model.modalities]
    if missing:
        raise CheckpointError(f"model {name_or_uri} was not built for sensor(s) {missing}; "
                              f"it takes {list(model.modalities)} (--model tiny builds a "
                              "randomly initialised model for any sensors)")
    return model.to(device)


def plan_run(request: RegionRequest, create_layers: bool = True) -> RunPlan:
    """Validate everything a run needs before any work (sensors, sizes, catalog, model,
    output), then make the saved plan (or reuse it, to resume) and create (or reopen) the
    empty layer of each UTM zone."""
    specs = request.modality_specs()
    provider = request.provider()
    if request.labels and not storage.exists(request.labels):
        raise RequestError(f"labels {request.labels}: no such file (the class map needs it)")
    model = get_model(request.model, request.sensors)
    plan = make_plan(request, weights_sha256(model), model.config.dim)
    if request.quantize == "auto" and request.layer_dtype == "int8":
        log.info("region of %.0f km2 (over %.0f): layers stored as int8 with a per-pixel scale "
                 "(--quantize none keeps float32)", request.area_km2, INT8_FROM_KM2)
    for spec in specs:
        with_items = int((plan.tiles[f"n_items.{spec.name}"] > 0).sum())
        if not with_items:
            raise NoItemsError(no_items_message(provider, spec, request.search_region,
                                                request.start, request.end, request.max_cloud))
        log.info("%s: items over %d of %d tiles", spec.name, with_items, len(plan.tiles))
    for zone in plan.zones if create_layers else ():
        create_layer(plan.layer_uri(zone.epsg), zone.grid, preview_max_side=PREVIEW_MAX_SIDE, attrs={
            "model": request.model, "model_sha256": plan.fingerprint["model_sha256"],
            "plan_hash": plan.hash, "sensors": ",".join(s.name for s in specs),
            "start": str(request.start), "end": str(request.end),
            "patch_size_m": request.patch_size_m, "tile_size_m": request.tile_size_m,
        })
        log.info("EPSG:%d: %d tiles of %g m (%.2f km2), patch %g m -> %s", zone.epsg, zone.tiles,
                 request.tile_size_m, zone.area_km2, request.patch_size_m,
                 plan.layer_uri(zone.epsg))
    return plan


def embed_tiles(plan: RunPlan, tile_ids: list[str]) -> list[dict]:
    """`embed_stream`'s results, as a list (a Prefect task's batch of tiles)."""
    return list(embed_stream(plan, tile_ids))


def embed_stream(plan: RunPlan, tile_ids: list[str], waits: Counter | None = None) -> Iterator[dict]:
    """Load (the plan's items), embed and write tiles, each then marked done (tiles already
    done are skipped), yielding each tile's result as it ends. Tiles are read in the squares
    of `plan.reading_blocks` (one read per asset for a square: `readers.read_square`);
    `batch_size` tiles go through one forward. Beside an accelerator, the next squares are
    read while the model runs (`BlockReaders`: reader processes, PREFETCH_BATCHES batches
    ahead at least, so memory stays flat in the number of tiles, and reading never pauses
    for the caller: a whole run is one stream), the next batch is stacked and copied while
    the device runs the one before (`_launch`), and tiles are written on another thread
    while the next batch runs. A model on the CPU already uses every core: there reads and
    writes take turns with it (`overlaps_io`). Done-markers are looked up a search block at a time,
    as the reads reach it (`_unfinished`). `waits`, if given, adds up the seconds this
    thread spent on reads (`reads_s`: waiting for them, or reading in turn), in the model
    (`model_s`: batching, copies to and from the device, forward) and on writes (`writes_s`):
    what holds a run back."""
    request = plan.request
    waits = Counter() if waits is None else waits
    parts = _unfinished(plan, tile_ids)
    queued: deque = deque()
    for skipped, todo in parts:  # up to the first tile to do: a finished run loads no model
        yield from skipped
        queued.extend(plan.reading_blocks(todo))
        if queued:
            break
    if not queued:
        return
    model = get_model(request.model, request.sensors, request.device)
    n = request.batch_size
    overlap = overlaps_io(model)
    threads = write_threads(plan.uri) if overlap else 1
    in_hand: list = []
    flying: list[_Forward] = []  # the batch on the device while the next one is made ready
    writes: deque = deque()  # at most a batch of tiles (or a tile per writer) behind the model
    layers = _Layers(plan)
    with BlockReaders(plan, overlap) as readers, _writer(threads, overlap) as writer:
        # beside an accelerator, tiles read ahead of the forward: a batch's worth, and every
        # reader busy with a square; in turn, a square when the tiles in hand run short (one
        # read ahead would be a second square in memory and no faster)
        ahead = max(PREFETCH_BATCHES * n, readers.workers * plan.read_side**2)
        pending: deque = deque()
        while True:
            while (sum(len(block) for _, block in pending) < ahead if overlap
                   else not pending and len(in_hand) < n):
                if not queued:
                    part = next(parts, None)
                    if part is None:
                        break
                    yield from part[0]
                    queued.extend(plan.reading_blocks(part[1]))
                    continue
                block, square = queued.popleft()
                started = time.perf_counter()  # in turn (a CPU model): the read itself
                pending.append((readers.submit(block, square), block))
                waits["reads_s"] += time.perf_counter() - started
            if len(in_hand) >= n or not pending:  # a forward's worth, or the last tiles
                if not in_hand and not flying:
                    break
                started = time.perf_counter()
                landing, flying = flying, _launch(plan, model, in_hand[:n])
                in_hand = in_hand[n:]  # no reference left to the launched tiles' pixels
                waits["model_s"] += time.perf_counter() - started
                for args in _landed(landing, waits):
                    while len(writes) >= max(n, threads):
                        yield _waited(waits, writes.popleft())
                    started = time.perf_counter()  # in turn: the write itself
                    writes.append(writer.submit(_write_tile, plan, layers, *args))
                    waits["writes_s"] += time.perf_counter() - started
                continue
            started = time.perf_counter()
            square = readers.result(pending.popleft()[0])
            waits["reads_s"] += time.perf_counter() - started
            in_hand += [loaded for loaded in square if not isinstance(loaded, dict)]
            failed = [loaded for loaded in square if isinstance(loaded, dict)]
            del square  # its tiles are in hand, and go with them (a block read in turn)
            yield from failed  # tiles that failed to read
        while writes:
            yield _waited(waits, writes.popleft())


def _waited(waits: Counter, write: Future) -> dict:
    started = time.perf_counter()
    result = write.result()
    waits["writes_s"] += time.perf_counter() - started
    return result


def _unfinished(plan: RunPlan, tile_ids: list[str]) -> Iterator[tuple[list[dict], list[Tile]]]:
    """Per run of consecutive tiles of one search block: the results of those already done
    (their markers, then marked skipped) and the tiles still to do. A block's markers are
    read in one call (`storage.read_many`: on an object store, at once), one block at a
    time, so a continent's run starts reading at once instead of after a million lookups."""
    blocks = plan.tiles.loc[tile_ids, "block"].to_numpy()
    cuts = [0, *(np.flatnonzero(blocks[1:] != blocks[:-1]) + 1), len(tile_ids)]
    for start, end in zip(cuts, cuts[1:]):
        ids = tile_ids[start:end]
        markers = [None if raw is None else json.loads(raw)
                   for raw in storage.read_many([plan.marker_uri(t) for t in ids])]
        yield ([{**m, "skipped": True} for m in markers if m is not None],
               [plan.tile(t) for t, m in zip(ids, markers) if m is None])


def overlaps_io(model: AnySat) -> bool:
    """Whether reads and writes run beside the model. Not for a model on the CPU: its forward
    uses every core, and a reader thread beside it (GIL, cores) slows it by more than the reads
    cost (2 cores, 64 tiles of the demo's pixels: 24.6 s overlapped, 20.8 s in turns)."""
    return next(model.parameters()).device.type != "cpu"


def write_threads(uri: str) -> int:
    """Threads writing tiles beside an accelerator: `ANYSAT_WRITE_THREADS`, by default
    `WRITE_THREADS` for the output's kind of store."""
    return count_from_env("ANYSAT_WRITE_THREADS",
                          WRITE_THREADS["local" if storage.is_local(uri) else "object store"],
                          "threads writing tiles")


def _writer(threads: int, overlap: bool) -> Executor:
    return ThreadPoolExecutor(max_workers=threads) if overlap else InTurn()


class _Layers:
    """Each zone's `LayerWriter`, opened at its first tile, once for all writer threads."""

    def __init__(self, plan: RunPlan):
        self.plan, self.writers, self.lock = plan, {}, threading.Lock()

    def __getitem__(self, epsg: int) -> LayerWriter:
        with self.lock:
            if epsg not in self.writers:
                self.writers[epsg] = LayerWriter(self.plan.layer_uri(epsg), self.plan.zone(epsg).grid)
            return self.writers[epsg]


@dataclass
class _Forward:
    """A forward of tiles with the same sensors, launched: its patches reach the host once
    `landed` (on a GPU, copied without blocking the host, after the event `done`)."""
    items: list                          # (tile, dates, read seconds)
    patches: torch.Tensor | None         # [B, H/P, W/P, D] float32 on the host
    valid: np.ndarray | None             # [B, H/P, W/P] bool
    done: torch.cuda.Event | None
    seconds: float                       # the host's, launching it


def _launch(plan: RunPlan, model: AnySat, group: list[tuple[Tile, dict, dict, float]]
            ) -> list[_Forward]:
    """One forward per set of sensors present among the group's tiles, queued on the device.
    On a GPU the host does not wait for it: it lands (`_landed`) after the next group is
    launched, so the device runs one batch while the host stacks and copies the next one
    (from page-locked memory), and the values' checks, which would make it wait, are left
    out (a run's batches are finite where their masks say valid: `cube.batch`). Patch
    validity comes from the masks on the host. Dates on which a tile's sensor has no valid
    pixel are left out of its batch (`batch.kept_dates`): an accelerator computes every
    pixel-date, masked or not."""
    request = plan.request
    by_sensors: dict[frozenset, list] = {}
    for item in group:
        by_sensors.setdefault(frozenset(item[1]), []).append(item)
    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(request.dtype)
    launched = []
    for keys, items in by_sensors.items():
        started = time.perf_counter()
        # the tiles' pixels are not kept: in a square read in turn they hold its block
        # (as stored), which would stay in memory beside the next square's
        kept = [(tile, dates, read_s) for tile, _, dates, read_s in items]
        if not keys:  # no sensor had items: nothing to embed
            launched.append(_Forward(kept, None, None, None, 0.0))
            continue
        host = stack_samples([b for _, b, _, _ in items], pin_memory=gpu, without_empty=True)
        valid = model.patch_validity(host, request.patch_size_m, check_values=False).numpy()
        batch = {k: v.to(device, non_blocking=gpu) for k, v in host.items()}
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            patches = model(batch, request.patch_size_m, output="patch",
                            check_values=False).float()
        done = None
        if gpu:
            patches = patches.to("cpu", non_blocking=True)  # page-locked
            done = torch.cuda.Event()
            done.record()
        else:
            patches = patches.cpu()
            # the forward's freed activations go back to the system: a run's peak RSS grew
            # forward by forward (2 cores, 64 tiles, demo model, batch 4, means of 3-4 runs:
            # 755 MB against 611 at 4 tiles, 1.24x; 723 against 609, 1.19x, with this)
            give_back_freed_memory()
        launched.append(_Forward(kept, patches, valid, done, time.perf_counter() - started))
    return launched


def _landed(forwards: list[_Forward], waits: Counter) -> Iterator[tuple]:
    """Each tile's `_write_tile` arguments after the plan, once its forward is on the host."""
    for forward in forwards:
        started = time.perf_counter()
        if forward.done is not None:
            forward.done.synchronize()
        patches = None if forward.patches is None else forward.patches.numpy()
        landed_s = time.perf_counter() - started
        waits["model_s"] += landed_s
        per_tile = (forward.seconds + landed_s) / len(forward.items)
        for i, (tile, dates, read_s) in enumerate(forward.items):
            yield (tile, None if patches is None else patches[i],
                   None if forward.valid is None else forward.valid[i], dates, read_s + per_tile)


def _write_tile(plan: RunPlan, layers: _Layers, tile: Tile, patches: np.ndarray | None,
                valid: np.ndarray | None, dates: dict, seconds: float) -> dict:
    """Write a tile's patches (NaN where no sensor had data), then its done-marker (tiles
    on several threads: each its own chunks)."""
    grid = plan.zone(tile.epsg).grid
    valid_patches = 0
    if patches is not None:
        patches[~valid] = np.nan
        valid_patches = int(valid.sum())
    result = {"tile": tile.id, "epsg": tile.epsg, "status": "done" if valid_patches else "no-data",
              "valid_patches": valid_patches,
              "patches": grid.tile_px**2, "dates": dates, "area_km2": tile.area_km2,
              "seconds": round(seconds, 3)}
    try:  # the chunk first, its marker last: a tile is done only once both are whole
        if valid_patches:
            layers[tile.epsg].write(tile, patches)
        storage.write_bytes_atomic(plan.marker_uri(tile.id), json.dumps(result).encode())
    except Exception as exc:  # noqa: BLE001 - object storage, disk: any failure to write
        raise OutputNotWritableError(
            f"tile {tile.id}: cannot write to {plan.uri}: {type(exc).__name__}: "
            f"{without_secrets(str(exc))[:300]}; the tiles written so far are kept, rerun the "
            "same command to resume") from None
    log.info("tile %s: %d/%d patches with data, dates %s, %.2f km2, %.1f s", tile.id,
             valid_patches, result["patches"], dates, tile.area_km2, result["seconds"])
    return result


def run_squares(plan: RunPlan) -> list[tuple[list[Tile], tuple[Tile, Tile]]]:
    """The squares of tiles a whole run reads, in its order (`run_region`'s stream; what
    the benchmarks time)."""
    return plan.reading_blocks(list(map(plan.tile, plan.in_reading_order(plan.tile_ids))))


def tile_batches(plan: RunPlan, size: int | None = None) -> list[list[str]]:
    """Tile ids in task-sized batches (`tiles_per_batch`, or `size`), zone by zone, in the
    plan's reading order, of whole reading squares (`RunPlan.task_batches`)."""
    return plan.task_batches(plan.tile_ids, size or plan.request.tiles_per_batch)


@dataclass
class TileTally:
    """What the manifest and the progress lines need of the tiles' results, summed (per zone
    by EPSG code): a run adds its results as they come and never holds a record per tile
    (1.6 M of them for Europe at 2,560 m, each with its dates)."""

    done: Counter = field(default_factory=Counter)         # tiles embedded
    with_data: Counter = field(default_factory=Counter)    # of which with a valid patch
    patches: Counter = field(default_factory=Counter)      # valid patches
    failed: list[dict] = field(default_factory=list)
    ended: int = 0               # tiles with a result: done, skipped as done before, or failed
    area_km2: float = 0.0        # their area
    embedded: int = 0            # tiles embedded by this run (not skipped)
    embedded_km2: float = 0.0

    def add(self, results: list[dict]) -> TileTally:
        for r in results:  # a continental block's summary has only tiles and patch counts
            area = r.get("area_km2", 0.0)
            self.ended += 1
            self.area_km2 += area
            if "failed" in r:
                self.failed.append(r)
                continue
            epsg = int(r["tile"].split("_", 1)[0])   # tile ids begin with their zone
            self.done[epsg] += 1
            self.with_data[epsg] += bool(r["valid_patches"])
            self.patches[epsg] += int(r["valid_patches"])
            if not r.get("skipped"):
                self.embedded += 1
                self.embedded_km2 += area
        return self

    def progress(self, plan: RunPlan) -> str:
        return (f"{self.ended}/{len(plan.tiles)} tiles"
                f"{f' ({len(self.failed)} failed)' if self.failed else ''}, "
                f"{self.area_km2:.2f}/{plan.area_km2:.2f} km2")


def finish_run(plan: RunPlan, tally: TileTally, seconds: float,
               embedding: dict | None = None) -> dict:
    """Write each zone's preview and products, their STAC, then the manifest: its presence
    means the run is complete. `seconds`: the run's so far; `embedding` (`embedded`): how
    long the tiles' reads, forwards and writes took, and what the stream waited on."""
    total = len(plan.tiles)
    if tally.failed:
        others = total - len(tally.failed)
        raise TilesFailedError(
            f"{len(tally.failed)} of {total} tiles failed"
            f"{f', the other {others} are done' if others else ''}: "
            f"{grouped_failures(tally.failed)}. "
            "Rerun the same command to retry only the failed tiles.")
    short = {z.epsg: z.tiles - tally.done[z.epsg] for z in plan.zones if tally.done[z.epsg] < z.tiles}
    if short:
        raise TilesFailedError(
            f"{sum(short.values())} tiles not done ("
            + ", ".join(f"EPSG:{epsg}: {n}" for epsg, n in short.items()) + "); rerun to resume")
    done = sum(tally.done.values())
    without_data = done - sum(tally.with_data.values())
    if without_data == done:
        raise NoItemsError(
            f"none of the {done} tiles had a valid pixel (nodata or clouds everywhere, "
            "or items that do not cover the region): the layer would be empty, so no run.json "
            "was written; check the catalog, dates and --max-cloud")
    if without_data:
        log.warning("%d of %d tiles had no valid pixel (recorded as no-data in their markers "
                    "and in run.json)", without_data, done)
    layers = []
    for zone in plan.zones:
        give_back_freed_memory()  # the stream's freed heap, before the preview's row bands
        started = time.perf_counter()
        width, height = maps.write_png(preview(plan.layer_uri(zone.epsg)),
                                       plan.preview_uri(zone.epsg))
        preview_s = time.perf_counter() - started
        layers.append({"epsg": zone.epsg, "layer": plan.layer_uri(zone.epsg),
                       "preview": plan.preview_uri(zone.epsg), "tiles": zone.tiles,
                       "area_km2": round(zone.area_km2, 4),
                       "patches_with_data": tally.patches[zone.epsg],
                       **write_products(plan, zone.epsg, preview_s,
                                        tally.with_data[zone.epsg] > 0)})
        log.info("EPSG:%d: layer %s, preview %s (%dx%d px)", zone.epsg, plan.layer_uri(zone.epsg),
                 plan.preview_uri(zone.epsg), width, height)
    finished = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    stac = write_stac(plan, get_model(plan.request.model, plan.request.sensors), layers, finished)
    stac_s = round(time.perf_counter() - started, 3)
    manifest = {
        "request": plan.request.model_dump(mode="json"),
        "plan": plan.plan_uri, "plan_hash": plan.hash, "model_sha256": plan.fingerprint["model_sha256"],
        "layers": layers, "stac": stac, "stac_seconds": stac_s, "manifest": plan.manifest_uri,
        "tiles": len(plan.tiles), "area_km2": round(plan.area_km2, 4),
        "patches_with_data": sum(tally.patches.values()),
        "tiles_without_data": without_data,
        "embedding_dim": plan.zones[0].grid.dim, "seconds": round(seconds, 2),
        **({} if embedding is None else {"embedding": embedding}),
        "finished": finished,
    }
    storage.write_bytes_atomic(plan.manifest_uri, json.dumps(manifest, indent=2).encode())
    log.info("wrote %d layer(s) and the manifest %s", len(layers), plan.manifest_uri)
    return manifest


def preview(layer_uri: str) -> np.ndarray:
    """A layer's PCA-RGB preview, its colours fitted on a sample, drawn in row bands from its
    preview cells (`read_preview_cells`: the overview, or a float32 layer no wider than the
    preview), else tile by tile from the layer (int8, or wide and made before overviews).
    A continent's layer is never in memory, nor read back whole."""
    cells = read_preview_cells(layer_uri, PREVIEW_MAX_SIDE)
    if cells is not None:
        return maps.render_cells(cells, maps.pca_colour(maps.sample_cells(cells)))
    layer = read_layer(layer_uri)
    return maps.render(layer, maps.pca_colour(maps.sample_pixels(layer)), PREVIEW_MAX_SIDE)


def grouped_failures(failed: list[dict], shown: int = 10) -> str:
    """Failures by reason (one missing scene fails every tile it covers): each reason once,
    with the tiles it hit."""
    by_reason: dict[str, list[str]] = {}
    for r in failed:
        reason = r["failed"].removeprefix(f"tile {r['tile']}: ")
        by_reason.setdefault(reason, []).append(r["tile"])
    parts = []
    for reason, tiles in list(by_reason.items())[:shown]:
        named = ", ".join(tiles[:3]) + (f" and {len(tiles) - 3} more" if len(tiles) > 3 else "")
        parts.append(f"{'tile' if len(tiles) == 1 else 'tiles'} {named}: {reason}")
    more = len(by_reason) - shown
    return "; ".join(parts) + (f" (and {more} other reasons)" if more > 0 else "")


def write_products(plan: RunPlan, epsg: int, preview_s: float, has_data: bool) -> dict:
    """The products a run asks for besides the layer (`request.products`), for one zone;
    their URIs and the seconds each took. A zone without data gets none but its COGs."""
    request = plan.request
    products, seconds = {}, {"preview": round(preview_s, 3)}
    if not has_data and set(request.products) - {"cog"}:
        log.warning("EPSG:%d has no patch with data: no %s for it", epsg,
                    ", ".join(sorted(set(request.products) - {"cog"})))
    tiles = plan.tiles[plan.tiles["epsg"] == epsg]
    layer = plan.layer_uri(epsg)
    blocks = {name: (group["col"].to_numpy(), group["row"].to_numpy())
              for name, group in tiles.groupby("block")}
    if "cog" in request.products:
        started = time.perf_counter()
        products["cogs"] = export_cogs(layer, blocks, storage.join(plan.uri, "cogs", f"EPSG{epsg}"))
        seconds["cog"] = round(time.perf_counter() - started, 3)
    for kind in ("clusters", "classes"):
        if kind not in request.products or not has_data:
            continue
        started = time.perf_counter()
        ds = read_layer(layer)
        if kind == "clusters":
            predict, names = maps.kmeans(maps.sample_pixels(ds), request.clusters), None
        else:
            predict, names, used = maps.linear_probe(*maps.labelled_embeddings(ds, request.labels))
            log.info("EPSG:%d class map: %d labelled patches, classes %s", epsg, used, names)
        png = storage.join(plan.uri, "maps", f"EPSG{epsg}_{kind}.png")
        maps.write_png(maps.render(ds, maps.class_colour(predict), PREVIEW_MAX_SIDE, pool="first"), png)
        products[kind] = {"png": png, "cogs": maps.write_class_cogs(
            ds, predict, blocks, storage.join(plan.uri, "maps", f"EPSG{epsg}_{kind}")),
            **({"classes": names} if names else {})}
        seconds[kind] = round(time.perf_counter() - started, 3)
    if "vectors" in request.products and has_data:
        started = time.perf_counter()
        meta = {"start": request.start, "end": request.end, "model": request.model,
                "model_sha256": plan.fingerprint["model_sha256"]}
        patches, tile_rows = layer_vectors(
            layer, list(zip(tiles.index, tiles["col"], tiles["row"])), meta)
        products["vectors"] = {kind: storage.join(plan.uri, "vectors", f"EPSG{epsg}_{kind}.parquet")
                               for kind in ("patches", "tiles")}
        geoparquet.write(patches, products["vectors"]["patches"])
        geoparquet.write(tile_rows, products["vectors"]["tiles"])
        seconds["vectors"] = round(time.perf_counter() - started, 3)
    log.info("EPSG:%d products: %s", epsg, ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return {**products, "product_seconds": seconds}


def run_region(request: RegionRequest) -> dict:
    """The whole run in this process (what `anysat embed` does without Prefect), holding the
    output's lease so that no other run writes into it meanwhile: one stream of tiles, so
    reads never pause between parts of the region."""
    started = time.perf_counter()
    with lease.hold(request.output_uri, "anysat embed"):
        plan = plan_run(request)
        tally = TileTally()
        embedding = time.perf_counter()
        waits: Counter = Counter()
        for result in embed_stream(plan, plan.in_reading_order(plan.tile_ids), waits):
            tally.add([result])
            if tally.ended % PROGRESS_TILES == 0 or tally.ended == len(plan.tiles):
                log.info("progress: %s", tally.progress(plan))
        return finish_run(plan, tally, time.perf_counter() - started,
                          embedded(tally, time.perf_counter() - embedding, waits))


def embedded(tally: TileTally, seconds: float, waits: Counter | None = None) -> dict:
    """The embedding's part of a run, logged and for its manifest: the tiles embedded now
    (skipped ones left out), their km2/s, and the stream's `waits` (`embed_stream`)."""
    km2 = tally.embedded_km2
    out = {"tiles": tally.embedded, "area_km2": round(km2, 4), "seconds": round(seconds, 2),
           "km2_per_s": round(km2 / max(seconds, 1e-9), 4),
           **{k: round(v, 2) for k, v in (waits or {}).items()}}
    log.info("embedded %d tiles, %.2f km2, in %.1f s: %.2f km2/s%s", tally.embedded, km2, seconds,
             out["km2_per_s"], "; the stream spent " + ", ".join(
                 f"{v:.1f} s on {k.removesuffix('_s')}" for k, v in waits.items()) if waits else "")
    return out
