"""Throughput of the embed-region pipeline (CLI path, no Prefect) on the demo catalog.

Prints one JSON line per case: case, batch_size (tiles per forward), tiles, area_km2,
seconds, seconds_per_tile, km2_per_s, peak_rss_mb. Runs on CPU, or on GPU with --device cuda
(the model only; I/O stays on CPU).

    .venv/bin/python benchmarks/embed_region.py [--device cpu|cuda] [--dtype bf16] [--batch-sizes 1 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import tempfile
import time

import torch

from anysat.cli import DEMO_BBOX, DEMO_DATES
from anysat.pipeline import get_model, run_region
from anysat.request import RegionRequest

CASES = {
    "demo_s2_s1_dem_patch30": dict(sensors=("s2", "s1", "dem"), patch_size_m=30.0),
    "demo_s2_s1_patch20": dict(sensors=("s2", "s1"), patch_size_m=20.0),
    "demo_s2_patch10": dict(sensors=("s2",), patch_size_m=10.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="tiles per forward")
    args = parser.parse_args()
    for (case, fields), batch_size in itertools.product(CASES.items(), args.batch_sizes):
        with tempfile.TemporaryDirectory() as out:
            request = RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1],
                                          output_uri=out, batch_size=batch_size, device=args.device,
                                          dtype=args.dtype, tiles_per_batch=9, **fields)
            get_model(request.model, request.sensors, request.device)  # loaded before timing
            started = time.perf_counter()
            manifest = run_region(request)
            seconds = time.perf_counter() - started
        print(json.dumps({
            "case": case, "batch_size": batch_size, "device": args.device, "dtype": args.dtype,
            "torch_threads": torch.get_num_threads(),
            "tiles": manifest["tiles"], "area_km2": manifest["area_km2"],
            "seconds": round(seconds, 2), "seconds_per_tile": round(seconds / manifest["tiles"], 3),
            "km2_per_s": round(manifest["area_km2"] / seconds, 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
