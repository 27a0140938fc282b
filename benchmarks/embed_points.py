"""Point time series embedding speed: one JSON line per case.

    python benchmarks/embed_points.py [--model demo] [--batch-sizes 1 64 256] [--device cpu]

Embeds the 485 WorldCereal points (12 monthly S2 L2A + S1 steps each, 10 m footprint) that
`anysat evaluate` probes on. Keys: case, points, batch_size, seconds, points_per_s,
peak_rss_mb, device, threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anysat import load_model  # noqa: E402
from anysat.evaluate.report import evaluation_data  # noqa: E402
from anysat.evaluate.worldcereal import read_worldcereal_points  # noqa: E402
from anysat.points import embed_points  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model).to(args.device)
    points = read_worldcereal_points(str(evaluation_data() / "worldcereal" /
                                         "test_public_extractions.parquet"))
    for batch_size in args.batch_sizes:
        embed_points(model, points.series.subset(range(min(8, len(points.labels)))), batch_size)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            embed_points(model, points.series, batch_size)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        best = min(times)
        print(json.dumps({
            "case": f"worldcereal-points-b{batch_size}", "points": len(points.labels),
            "batch_size": batch_size, "seconds": round(best, 3),
            "points_per_s": round(len(points.labels) / best, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": args.device, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
