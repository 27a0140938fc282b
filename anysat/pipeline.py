"""embed-region as plain functions: plan, embed tile batches, finish.

The CLI runs them in a loop; the Prefect flow maps `embed_tiles` over tile batches. Every
step is idempotent: a tile's data is written first and its done-marker last, a rerun skips
tiles whose marker exists, and run.json (the manifest) is written only once all is done.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from . import storage
from .batch import stack_samples
from .cube import bin_time, load_cube, read_cube
from .errors import CheckpointError, NoItemsError
from .model import AnySat, load_model
from .model.checkpoint import weights_sha256
from .modalities import ModalitySpec, resolve_sensors
from .products import LayerGrid, create_layer, write_pca_preview, write_tile
from .products.zarr_layer import read_layer
from .request import RegionRequest
from .stac import resolve_provider, search_sensors
from .stac.providers import Provider
from .stac.search import no_items_message
from .stac.signing import url_signer
from .tiles import Tile, plan_tiles

log = logging.getLogger("anysat")


@dataclass(frozen=True)
class RunPlan:
    request: RegionRequest
    output_uri: str
    tiles: tuple[Tile, ...]
    grid: LayerGrid

    @property
    def layer_uri(self) -> str:
        return storage.join(self.output_uri, "embeddings",
                            f"EPSG{self.grid.epsg}_patch{self.grid.patch_size_m:g}m.zarr")

    @property
    def preview_uri(self) -> str:
        return storage.join(self.output_uri, "preview", f"EPSG{self.grid.epsg}_pca.png")

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.output_uri, "run.json")

    def marker_uri(self, tile: Tile) -> str:
        return storage.join(self.output_uri, "tiles", f"{tile.id}.json")

    @property
    def area_km2(self) -> float:
        return sum(t.area_km2 for t in self.tiles)


@lru_cache(maxsize=4)
def get_model(name_or_uri: str, sensors: tuple[str, ...], device: str = "cpu") -> AnySat:
    """The model for a run, loaded once per process (tasks in a worker reuse it)."""
    specs = resolve_sensors(list(sensors))
    model = load_model(name_or_uri, specs)
    missing = [s.name for s in specs if s.name not in model.modalities]
    if missing:
        raise CheckpointError(f"model {name_or_uri} was not built for sensor(s) {missing}; "
                              f"it takes {list(model.modalities)} (--model tiny builds a "
                              "randomly initialised model for any sensors)")
    return model.to(device)


def plan_run(request: RegionRequest) -> RunPlan:
    """Validate everything a run needs before any work: sensors, sizes, catalog, items for
    each sensor, output writability. Creates (or reopens, to resume) the empty layer."""
    specs = request.modality_specs()
    provider = resolve_provider(request.catalog)
    output = storage.normalize_uri(request.output_uri)
    storage.check_writable(output)
    found = search_sensors(provider, specs, request.search_region, request.start, request.end,
                           max_cloud=request.max_cloud)
    for spec in specs:
        if not found[spec.name]:
            raise NoItemsError(no_items_message(provider, spec, request.search_region,
                                                request.start, request.end, request.max_cloud))
        log.info("%s: %d items in %s", spec.name, len(found[spec.name]), provider.name)
    tiles = plan_tiles(request.geometry, request.tile_size_m)
    model = get_model(request.model, request.sensors)
    grid = LayerGrid.covering(tiles, request.patch_size_m, model.config.dim)
    plan = RunPlan(request, output, tuple(tiles), grid)
    create_layer(plan.layer_uri, grid, attrs={
        "model": request.model, "model_sha256": weights_sha256(model),
        "sensors": ",".join(s.name for s in specs), "start": str(request.start),
        "end": str(request.end), "patch_size_m": request.patch_size_m,
        "tile_size_m": request.tile_size_m,
    })
    log.info("planned %d tiles of %g m (%.2f km2) in EPSG:%d, patch %g m -> %s",
             len(tiles), request.tile_size_m, plan.area_km2, grid.epsg, request.patch_size_m,
             plan.layer_uri)
    return plan


def days_since_epoch(times: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(times.astype("datetime64[D]").astype("int64").astype("float32"))


def load_tile_batch(provider: Provider, specs: list[ModalitySpec], tile: Tile, start: dt.date,
                    end: dt.date, *, max_cloud: float | None = None, time_bin: str | None = None,
                    backend: str = "odc-stac") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A model batch (B = 1) of every sensor with items over the tile, and its date counts.
    Sensors without items are left out: AnySat takes any subset of its sensors. Each sensor
    comes with its dates and its validity mask (nodata and cloud-masked pixels are False)."""
    signer = url_signer(provider)
    batch: dict[str, torch.Tensor] = {}
    dates: dict[str, int] = {}
    found = search_sensors(provider, specs, tile.bbox_lonlat, start, end, max_cloud=max_cloud)
    for spec in specs:
        if not found[spec.name]:
            continue
        cube = load_cube(found[spec.name], spec, tile.geobox(spec.gsd_m), naming=provider.naming,
                         patch_url=signer, backend=backend)
        if time_bin and spec.time_series:
            cube = bin_time(cube, time_bin)
        cube = read_cube(cube)
        pixels = torch.from_numpy(cube.values)[None]
        batch[spec.name] = pixels
        batch[f"{spec.name}_dates"] = days_since_epoch(cube.time.values)[None]
        batch[f"{spec.name}_mask"] = torch.isfinite(pixels).all(dim=2)
        dates[spec.name] = int(cube.sizes["time"])
    return batch, dates


