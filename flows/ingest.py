"""Prefect flow `ingest`: training chips of a region and dates, tile batches on Dask.

    python -m flows.ingest --demo --chip-size-m 120 --store s3://bucket/chips.zarr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "anysat")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402

from anysat.cli import add_ingest_arguments, attach_negative_values, ingest_request_from_args  # noqa: E402
from anysat.errors import AnySatError  # noqa: E402
from anysat.redact import without_secrets  # noqa: E402
from anysat.plan import plan_for_worker  # noqa: E402
from anysat.request import RegionRequest  # noqa: E402
from anysat.train import ingest as library  # noqa: E402
from flows.dask_runner import dask_task_runner  # noqa: E402
from flows.local_server import prefect_server  # noqa: E402

# Resume is the chips' own `complete` flags, not Prefect's result cache.
plan_ingest = task(library.plan_ingest, name="plan-chips", cache_policy=NO_CACHE)
finish_ingest = task(library.finish_ingest, name="write-chip-index", cache_policy=NO_CACHE)


@task(name="ingest-tile-batch", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def ingest_batch(request: RegionRequest, plan_uri: str, plan_hash: str, tile_ids: list[str]) -> list[dict]:
    # workers read the saved plan themselves: a continent's chip table never travels per task
    run = plan_for_worker(request, plan_hash, plan_uri)
    return library.ingest_tiles(library.IngestPlan(request, run.request.output_uri, run), tile_ids)


@flow(name="ingest", task_runner=dask_task_runner(), validate_parameters=True)
def ingest(request: RegionRequest) -> dict:
    """Write the training chips of a region (bbox or GeoJSON; each feature in its own UTM
    zone) between two dates to a chip store, then its index. The parameter is the region
    request: `tile_size_m` is the chip size (a multiple of every sensor's GSD) and
    `output_uri` the chip store; model and product fields are not used."""
    logger = get_run_logger()
    started = time.perf_counter()
    fields = request.model_dump(exclude={"tile_size_m", "patch_size_m", "output_uri"})
    request = library.ingest_request(request.tile_size_m, request.output_uri, **fields)
    chip_size_m = request.tile_size_m
    plan = plan_ingest(request)
    batches = library.tile_batches(plan)
    futures = ingest_batch.map(unmapped(request), unmapped(plan.run.uri), unmapped(plan.run.hash),
                               batches)
    tiles_of = {f.task_run_id: len(b) for f, b in zip(futures, batches)}
    rows: list[dict] = []
    done = 0
    for future in as_completed(futures):
        rows.extend(future.result())
        done += tiles_of[future.task_run_id]
        logger.info("progress: %d/%d tiles, %d chips, %.2f/%.2f km2", done, len(plan.tiles),
                    len(rows), done * chip_size_m ** 2 / 1e6, plan.area_km2)
    summary = finish_ingest(plan, rows, time.perf_counter() - started)
    create_markdown_artifact(
        key="ingest-summary",
        markdown="# ingest\n\n| | |\n|---|---|\n" + "".join(
            f"| {k} | {v} |\n" for k, v in summary.items()),
        description="What ingest wrote")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ingest_arguments(parser)
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        request = ingest_request_from_args(args)
        with prefect_server():
            summary = ingest(request)
    except AnySatError as exc:
        print(f"ingest: error: {without_secrets(str(exc))}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
