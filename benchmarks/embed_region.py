"""Throughput and memory of the embed-region pipeline (CLI path, no Prefect), end to end
against forward only, as the number of tiles grows.

The demo catalog's real pixels (S2 L2A, S1, DEM over 1 km2) are repeated into a static
catalog of k x k km (every asset's COG tiled, the items' footprints and projection fields
updated; 6 x 6 km for 64 tiles of 600 m), and regions of 1, 4, 16 and 64 tiles of 600 m
(`--tiles` up to 1024: 369 km2 from a 20 x 20 km catalog made in ~15 s, a run long enough
for a GPU's readers to go round their squares more than once, so it shows its steady rate
rather than the wait for the first squares; `--tile-size-m`: 2,400 m as the continental deployment) are embedded from it with the
shipped checkpoint, S2 + S1 + DEM, 30 m patches. Each case runs in a fresh process (so
`peak_rss_mb` is that case's) and prints one JSON line: case, tiles, batch_size (tiles per
forward), device, dtype, area_km2, seconds, km2_per_s (end to end: plan, reads, forward,
writes, preview), embed_km2_per_s (the tiles' reads, forwards and writes alone, without the
plan and the preview: what a continental run's pods do, its products being made once at the
end) and where its thread spent that time (stream_reads_s: waiting for reads, stream_model_s:
batching, copies and forward, stream_writes_s: waiting for writes), model_km2_per_s (the
forward alone, on the same tiles' batches, at most the first 256, same batch size),
tile_size_m, read_km2_per_s (the cube reads alone, in the run's blocks, on read_threads
threads each, read_workers blocks at once in read_pool: reader processes or threads beside an
accelerator, one in turn with a CPU model; reader processes start before timing, like the model),
peak_rss_mb, and for the products asked (`--products`, besides the preview, which is always
made) the seconds per tile of each and `products_share`: their part of the end-to-end time,
and outside_stream_s: the end-to-end seconds outside the tiles' stream (plan, layers, preview,
products, STAC, manifest: a run's fixed cost; 369 km2 at 28 km2/s is 13 s in all).
`--instant-forward` replaces the model's forward by zeros and runs the stream as beside an
accelerator (reader processes, writer threads), on any machine: the rate the host can feed a
device (model_km2_per_s is then null).

    .venv/bin/python benchmarks/embed_region.py [--tiles 1 4 16 64] [--batch-sizes 1 4 16]
        [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--model demo|base|...]
        [--tile-size-m 600|2400] [--products cog,vectors,clusters] [--quantize int8]
        [--instant-forward]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[1] / "catalogs" / "demo"
WEST, NORTH = 664000.0, 5612120.0  # the demo's square kilometre's corner (UTM 31N)
FORWARD_TILES = 256  # tiles the forward alone is timed on (their batches held in memory)


def first_tile(tile_m: float) -> tuple[int, int]:
    """Grid column and row of the first whole tile south-east of the demo's corner."""
    return math.ceil(WEST / tile_m), math.floor(NORTH / tile_m) - 1


def repeats_for(tiles: int, tile_m: float) -> int:
    """Times the demo's kilometre is repeated (each way) to hold k x k whole tiles."""
    col0, row0 = first_tile(tile_m)
    k = math.isqrt(tiles)
    return math.ceil(max((col0 + k) * tile_m - WEST, NORTH - (row0 + 1 - k) * tile_m) / 1000)


def make_catalog(folder: Path, repeats: int) -> Path:
    """A copy of the demo catalog whose every asset is its real pixels tiled `repeats` times."""
    import pystac
    import rasterio
    from pyproj import Transformer

    shutil.copytree(DEMO, folder, dirs_exist_ok=True)
    catalog = pystac.Catalog.from_file(str(folder / "catalog.json"))
    for item in catalog.get_items(recursive=True):
        for asset in item.assets.values():
            path = asset.get_absolute_href()
            if not path.endswith(".tif"):
                continue
            with rasterio.open(path) as src:
                pixels, profile = src.read(), src.profile
            tiled = np.tile(pixels, (1, repeats, repeats))
            profile.update(driver="COG", width=tiled.shape[2], height=tiled.shape[1],
                           compress="deflate", blocksize=512)
            profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(tiled)
            shape, transform = tiled.shape[1:], profile["transform"]
        west, north = transform.c, transform.f
        east, south = west + shape[1] * transform.a, north + shape[0] * transform.e
        item.properties.update({"proj:shape": list(shape), "proj:bbox": [west, south, east, north]})
        to_ll = Transformer.from_crs(item.properties["proj:code"], 4326, always_xy=True)
        ring = [to_ll.transform(x, y) for x, y in
                ((west, south), (east, south), (east, north), (west, north), (west, south))]
        item.geometry = {"type": "Polygon", "coordinates": [ring]}
        lons, lats = zip(*ring)
        item.bbox = [min(lons), min(lats), max(lons), max(lats)]
    catalog.save()
    return folder / "catalog.json"


