"""How the reads of a run's squares scale with the readers beside an accelerator: reader
processes against reader threads, 1 to N at once (what feeds a GPU, without the GPU).

The 64 tiles of 600 m of `embed_region.py` (the demo's real pixels repeated), planned once;
their squares (the plan's `read_side`: one of 8 x 8 tiles) are read `--rounds` times over
(4, or 8 squares per reader), as `pipeline.embed_tiles` reads them (`readers.BlockReaders`),
batches taken back in the caller. One JSON line per case: case, pool, workers, squares,
read_side, km2_per_s, seconds, cpus. Reader processes are started before timing (a run
starts them once per process).

    .venv/bin/python benchmarks/block_reads.py [--workers 1 2 4 8] [--pools processes threads]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from embed_region import make_catalog, region, repeats_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pools", nargs="+", default=["processes", "threads"],
                        choices=["processes", "threads"])
    parser.add_argument("--rounds", type=int, default=0,
                        help="times each square is read (default: 8 squares per reader, >= 4)")
    args = parser.parse_args()

    from anysat.cli import DEMO_DATES
    from anysat.pipeline import plan_run, run_squares
    from anysat.readers import BlockReaders, start_readers
    from anysat.request import RegionRequest

    logging.disable(logging.WARNING)  # the generated catalog has no cloud-mask asset
    logging.getLogger("anysat").setLevel(logging.ERROR)  # and in the reader processes
    with tempfile.TemporaryDirectory() as folder:
        catalog = str(make_catalog(Path(folder) / "catalog", repeats_for(64, 600.0)))
        request = RegionRequest.build(geojson=region(64), start=DEMO_DATES[0], end=DEMO_DATES[1],
                                      catalog=catalog, output_uri=str(Path(folder) / "out"),
                                      model="demo", tiles_per_batch=16)
        plan = plan_run(request, create_layers=False)
        squares = run_squares(plan)
        for pool in args.pools:
            for workers in args.workers:
                os.environ.update(ANYSAT_READER_POOL=pool, ANYSAT_BLOCK_READERS=str(workers))
                if pool == "processes":
                    start_readers(workers)
                rounds = args.rounds or max(4, -(-8 * workers // len(squares)))
                begun = time.perf_counter()
                with BlockReaders(plan, overlap=True) as readers:
                    futures = [readers.submit(*square) for _ in range(rounds) for square in squares]
                    tiles = sum(len(readers.result(future)) for future in futures)
                seconds = time.perf_counter() - begun
                area = tiles * request.tile_size_m ** 2 / 1e6
                side = plan.read_side
                print(json.dumps({"case": f"squares_of_{side}x{side}_tiles_{pool}_{workers}",
                                  "pool": pool, "workers": workers, "squares": len(futures),
                                  "read_side": side,
                                  "km2_per_s": round(area / seconds, 2),
                                  "seconds": round(seconds, 2), "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
