"""Prefect flow `embed-region`: plan tiles, embed tile batches on Dask, write layer + preview.

Run the demo: python -m flows.embed_region --demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "anysat")  # library logs reach Prefect
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")     # scheduler chatter off
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network to report to

from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402

from anysat import lease, pipeline, storage  # noqa: E402
from anysat.cli import add_request_arguments, attach_negative_values, request_from_args  # noqa: E402
from anysat.errors import AnySatError  # noqa: E402
from anysat.redact import redact_logs, without_secrets  # noqa: E402
from anysat.request import RegionRequest  # noqa: E402
from anysat.plan import plan_for_worker  # noqa: E402
from flows.dask_runner import dask_task_runner  # noqa: E402
from flows.local_server import prefect_server  # noqa: E402

redact_logs(logging.getLogger("anysat"))  # library records reach Prefect's API without tokens

# Resume is handled by the library's per-tile done-markers, not by Prefect's result cache.
plan_run = task(pipeline.plan_run, name="plan-tiles", cache_policy=NO_CACHE)
finish_run = task(pipeline.finish_run, name="write-preview-and-manifest", cache_policy=NO_CACHE)


@task(name="embed-tile-batch", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def embed_batch(request: RegionRequest, plan_hash: str, tile_ids: list[str]) -> list[dict]:
    # workers read the saved plan themselves: a continent's tile table never travels per task
    return pipeline.embed_tiles(plan_for_worker(request, plan_hash), tile_ids)


def zone_rows(zone: dict) -> str:
    """Markdown rows of one zone's products (URIs and the seconds each took)."""
    epsg = f"EPSG:{zone['epsg']}"
    rows = [f"| {epsg} layer | `{zone['layer']}` ({zone['tiles']} tiles, {zone['area_km2']:.2f} km²) |",
            f"| {epsg} preview | `{zone['preview']}` |"]
    rows += [f"| {epsg} COG | `{uri}` |" for uri in zone.get("cogs", [])]
    rows += [f"| {epsg} {kind} | `{zone[kind]['png']}`, COGs `{', '.join(zone[kind]['cogs'])}` |"
             for kind in ("clusters", "classes") if kind in zone]
    if "vectors" in zone:
        rows.append(f"| {epsg} vectors | `{zone['vectors']['patches']}`, `{zone['vectors']['tiles']}` |")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in zone["product_seconds"].items())
    rows.append(f"| {epsg} product time | {seconds} |")
    return "".join(row + "\n" for row in rows)


@flow(name="embed-region", task_runner=dask_task_runner(), validate_parameters=True)
def embed_region(request: RegionRequest) -> dict:
    """Embed a region (lon/lat bbox or GeoJSON) between two dates into a Zarr layer per UTM
    zone, with its preview and the products asked for. The parameter is the request model
    itself: the Prefect UI renders its form, and bad fields fail before any work."""
    logger = get_run_logger()
    started = time.perf_counter()
    with lease.hold(request.output_uri, "embed-region flow"):  # one writer per output
        plan = plan_run(request)
        batches = pipeline.tile_batches(plan)
        embedding = time.perf_counter()
        futures = embed_batch.map(unmapped(request), unmapped(plan.hash), batches)
        tally = pipeline.TileTally()
        for future in as_completed(futures):
            tally.add(future.result())
            logger.info("progress: %s", tally.progress(plan))
        manifest = finish_run(plan, tally, time.perf_counter() - started,
                              pipeline.embedded(tally, time.perf_counter() - embedding))
    create_markdown_artifact(
        key="embed-region-summary",
        markdown=(
            f"# embed-region\n\n| | |\n|---|---|\n| tiles | {manifest['tiles']} |\n"
            f"| area | {manifest['area_km2']:.2f} km² |\n"
            f"| patches with data | {manifest['patches_with_data']} |\n"
            f"| time | {manifest['seconds']:.1f} s |\n| plan | `{manifest['plan']}` |\n"
            f"| STAC | `{manifest['stac']}` |\n"
            + "".join(zone_rows(z) for z in manifest["layers"])),
        description="What embed-region wrote")
    return manifest


@flow(name="embed-month", validate_parameters=True)
def embed_month(request: RegionRequest, month: str | None = None) -> dict:
    """A scheduled region run: the calendar month before the run's scheduled time (or
    `month`, YYYY-MM) replaces the request's dates, and its layers go under
    `<output_uri>/<YYYY-MM>`, so each month is its own resumable output."""
    import datetime as dt

    from prefect.runtime import flow_run

    if month:
        try:
            first = dt.date.fromisoformat(f"{month}-01")
        except ValueError:
            raise AnySatError(f"month {month!r} is not YYYY-MM") from None
    else:
        scheduled = flow_run.scheduled_start_time or dt.datetime.now(dt.timezone.utc)
        first = (scheduled.date().replace(day=1) - dt.timedelta(days=1)).replace(day=1)
    last = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(days=1)
    fields = {**request.model_dump(), "start": first, "end": last,
              "output_uri": storage.join(request.output_uri, first.strftime("%Y-%m"))}
    get_run_logger().info("embedding %s to %s into %s", first, last, fields["output_uri"])
    return embed_region(RegionRequest.build(**fields))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        request = request_from_args(args)
        with prefect_server():
            manifest = embed_region(request)
    except AnySatError as exc:
        print(f"embed-region: error: {without_secrets(str(exc))}", file=sys.stderr)
        return 2
    print("\nembed-region wrote:")
    print(json.dumps({k: manifest[k] for k in ("layers", "tiles", "area_km2", "patches_with_data",
                                                  "seconds", "plan", "manifest")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
