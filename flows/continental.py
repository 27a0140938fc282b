"""Prefect flow `continental`: one saved plan, its tile blocks embedded by deployment runs.

The parent plans the region once (every UTM zone, every search block of 16 x 16 tiles) and
holds the output's lease; every `blocks_per_run` consecutive blocks become a run of an
`embed-tiles` deployment (a pod of its own on a cluster, which embeds its blocks as one
stream of tiles), at most `max_concurrent_runs` at a time. A block's record
(`<output>/blocks/<block>.json`) names its run and is marked done when the run completes,
so a rerun after the parent died runs only unfinished blocks. Runs are created with an
idempotency key, so a rerun gets back (and waits for) a run the dead parent had already
started, even one it had not recorded yet. Tiles keep their own done markers: a run that
died midway redoes only its unfinished tiles.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "anysat")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402

from anysat import lease, pipeline, storage  # noqa: E402
from anysat.errors import RequestError, TilesFailedError  # noqa: E402
from anysat.plan import RunPlan, plan_for_worker  # noqa: E402
from anysat.request import RegionRequest  # noqa: E402

POLL_S = 5.0
# blocks whose records (or summaries) are fetched in one call: Europe at 2,560 m is some
# 6,000 blocks, a round trip each in turn was minutes before the first run started
LOOKUP_BLOCKS = 512


@flow(name="embed-tiles", validate_parameters=True)
def embed_tiles(request: RegionRequest, plan_hash: str, blocks: list[str]) -> dict:
    """Embed these search blocks of the saved plan (a part of a continental run) as one
    stream of tiles, so reads never pause between blocks. Tiles already done are skipped; a
    tile that cannot be read fails the run, naming it. Each block without a failed tile
    leaves its tiles' patch counts for the parent's manifest."""
    logger = get_run_logger()
    plan = plan_for_worker(request, plan_hash)
    ids = {block: _block_tiles(plan, block) for block in blocks}
    block_of = {tile: block for block, tiles in ids.items() for tile in tiles}
    total = len(block_of)
    summaries: dict[str, list[dict]] = {block: [] for block in blocks}
    failed = []
    stream = pipeline.embed_stream(plan, [tile for block in blocks for tile in ids[block]])
    for done, result in enumerate(stream, 1):
        if "failed" in result:
            failed.append(result)
        else:  # what the parent's manifest needs, one object per block, not a read per tile
            summaries[block_of[result["tile"]]].append(
                {"tile": result["tile"], "valid_patches": result["valid_patches"]})
        if done % pipeline.PROGRESS_TILES == 0 or done == total:
            logger.info("progress: %d/%d tiles of %d block(s)", done, total, len(blocks))
    for block, summary in summaries.items():
        if len(summary) == len(ids[block]):
            storage.write_bytes_atomic(_summary_uri(plan, block), json.dumps(summary).encode())
    if failed:  # grouped by reason, as a whole run reports them
        raise TilesFailedError(f"{len(failed)} of {total} tiles failed: "
                               f"{pipeline.grouped_failures(failed)}")
    return {"tiles": total, "valid_patches": sum(r["valid_patches"] for s in summaries.values()
                                                 for r in s)}


def _block_tiles(plan: RunPlan, block: str) -> list[str]:
    return plan.in_reading_order(list(plan.tiles.index[plan.tiles["block"] == block]))


def _blocks(plan: RunPlan) -> dict[str, list[str]]:
    """Each search block's tile ids, blocks in the plan's order (zone by zone)."""
    return {block: list(ids) for block, ids in
            plan.tiles.groupby("block", sort=False).groups.items()}


def _summary_uri(plan: RunPlan, block: str) -> str:
    """Where a run leaves a block's tiles' patch counts."""
    return storage.join(plan.uri, "blocks", f"{block}.tiles.json")


def _in_groups(blocks: dict[str, list[str]]) -> Iterator[dict[str, list[str]]]:
    """The blocks, LOOKUP_BLOCKS at a time: each group's objects are fetched in one call."""
    names = list(blocks)
    for i in range(0, len(names), LOOKUP_BLOCKS):
        yield {name: blocks[name] for name in names[i:i + LOOKUP_BLOCKS]}


def _block_results(plan: RunPlan, blocks: dict[str, list[str]]) -> Iterator[list[dict]]:
    """Each block's tiles' patch counts: its run's summary, or (a run that died before
    writing it, its tiles all done) the tiles' own markers."""
    for group in _in_groups(blocks):
        summaries = storage.read_many([_summary_uri(plan, block) for block in group])
        for (block, ids), summary in zip(group.items(), summaries):
            if summary is not None:
                yield json.loads(summary)
                continue
            markers = storage.read_many([plan.marker_uri(t) for t in ids])
            missing = [t for t, m in zip(ids, markers) if m is None]
            if missing:
                raise FileNotFoundError(f"block {block}: no done-marker for tile(s) {missing[:3]}")
            yield [json.loads(m) for m in markers]


def _record_uri(plan: RunPlan, block: str) -> str:
    return storage.join(plan.uri, "blocks", f"{block}.json")


def _read_records(plan: RunPlan, group: dict[str, list[str]]) -> dict[str, dict]:
    """Each block's record ({} if none), fetched in one call."""
    raws = storage.read_many([_record_uri(plan, block) for block in group])
    return {block: {} if raw is None else json.loads(raw) for block, raw in zip(group, raws)}