def region(tiles: int, tile_m: float = 600.0) -> dict:
    """A GeoJSON polygon over k x k whole tiles of the grid (inset 1 m, so no neighbour; a
    point every 100 m along its edges, which would otherwise bow out of the square in UTM)."""
    from pyproj import Transformer

    k = int(math.isqrt(tiles))
    col0, row0 = first_tile(tile_m)
    x0, y1 = col0 * tile_m + 1, (row0 + 1) * tile_m - 1
    x1, y0 = (col0 + k) * tile_m - 1, (row0 + 1 - k) * tile_m + 1
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    steps = max(1, math.ceil((x1 - x0) / 100))
    points = [(ax + (bx - ax) * i / steps, ay + (by - ay) * i / steps)
              for (ax, ay), (bx, by) in zip(corners, corners[1:]) for i in range(steps)]
    to_ll = Transformer.from_crs(32631, 4326, always_xy=True)
    ring = [to_ll.transform(x, y) for x, y in points + corners[:1]]
    return {"type": "Polygon", "coordinates": [ring]}


def run_case(catalog: str, tiles: int, batch_size: int, device: str, dtype: str, model: str,
             products: tuple[str, ...] = (), quantize: str = "none", tile_m: float = 600.0,
             instant_forward: bool = False) -> dict:
    import torch

    from anysat.cli import DEMO_DATES
    from anysat.batch import stack_samples
    from anysat.cube.batch import READ_THREADS
    from anysat.pipeline import get_model, overlaps_io, run_region, run_squares
    from anysat.readers import BlockReaders, block_readers, reader_pool, start_readers
    from anysat.plan import read_plan
    from anysat.request import RegionRequest

    logging.disable(logging.WARNING)  # the generated catalog has no cloud-mask asset
    with tempfile.TemporaryDirectory() as out:
        request = RegionRequest.build(geojson=region(tiles, tile_m), start=DEMO_DATES[0],
                                      end=DEMO_DATES[1], tile_size_m=tile_m,
                                      catalog=catalog, output_uri=out, model=model,
                                      batch_size=batch_size, device=device, dtype=dtype,
                                      tiles_per_batch=max(batch_size, 16), products=products,
                                      quantize=quantize)
        net = get_model(request.model, request.sensors, request.device)  # loaded before timing
        if instant_forward:
            use_instant_forward(net, tile_m)
        overlap = instant_forward or overlaps_io(net)
        if overlap and reader_pool() == "processes":
            start_readers(block_readers())
        started = time.perf_counter()
        manifest = run_region(request)
        seconds = time.perf_counter() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the run's own
        assert manifest["tiles"] == tiles, manifest["tiles"]
        # the reads alone (the same blocks, threads and items as the run), then the forward
        # alone on the same tiles, batched the same way
        plan = read_plan(out, request)
        blocks = run_squares(plan)
        begun = time.perf_counter()
        samples = []  # the first FORWARD_TILES tiles' batches, for the forward alone; the
        # others are dropped as they land, so shared memory holds only the squares in flight
        with BlockReaders(plan, overlap) as readers:  # as the run reads
            futures = [readers.submit(*block) for block in blocks]
            for future in futures:
                square = readers.result(future)
                samples += [batch for _, batch, _, _ in square][:FORWARD_TILES - len(samples)]
                del square
        reads = time.perf_counter() - begun
        cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
        forward = 0.0
        for i in range(0, len(samples), batch_size):
            batch = {k: v.to(device) for k, v in  # as the run stacks them
                     stack_samples(samples[i:i + batch_size], without_empty=True).items()}
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            begun = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=cast,
                                                        enabled=cast is not None):
                net(batch, request.patch_size_m, output="patch").float().cpu()
            forward += time.perf_counter() - begun
    area = manifest["area_km2"]
    product_s = {k: sum(z["product_seconds"].get(k, 0) for z in manifest["layers"])
                 for k in ("preview", *products)}
    product_s["stac"] = manifest["stac_seconds"]
    return {"case": f"demo_repeated_{tiles}_tiles{'' if tile_m == 600 else f'_of_{tile_m:g}m'}"
                    f"{'_instant_forward' if instant_forward else ''}",
            "tiles": tiles, "tile_size_m": tile_m, "batch_size": batch_size,
            "device": device, "dtype": dtype, "model": model, "area_km2": area,
            "torch_threads": torch.get_num_threads(), "seconds": round(seconds, 2),
            "km2_per_s": round(area / seconds, 4),
            "embed_km2_per_s": round(area / manifest["embedding"]["seconds"], 4),
            **{f"stream_{k}": manifest["embedding"].get(k, 0) for k in ("reads_s", "model_s", "writes_s")},
            "model_km2_per_s": (None if instant_forward else
                                round(len(samples) * tile_m ** 2 / 1e6 / forward, 4)),
            "read_km2_per_s": round(area / reads, 4), "read_threads": READ_THREADS,
            "read_workers": readers.workers, "read_pool": readers.kind,
            "peak_rss_mb": round(peak_rss_mb, 1), "quantize": quantize,
            **{f"{k}_s_per_tile": round(v / tiles, 4) for k, v in product_s.items()},
            "products_share": round(sum(product_s.values()) / seconds, 4),
            "outside_stream_s": round(seconds - manifest["embedding"]["seconds"], 2)}


