"""Cube loading throughput: odc-stac and stackstac against plain rasterio windowed reads.

Reads the same local COGs tile by tile (the way the pipeline does; `odc-stac-eager` is the
pipeline's path: no Dask graph, read into numpy at once) and prints one JSON line per
case and backend: case, backend, tiles, mb, seconds, mb_per_s, peak_rss_mb (each in a fresh
process, so the peak is that case's). MB counts the raw pixels delivered (uint16: 2 bytes).

Cases: `demo` (the embedded demo's 12 Sentinel-2 composites over its 1 km2, 9 bands), and
`tiled-N` (a generated 20 x 20 km catalog: the demo's real June pixels repeated into 2 x 2 items
of 1000 x 1000 px COGs, 6 dates, 4 bands, read as N tiles of 1280 m: memory should stay flat
as N grows).

    .venv/bin/python benchmarks/cube_load.py [--tiles 4 16 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("odc-stac", "odc-stac-eager", "stackstac", "rasterio")
DEMO_JUNE = Path(__file__).resolve().parents[1] / "catalogs/demo/sentinel-2-l2a/S2-L2A-DEMO-20210601"
BANDS = ("B02", "B03", "B04", "B08")
ITEM_PX, GRID, DATES, TILE_M = 1000, 2, 6, 1280.0
X0, Y0 = 469 * TILE_M, 4453 * TILE_M  # the generated items' corner, on the tile grid


def make_tiled_catalog(folder: Path) -> Path:
    """COGs of real demo pixels repeated to 1000 x 1000 px, and their items (JSON lines)."""
    import pystac
    import rasterio
    from rasterio.transform import from_origin

    from pyproj import Transformer

    x0, y0 = X0, Y0
    real = {}
    for band in BANDS:
        with rasterio.open(DEMO_JUNE / f"{band}.tif") as src:
            real[band] = src.read(1)
    to_ll = Transformer.from_crs(32631, 4326, always_xy=True)
    items = []
    for d in range(DATES):
        when = dt.datetime(2021, 6, 1 + 5 * d, 10, 30, tzinfo=dt.timezone.utc)
        for gy in range(GRID):
            for gx in range(GRID):
                west, north = x0 + gx * ITEM_PX * 10, y0 - gy * ITEM_PX * 10
                transform = from_origin(west, north, 10, 10)
                item_id = f"T{gx}{gy}-{when:%Y%m%d}"
                assets = {}
                for band in BANDS:
                    reps = -(-ITEM_PX // real[band].shape[0])
                    pixels = np.tile(np.roll(real[band], d * 7, axis=1), (reps, reps))[:ITEM_PX, :ITEM_PX]
                    path = folder / f"{item_id}_{band}.tif"
                    with rasterio.open(path, "w", driver="COG", width=ITEM_PX, height=ITEM_PX,
                                       count=1, dtype="uint16", crs="EPSG:32631",
                                       transform=transform, nodata=0, compress="deflate",
                                       blocksize=512) as dst:
                        dst.write(pixels, 1)
                    assets[band] = pystac.Asset(str(path), media_type=pystac.MediaType.COG)
                bbox_utm = (west, north - ITEM_PX * 10, west + ITEM_PX * 10, north)
                lons, lats = to_ll.transform([bbox_utm[0], bbox_utm[2]], [bbox_utm[1], bbox_utm[3]])
                bbox = [min(lons), min(lats), max(lons), max(lats)]
                item = pystac.Item(item_id, {"type": "Polygon", "coordinates": [[
                    [bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]], [bbox[0], bbox[3]],
                    [bbox[0], bbox[1]]]]}, bbox, when, {
                    "proj:code": "EPSG:32631", "proj:shape": [ITEM_PX, ITEM_PX],
                    "proj:transform": list(transform)[:6]}, collection="sentinel-2-l2a")
                for key, asset in assets.items():
                    item.add_asset(key, asset)
                items.append(item.to_dict(include_self_link=False))
    path = folder / "items.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    return path


def _tiles(case: str):
    from anysat.tiles import Tile

    if case == "demo":
        return [Tile(32631, 1107, 9352, 600.0)]  # the 600 m tile inside the demo's 1 km2
    per_side = int(round(int(case.split("-")[1]) ** 0.5))
    return [Tile(32631, int(X0 // TILE_M) + c, int(Y0 // TILE_M) - 1 - r, TILE_M)
            for r in range(per_side) for c in range(per_side)]


def _rasterio_tile(items, assets, tile, spec) -> np.ndarray:
    """The baseline: windowed reads per item and band, items of a date mosaicked (first wins)."""
    import rasterio
    from rasterio.windows import from_bounds

    side = round(tile.size_m / 10)
    dates = sorted({i.datetime for i in items})
    out = np.zeros((len(dates), len(assets), side, side), dtype="uint16")
    west, south, east, north = tile.bounds
    for item in items:
        t = dates.index(item.datetime)
        for b, key in enumerate(assets):
            with rasterio.open(item.assets[key].get_absolute_href()) as src:
                window = from_bounds(west, south, east, north, transform=src.transform)
                part = src.read(1, window=window, boundless=True, fill_value=0)
            empty = out[t, b] == 0
            out[t, b][empty] = part[empty]
    values = out.astype("float32") * np.float32(spec.scale) + np.float32(spec.offset)
    return np.where(out == spec.nodata, np.float32(np.nan), values)


def run_case(case: str, backend: str, items_path: str | None) -> dict:
    import pystac

    from anysat.cube import load_cube, read_cube
    from anysat.modalities import available_specs
    from anysat.stac import resolve_provider, search_items

    spec = available_specs()["sentinel-2-l2a"]
    tiles = _tiles(case)
    if case == "demo":
        naming, all_items = "demo", search_items(resolve_provider("demo"), spec, tiles[0].bbox_lonlat,
                                                 dt.date(2020, 11, 1), dt.date(2021, 10, 31))
    else:
        spec = spec.model_copy(update={"bands": tuple(b for b in spec.bands if b.name in BANDS),
                                       "cloud_mask": None})
        naming = "planetary-computer"
        all_items = [pystac.Item.from_dict(json.loads(line))
                     for line in Path(items_path).read_text().splitlines()]
    from shapely.geometry import box, shape

    started, pixels = time.perf_counter(), 0
    for tile in tiles:
        items = [i for i in all_items if shape(i.geometry).intersects(box(*tile.bbox_lonlat))]
        if backend == "rasterio":
            cube = _rasterio_tile(items, spec.asset_keys(naming), tile, spec)
        else:
            cube = read_cube(load_cube(items, spec, tile.geobox(10), naming=naming,
                                       backend=backend.removesuffix("-eager"),
                                       lazy=not backend.endswith("-eager"))).values
        pixels += cube.size
    seconds = time.perf_counter() - started
    mb = pixels * 2 / 1e6
    return {"case": case, "backend": backend, "tiles": len(tiles), "mb": round(mb, 2),
            "seconds": round(seconds, 3), "mb_per_s": round(mb / seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--one", nargs=3, metavar=("CASE", "BACKEND", "ITEMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(*args.one)), flush=True)
        return
    with tempfile.TemporaryDirectory() as folder:
        items = make_tiled_catalog(Path(folder))
        cases = ["demo", *(f"tiled-{n}" for n in args.tiles)]
        for case in cases:
            for backend in BACKENDS:
                subprocess.run([sys.executable, __file__, "--one", case, backend, str(items)],
                               check=True)


if __name__ == "__main__":
    main()