def _all_tiles_done(plan: RunPlan, group: dict[str, list[str]]) -> list[str]:
    """The blocks of `group` whose tiles all have their done-markers (runs that ended
    unrecorded): their first tiles' markers in one call, then the other tiles' of those
    that have one (a block never run costs one lookup, not one a tile)."""
    firsts = storage.read_many([plan.marker_uri(ids[0]) for ids in group.values()])
    return [block for block, first in zip(group, firsts) if first is not None and
            all(m is not None for m in storage.read_many([plan.marker_uri(t) for t in group[block]]))]


def _write_record(plan: RunPlan, block: str, record: dict) -> None:
    storage.write_bytes_atomic(_record_uri(plan, block), json.dumps(record).encode())


@flow(name="continental", validate_parameters=True)
def continental(request: RegionRequest, deployment: str = "embed-tiles/block",
                max_concurrent_runs: int = 8, blocks_per_run: int = 1) -> dict:
    """Embed a continent: plan once, run every `blocks_per_run` consecutive search blocks
    that are not all done as a run of `deployment` (at most `max_concurrent_runs` at once),
    then write the products and the manifest. Rerun it to finish: done blocks are skipped.
    More blocks per run spread a pod's start (image, CUDA, model, readers) over more tiles;
    fewer give more runs to spread over workers."""
    if blocks_per_run < 1 or max_concurrent_runs < 1:
        raise RequestError(f"blocks_per_run {blocks_per_run}, max_concurrent_runs "
                           f"{max_concurrent_runs}: each must be 1 or more")
    _check_deployment(deployment)  # before a plan that may take hours
    logger = get_run_logger()
    started = time.perf_counter()
    with lease.hold(request.output_uri, "continental flow"):
        plan = pipeline.plan_run(request)
        blocks = _blocks(plan)
        done, attempts = set(), {}  # a block's next attempt: a failed run's blocks get a new key
        for group in _in_groups(blocks):
            records = _read_records(plan, group)
            for block, record in records.items():
                attempts[block] = record.get("attempt", 0) + (record.get("status") == "failed")
                if record.get("status") == "done":
                    done.add(block)
            for block in _all_tiles_done(plan, {b: ids for b, ids in group.items() if b not in done}):
                _write_record(plan, block, {**records[block], "status": "done"})
                done.add(block)
        names = list(blocks)  # runs fixed by the plan and blocks_per_run (idempotency keys)
        runs = [names[i:i + blocks_per_run] for i in range(0, len(names), blocks_per_run)]
        todo = [run for run in runs if not done.issuperset(run)]
        logger.info("%d blocks of %d tiles in %d zones, %d done; %d runs of up to %d blocks to "
                    "start", len(blocks), len(plan.tiles), len(plan.zones), len(done), len(todo),
                    blocks_per_run)
        failures = _run_blocks(plan, todo, attempts, deployment, max_concurrent_runs, logger)
        if failures:
            raise TilesFailedError(
                f"{len(failures)} of {len(todo)} runs failed ({'; '.join(failures[:5])}); "
                "rerun the flow to retry only their blocks")
        tally = pipeline.TileTally()
        for results in _block_results(plan, blocks):  # never a record per tile in memory
            tally.add(results)
        return pipeline.finish_run(plan, tally, time.perf_counter() - started)


def _check_deployment(name: str) -> None:
    if name.count("/") != 1:
        raise RequestError(f"deployment {name!r}: expected flow-name/deployment-name, such as "
                           "embed-tiles/block")
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise RequestError(f"no deployment {name!r} on the Prefect server "
                               f"{client.api_url}: deploy prefect.yaml first (`prefect deploy "
                               "--all`), or name another") from None


def _run_blocks(plan: RunPlan, runs: list[list[str]], attempts: dict[str, int], deployment: str,
                limit: int, logger) -> list[str]:
    """Start a deployment run per list of blocks, at most `limit` at once, until all ended;
    returns the failed runs with their state. A run is created with an idempotency key
    (plan, first block, number of blocks, attempt): a parent that died after creating it,
    before recording it, gets the same run back on rerun (still going or ended) instead of
    starting its blocks twice. A failed run's next attempt gets a new key."""
    failures, in_flight = [], {}
    pending = list(runs)
    with get_client(sync_client=True) as client:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                blocks = pending.pop(0)
                attempt = max(attempts[block] for block in blocks)
                run = run_deployment(deployment, timeout=0, parameters={
                    "request": plan.request.model_dump(mode="json"), "plan_hash": plan.hash,
                    "blocks": blocks}, tags=[f"block:{block}" for block in blocks],
                    idempotency_key=f"{plan.hash}:{blocks[0]}+{len(blocks)}:{attempt}")
                for block in blocks:
                    _write_record(plan, block, {"flow_run_id": str(run.id), "attempt": attempt,
                                                "status": "running"})
                logger.info("run %s: block(s) %s", run.name, ", ".join(blocks))
                in_flight[str(run.id)] = (blocks, attempt)
            time.sleep(POLL_S)
            for run_id, (blocks, attempt) in list(in_flight.items()):
                state = client.read_flow_run(run_id).state
                if state is None or not state.is_final():
                    continue
                del in_flight[run_id]
                status = "done" if state.is_completed() else "failed"
                for block in blocks:
                    _write_record(plan, block, {"flow_run_id": run_id, "attempt": attempt,
                                                "status": status})
                if status == "done":
                    logger.info("block(s) %s done", ", ".join(blocks))
                else:
                    failures.append(f"block(s) {', '.join(blocks)}: {state.name}: {state.message}")
    return failures
