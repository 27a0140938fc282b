"""Training chips: every sensor of one footprint, with dates and masks, in a sharded Zarr store.

Layout under the store URI (any fsspec URI: a path, s3://, gs://...):

    {tile_id}/                  attrs: tile, epsg, bounds, sensors, start, end, complete
      {sensor}/pixels           float32 [T, C, H, W], NaN where invalid; one shard, a chunk per date
      {sensor}/mask             bool    [T, H, W], True where the pixel-date is valid
      {sensor}/dates            int32   [T], days since 1970-01-01

A chip is written whole, then marked `complete`; readers list only complete chips and a rerun
rewrites an incomplete one, so a run that dies midway leaves nothing that looks finished.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import torch
import zarr

from .. import storage
from ..modalities import ModalitySpec
from ..stac.providers import Provider
from ..tiles import Tile

log = logging.getLogger("anysat")


def write_chip(store_uri: str, tile: Tile, batch: dict[str, torch.Tensor], specs: list[ModalitySpec],
               attrs: dict | None = None) -> str:
    """Write one footprint batch (B = 1, as `pipeline.load_tile_batch` returns) as a chip."""
    names = [s.name for s in specs if s.name in batch]
    root = zarr.open_group(store_uri, mode="a", zarr_format=3)
    group = root.create_group(tile.id, overwrite=True)
    group.attrs.update({"tile": tile.id, "epsg": tile.epsg, "bounds": list(tile.bounds),
                        "size_m": tile.size_m, "sensors": names, "complete": False, **(attrs or {})})
    for spec in specs:
        if spec.name not in batch:
            continue
        pixels = batch[spec.name][0].numpy()
        t, c, h, w = pixels.shape
        sensor = group.create_group(spec.name)
        sensor.attrs.update({"gsd_m": spec.gsd_m, "bands": spec.band_names})
        sensor.create_array("pixels", shape=pixels.shape, dtype="float32", shards=(t, c, h, w),
                            chunks=(1, c, h, w), fill_value=np.nan)[...] = pixels
        sensor.create_array("mask", shape=(t, h, w), dtype="bool", shards=(t, h, w),
                            chunks=(1, h, w))[...] = batch[f"{spec.name}_mask"][0].numpy()
        sensor.create_array("dates", shape=(t,), dtype="int32", chunks=(t,))[...] = (
            batch[f"{spec.name}_dates"][0].numpy().astype("int32"))
    group.attrs["complete"] = True  # last: the chip is whole
    return tile.id


def list_chips(store_uri: str) -> list[str]:
    """Ids of the complete chips in a store (incomplete ones are skipped)."""
    if not storage.exists(storage.join(store_uri, "zarr.json")):
        return []
    root = zarr.open_group(store_uri, mode="r", zarr_format=3)
    return sorted(name for name, g in root.groups() if g.attrs.get("complete"))


def read_chip(store_uri: str, tile_id: str) -> dict[str, torch.Tensor]:
    """A chip as a model batch (B = 1): what `ChipSampler` and `pretrain` take."""
    group = zarr.open_group(storage.join(store_uri, tile_id), mode="r", zarr_format=3)
    if not group.attrs.get("complete"):
        raise FileNotFoundError(f"chip {tile_id} in {store_uri} is incomplete; rerun write_chips")
    batch = {}
    for name in group.attrs["sensors"]:
        sensor = group[name]
        batch[name] = torch.from_numpy(sensor["pixels"][...])[None]
        batch[f"{name}_mask"] = torch.from_numpy(sensor["mask"][...])[None]
        batch[f"{name}_dates"] = torch.from_numpy(sensor["dates"][...].astype("float32"))[None]
    return batch


def write_chips(provider: Provider, specs: list[ModalitySpec], tiles: list[Tile], start: dt.date,
                end: dt.date, store_uri: str, *, max_cloud: float | None = None,
                time_bin: str | None = None) -> list[str]:
    """Load and write the chips of `tiles`; complete chips already in the store are kept."""
    from ..pipeline import load_tile_batch

    store_uri = storage.normalize_uri(store_uri)
    done = set(list_chips(store_uri))
    written = []
    for n, tile in enumerate(tiles, start=1):
        if tile.id in done:
            log.info("chip %s already complete (%d/%d)", tile.id, n, len(tiles))
            continue
        batch, dates = load_tile_batch(provider, specs, tile, start, end, max_cloud=max_cloud,
                                       time_bin=time_bin)
        if not batch:
            log.info("tile %s: no sensor has data, no chip (%d/%d)", tile.id, n, len(tiles))
            continue
        catalog = provider.name.split("?")[0]  # a URL's query may hold a token
        write_chip(store_uri, tile, batch, specs, {"start": str(start), "end": str(end),
                                                   "catalog": catalog})
        written.append(tile.id)
        log.info("chip %s: dates %s, %.2f km2 (%d/%d)", tile.id, dates, tile.area_km2, n, len(tiles))
    return written
