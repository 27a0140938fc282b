"""Prefect flow `continental`: one saved plan, its tile blocks embedded by deployment runs.

The parent plans the region once (every UTM zone, every block of 16 x 16 tiles) and holds the
output's lease; each block becomes a run of an `embed-tiles` deployment (a pod of its own on
a cluster), at most `max_concurrent_blocks` at a time. A block's record
(`<output>/blocks/<zone>_<block>.json`) names its run and is marked done when the run
completes, so a rerun after the parent died runs only unfinished blocks. Block runs are
created with an idempotency key, so a rerun gets back (and waits for) a run the dead parent
had already started, even one it had not recorded yet. Tiles keep their own done markers: a
block run that died midway redoes only its unfinished tiles.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "anysat")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402

from anysat import lease, pipeline, storage  # noqa: E402
from anysat.errors import TilesFailedError  # noqa: E402
from anysat.plan import RunPlan, plan_for_worker  # noqa: E402
from anysat.request import RegionRequest  # noqa: E402

POLL_S = 5.0


@flow(name="embed-tiles", validate_parameters=True)
def embed_tiles(request: RegionRequest, plan_hash: str, tile_ids: list[str]) -> dict:
    """Embed these tiles of the saved plan (one block of a continental run); tiles already
    done are skipped, a tile that cannot be read fails the run naming it."""
    logger = get_run_logger()
    plan = plan_for_worker(request, plan_hash)
    results: list[dict] = []
    step = pipeline.tiles_per_call(request)
    for start in range(0, len(tile_ids), step):
        results += pipeline.embed_tiles(plan, tile_ids[start:start + step])
        logger.info("progress: %d/%d tiles of the block", len(results), len(tile_ids))
    failed = [r for r in results if "failed" in r]
    if failed:  # grouped by reason, as a whole run reports them
        raise TilesFailedError(f"{len(failed)} of {len(tile_ids)} tiles failed: "
                               f"{pipeline.grouped_failures(failed)}")
    # what the parent's manifest needs, one object per block, not one read per tile
    summary = [{"tile": r["tile"], "valid_patches": r["valid_patches"]} for r in results]
    storage.write_bytes_atomic(_summary_uri(plan, tile_ids), json.dumps(summary).encode())
    return {"tiles": len(results), "valid_patches": sum(r["valid_patches"] for r in results)}


def _blocks(plan: RunPlan) -> dict[str, list[str]]:
    return {f"{epsg}_{block}": plan.in_reading_order(list(group.index))
            for (epsg, block), group in plan.tiles.groupby(["epsg", "block"])}


def _summary_uri(plan: RunPlan, tile_ids: list[str]) -> str:
    """Where a block run leaves its tiles' patch counts (named by the block of its tiles)."""
    epsg, block = plan.tiles.loc[tile_ids[0], ["epsg", "block"]]
    return storage.join(plan.uri, "blocks", f"{epsg}_{block}.tiles.json")


def _block_results(plan: RunPlan, ids: list[str]) -> list[dict]:
    """The block's tiles' patch counts: its run's summary, or (a run that died before
    writing it, its tiles all done) the tiles' own markers."""
    uri = _summary_uri(plan, ids)
    if storage.exists(uri):
        return json.loads(storage.read_bytes(uri))
    return [json.loads(storage.read_bytes(plan.marker_uri(t))) for t in ids]


def _record_uri(plan: RunPlan, block: str) -> str:
    return storage.join(plan.uri, "blocks", f"{block}.json")


def _read_record(plan: RunPlan, block: str) -> dict:
    uri = _record_uri(plan, block)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def _write_record(plan: RunPlan, block: str, record: dict) -> None:
    storage.write_bytes_atomic(_record_uri(plan, block), json.dumps(record).encode())


@flow(name="continental", validate_parameters=True)
def continental(request: RegionRequest, deployment: str = "embed-tiles/block",
                max_concurrent_blocks: int = 8) -> dict:
    """Embed a continent: plan once, run each unfinished block of tiles as a run of
    `deployment` (at most `max_concurrent_blocks` at once), then write the products and the
    manifest. Rerun it to finish: done blocks are skipped."""
    logger = get_run_logger()
    started = time.perf_counter()
    with lease.hold(request.output_uri, "continental flow"):
        plan = pipeline.plan_run(request)
        blocks = _blocks(plan)
        todo = []
        for block, ids in blocks.items():
            record = _read_record(plan, block)
            if record.get("status") == "done":
                continue
            if all(storage.exists(plan.marker_uri(t)) for t in ids):  # its run ended unrecorded
                _write_record(plan, block, {**record, "status": "done"})
                continue
            todo.append(block)
        logger.info("%d blocks of %d tiles in %d zones: %d to run, %d done", len(blocks),
                    len(plan.tiles), len(plan.zones), len(todo), len(blocks) - len(todo))
        failures = _run_blocks(plan, blocks, todo, deployment, max_concurrent_blocks, logger)
        if failures:
            raise TilesFailedError(
                f"{len(failures)} of {len(blocks)} blocks failed ({'; '.join(failures[:5])}); "
                "rerun the flow to retry only those blocks")
        tally = pipeline.TileTally()
        for ids in blocks.values():   # block by block: never a record per tile in memory
            tally.add(_block_results(plan, ids))
        return pipeline.finish_run(plan, tally, time.perf_counter() - started)


def _run_blocks(plan: RunPlan, blocks: dict[str, list[str]], todo: list[str], deployment: str,
                limit: int, logger) -> list[str]:
    """Run the blocks, at most `limit` at once, until all ended; returns the failed blocks
    with their run's state. A block's run is created with an idempotency key (plan, block,
    attempt): a parent that died after creating it, before recording it, gets the same run
    back on rerun (still going or ended) instead of starting the block twice. A failed
    block's next attempt gets a new key."""
    failures, in_flight = [], {}
    pending = list(todo)
    with get_client(sync_client=True) as client:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                block = pending.pop(0)
                record = _read_record(plan, block)
                attempt = record.get("attempt", 0) + (record.get("status") == "failed")
                run = run_deployment(deployment, timeout=0, parameters={
                    "request": plan.request.model_dump(mode="json"), "plan_hash": plan.hash,
                    "tile_ids": blocks[block]}, tags=[f"block:{block}"],
                    idempotency_key=f"{plan.hash}:{block}:{attempt}")
                _write_record(plan, block, {"flow_run_id": str(run.id), "attempt": attempt,
                                            "status": "running"})
                logger.info("block %s (%d tiles): run %s", block, len(blocks[block]), run.name)
                in_flight[block] = (str(run.id), attempt)
            time.sleep(POLL_S)
            for block, (run_id, attempt) in list(in_flight.items()):
                state = client.read_flow_run(run_id).state
                if state is None or not state.is_final():
                    continue
                del in_flight[block]
                status = "done" if state.is_completed() else "failed"
                _write_record(plan, block, {"flow_run_id": run_id, "attempt": attempt,
                                            "status": status})
                if status == "done":
                    logger.info("block %s done", block)
                else:
                    failures.append(f"block {block}: {state.name}: {state.message}")
    return failures