def use_instant_forward(net, tile_m: float) -> None:
    """Replace the model's forward by zeros of its output's shape, and run the stream as beside
    an accelerator (reader processes or threads, writer threads): the rate the host's reads,
    batching and writes can feed a device, which a GPU's forward must not wait on."""
    import torch

    from anysat import pipeline

    def forward(self, batch, patch_size_m, output="patch", check_values=True):
        side = round(tile_m / patch_size_m)
        return torch.zeros(next(iter(batch.values())).shape[0], side, side, self.config.dim)

    type(net).forward = forward
    pipeline.overlaps_io = lambda model: True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="square numbers up to 1024")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--model", default="demo", help="demo (the shipped checkpoint) or a size")
    parser.add_argument("--products", default="", help="comma-separated: cog, vectors, clusters")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"])
    parser.add_argument("--instant-forward", action="store_true",
                        help="the model's forward replaced by zeros, run as beside an accelerator: "
                             "what the host's reads, batching and writes can feed")
    parser.add_argument("--tile-size-m", type=float, default=600.0,
                        help="tile side: a multiple of 30 m (600; 2400 as the continental deployment)")
    parser.add_argument("--one", nargs=2, metavar=("CATALOG", "TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        catalog, tiles = args.one
        products = tuple(p for p in args.products.split(",") if p)
        print(json.dumps(run_case(catalog, int(tiles), args.batch_sizes[0], args.device,
                                  args.dtype, args.model, products, args.quantize,
                                  args.tile_size_m, args.instant_forward)), flush=True)
        return
    if any(math.isqrt(n) ** 2 != n or n > 1024 for n in args.tiles):
        parser.error("--tiles must be square numbers up to 1024")
    with tempfile.TemporaryDirectory() as folder:
        catalog = str(make_catalog(Path(folder), repeats_for(max(args.tiles), args.tile_size_m)))
        for tiles in args.tiles:
            for batch_size in args.batch_sizes:
                if batch_size > tiles and batch_size != args.batch_sizes[0]:
                    continue  # a batch larger than the run is the run
                subprocess.run([sys.executable, __file__, "--one", catalog, str(tiles),
                                "--batch-sizes", str(batch_size), "--device", args.device,
                                "--dtype", args.dtype, "--model", args.model, "--products",
                                args.products, "--quantize", args.quantize,
                                "--tile-size-m", str(args.tile_size_m),
                                *(["--instant-forward"] if args.instant_forward else [])], check=True)


if __name__ == "__main__":
    main()