def embed_tiles(plan: RunPlan, tiles: list[Tile]) -> list[dict]:
    """Search, load, embed and write tiles, each then marked done (tiles already done are
    skipped). `batch_size` tiles go through one forward; the next tiles' reads run on threads
    meanwhile, at most two batches ahead."""
    request = plan.request
    results = []
    todo = []
    for tile in tiles:
        marker = plan.marker_uri(tile)
        if storage.exists(marker):
            results.append({**json.loads(storage.read_bytes(marker)), "skipped": True})
        else:
            todo.append(tile)
    if not todo:
        return results
    model = get_model(request.model, request.sensors, request.device)
    provider, specs = resolve_provider(request.catalog), request.modality_specs()

    def load(tile: Tile) -> tuple[Tile, dict, dict, float]:
        started = time.perf_counter()
        batch, dates = load_tile_batch(provider, specs, tile, request.start, request.end,
                                       max_cloud=request.max_cloud, time_bin=request.time_bin,
                                       backend=request.cube_backend)
        return tile, batch, dates, time.perf_counter() - started

    n = request.batch_size
    with ThreadPoolExecutor(max_workers=min(len(todo), 2 * n)) as pool:
        pending = deque(pool.submit(load, tile) for tile in todo[:2 * n])
        queued = todo[2 * n:]
        while pending:
            group = [pending.popleft().result() for _ in range(min(n, len(pending)))]
            pending.extend(pool.submit(load, tile) for tile in queued[:len(group)])
            queued = queued[len(group):]
            results += _embed_group(plan, model, group)
    return results


def _embed_group(plan: RunPlan, model: AnySat, group: list[tuple[Tile, dict, dict, float]]) -> list[dict]:
    """One forward per set of sensors present among the group's tiles; write and mark each."""
    request = plan.request
    by_sensors: dict[frozenset, list] = {}
    for item in group:
        by_sensors.setdefault(frozenset(item[1]), []).append(item)
    results = []
    for keys, items in by_sensors.items():
        started = time.perf_counter()
        patches = valid = None
        if keys:
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in stack_samples([b for _, b, _, _ in items]).items()}
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(request.dtype)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                        enabled=dtype is not None):
                patches = model(batch, request.patch_size_m, output="patch").float().cpu().numpy()
                valid = model.patch_validity(batch, request.patch_size_m).cpu().numpy()
        forward_s = (time.perf_counter() - started) / len(items)
        for i, (tile, _, dates, read_s) in enumerate(items):
            results.append(_write_tile(plan, tile, None if patches is None else patches[i],
                                       None if valid is None else valid[i], dates,
                                       read_s + forward_s))
    return results


def _write_tile(plan: RunPlan, tile: Tile, patches: np.ndarray | None, valid: np.ndarray | None,
                dates: dict, seconds: float) -> dict:
    """Write a tile's patches (NaN where no sensor had data), then its done-marker."""
    valid_patches = 0
    if patches is not None:
        patches[~valid] = np.nan
        valid_patches = int(valid.sum())
        if valid_patches:
            write_tile(plan.layer_uri, plan.grid, tile, patches)
    result = {"tile": tile.id, "valid_patches": valid_patches, "patches": plan.grid.tile_px**2,
              "dates": dates, "area_km2": tile.area_km2, "seconds": round(seconds, 3)}
    storage.write_bytes_atomic(plan.marker_uri(tile), json.dumps(result).encode())
    log.info("tile %s: %d/%d patches with data, dates %s, %.2f km2, %.1f s", tile.id,
             valid_patches, result["patches"], dates, tile.area_km2, result["seconds"])
    return result


def tile_batches(plan: RunPlan) -> list[list[Tile]]:
    n = plan.request.tiles_per_batch
    return [list(plan.tiles[i:i + n]) for i in range(0, len(plan.tiles), n)]


def finish_run(plan: RunPlan, results: list[dict], seconds: float) -> dict:
    """Write the preview, then the manifest: its presence means the whole run is complete."""
    done = {r["tile"] for r in results}
    missing = [t.id for t in plan.tiles if t.id not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} tiles not done ({missing[:3]}...); rerun to resume")
    layer = read_layer(plan.layer_uri)["embedding"]
    step = max(1, int(np.ceil(max(layer.shape[:2]) / 2048)))  # preview of a continent stays small
    width, height = write_pca_preview(layer[::step, ::step].values, plan.preview_uri)
    manifest = {
        "request": plan.request.model_dump(mode="json"),
        "layer": plan.layer_uri, "preview": plan.preview_uri, "manifest": plan.manifest_uri,
        "epsg": plan.grid.epsg,
        "tiles": len(plan.tiles), "area_km2": round(plan.area_km2, 4),
        "patches_with_data": sum(r["valid_patches"] for r in results),
        "embedding_dim": plan.grid.dim, "seconds": round(seconds, 2),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes_atomic(plan.manifest_uri, json.dumps(manifest, indent=2).encode())
    log.info("wrote layer %s, preview %s (%dx%d px), manifest %s", plan.layer_uri,
             plan.preview_uri, width, height, plan.manifest_uri)
    return manifest


def run_region(request: RegionRequest) -> dict:
    """The whole run in this process (what `anysat embed` does without Prefect)."""
    started = time.perf_counter()
    plan = plan_run(request)
    results: list[dict] = []
    for batch in tile_batches(plan):
        results.extend(embed_tiles(plan, batch))
        area = sum(r["area_km2"] for r in results)
        log.info("progress: %d/%d tiles, %.2f/%.2f km2", len(results), len(plan.tiles), area,
                 plan.area_km2)
    return finish_run(plan, results, time.perf_counter() - started)
