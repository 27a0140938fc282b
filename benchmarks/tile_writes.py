"""How fast a run's tiles are written, by how many writer threads, to a local disk and to an
object store with a round trip per request: one JSON line per case.

Each tile is written as `pipeline._write_tile` writes it: its patch embeddings into its chunk
of the zone's layer (`LayerWriter`: the embedding chunk, with `--quantize int8` its scale
chunk, and its overview chunk), then its done-marker. The layer is a continental zone's
(`--grid-tiles` tiles a side, 30 m patches, `--dim` wide: large enough to carry an
overview, as a continent's layers do), created once per case; the tiles are the zone's
first `--tiles`, random values with a tenth of the patches without data. The S3 store is the
loopback server (`s3_loopback.py`), holding every request `--latency-ms` before answering.

Keys: case, store, latency_ms, quantize, threads, tile_size_m, tiles, seconds, tiles_per_s,
km2_per_s, grid_tiles and create_layer_s: the seconds the empty layer took to create (its
metadata, coordinates and overview; no chunk). At 28 km2/s a GPU run embeds a 600 m tile
every 13 ms, a 2,400 m tile every 206 ms.

    python benchmarks/tile_writes.py [--stores local s3] [--latency-ms 20] [--threads 1 4 16]
        [--tile-size-m 600|2400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_loopback import start_s3  # noqa: E402

from anysat import storage  # noqa: E402
from anysat.pipeline import PREVIEW_MAX_SIDE  # noqa: E402
from anysat.products.zarr_layer import LayerGrid, LayerWriter, create_layer  # noqa: E402
from anysat.tiles import Tile  # noqa: E402

EPSG, PATCH_M = 32631, 30.0


def run_case(root: str, store: str, latency_ms: float, quantize: str, threads: int, tiles: int,
             tile_m: float, grid_tiles: int, dim: int) -> dict:
    grid = LayerGrid(EPSG, tile_m, PATCH_M, 1000, 9000, grid_tiles, grid_tiles, dim,
                     "int8" if quantize == "int8" else "float32")
    uri = storage.join(root, f"{store}-{quantize}-{threads}")
    begun = time.perf_counter()
    create_layer(storage.join(uri, "layer.zarr"), grid, {"plan_hash": "bench"},
                 preview_max_side=PREVIEW_MAX_SIDE)
    create_s = time.perf_counter() - begun
    writer = LayerWriter(storage.join(uri, "layer.zarr"), grid)
    rng = np.random.default_rng(0)
    side = grid.tile_px
    patches = rng.standard_normal((tiles, side, side, dim), dtype=np.float32)
    patches[:, rng.random((side, side)) < 0.1] = np.nan

    def write(i: int) -> None:
        tile = Tile(EPSG, 1000 + i % grid_tiles, 9000 - i // grid_tiles, tile_m)
        writer.write(tile, patches[i])
        storage.write_bytes_atomic(storage.join(uri, "tiles", f"{tile.id}.json"),
                                   json.dumps({"tile": tile.id, "status": "done"}).encode())

    write(0)  # the first chunk's set-up (zarr's, s3fs's session) is no tile's cost
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(1, tiles)))
    seconds = time.perf_counter() - started
    rate = (tiles - 1) / seconds
    return {"case": f"writes-{store}-{threads}t", "store": store, "latency_ms": latency_ms,
            "quantize": quantize, "threads": threads, "tile_size_m": tile_m, "tiles": tiles - 1,
            "seconds": round(seconds, 3), "tiles_per_s": round(rate, 1),
            "km2_per_s": round(rate * tile_m**2 / 1e6, 2), "grid_tiles": grid_tiles**2,
            "create_layer_s": round(create_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="the S3 server's wait before each answer")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tiles", type=int, default=129)
    parser.add_argument("--tile-size-m", type=float, default=600.0)
    parser.add_argument("--grid-tiles", type=int, default=200,
                        help="the layer's side in tiles (200 of 600 m: 4,000 px, with an overview)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=["none", "int8"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for store in args.stores:
            if store == "s3":
                start_s3(args.latency_ms)
                root = f"s3://bench/writes-{os.getpid()}"
            else:
                root = folder
            for quantize in args.quantize:
                for threads in args.threads:
                    print(json.dumps(run_case(root, store, args.latency_ms if store == "s3" else 0.0,
                                              quantize, threads, args.tiles, args.tile_size_m,
                                              args.grid_tiles, args.dim)), flush=True)


if __name__ == "__main__":
    main()
