"""prefect.yaml as a platform team uses it: `prefect deploy` onto the real Prefect server on
loopback, a process worker started here, deployment runs with region/date parameters writing
to the S3 server on loopback; bad parameters fail before any task with the field named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import DEMO_BBOX

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(scope="module")
def deployed(prefect_api, s3_endpoint):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "ANYSAT_REPO": str(REPO),
           "ANYSAT_IMAGE_CPU": "anysat:cpu", "ANYSAT_IMAGE_CUDA": "anysat:cuda",
           # results persist to object storage, as infra/kubernetes/namespace.yaml sets it
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
           "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": "remote-file-system/anysat-results"}
    from prefect.filesystems import RemoteFileSystem

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        RemoteFileSystem(basepath="s3://anysat/prefect-results").save("anysat-results", overwrite=True)
    pools = [["anysat-local", "--type", "process"],
             ["anysat-k8s", "--type", "kubernetes", "--base-job-template",
              str(REPO / "infra" / "kubernetes" / "work-pool-cpu.json")],
             ["anysat-k8s-gpu", "--type", "kubernetes", "--base-job-template",
              str(REPO / "infra" / "kubernetes" / "work-pool-gpu.json")]]
    for pool in pools:
        created = subprocess.run([PREFECT, "work-pool", "create", *pool], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert created.returncode == 0, created.stdout + created.stderr
    result = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return env


def stop_process_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the process's group, then SIGKILL if it has not ended in grace_s: a worker
    still holding a flow run (such as the one the killed parent started) may not stop on
    SIGTERM at all (in the full suite it sat out a 120 s grace), and no run must outlive the
    test."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_with_worker(env: dict, name: str, parameters: dict):
    """Create a run of the deployment, then let a process worker (started here) pick it up."""
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        flow_run = run_deployment(name, parameters=parameters, timeout=0)
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "anysat-local", "--run-once"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert worker.returncode == 0, worker.stdout + worker.stderr

    async def final_state():
        from prefect import get_client

        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    import asyncio

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(final_state())


def test_a_deployment_run_writes_its_layer_to_s3(deployed):
    request = {"bbox": list(DEMO_BBOX), "start": "2020-11-01", "end": "2021-10-31",
               "patch_size_m": 60.0, "quantize": "int8", "output_uri": "s3://anysat/deployed"}
    state = run_with_worker(deployed, "embed-region/adhoc", {"request": request})
    assert state.is_completed(), state.message
    manifest = json.loads(fsspec.filesystem("s3").cat_file("anysat/deployed/run.json"))
    assert manifest["tiles"] == 9 and manifest["stac"] == "s3://anysat/deployed/stac/collection.json"
    # the int8 layer on S3, read back dequantized
    from anysat.products import embeddings, read_layer

    layer = read_layer(manifest["layers"][0]["layer"])
    values = embeddings(layer)
    assert layer.embedding.dtype == "int8"
    assert int(np.isfinite(values).all(-1).sum()) == manifest["patches_with_data"] > 0
    # the flow's result (the manifest) persisted in the bucket, not on the worker's disk
    results = fsspec.filesystem("s3", skip_instance_cache=True).ls("anysat/prefect-results")
    assert results


def test_every_deployment_is_on_its_pool_and_the_monthly_one_is_scheduled(deployed, tmp_path):
    async def deployments():
        from prefect import get_client

        async with get_client() as client:
            return {d.name: d for d in await client.read_deployments()}

    import asyncio

    with temporary_settings(updates={PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        found = asyncio.run(deployments())
    pools = {name: d.work_pool_name for name, d in found.items()}
    assert pools == {"adhoc": "anysat-local", "adhoc-gpu": "anysat-k8s-gpu",
                     "monthly-belgium": "anysat-k8s", "ingest": "anysat-k8s",
                     "pretrain-gpu": "anysat-k8s-gpu", "europe": "anysat-k8s",
                     "block-gpu": "anysat-k8s-gpu", "block": "anysat-local"}
    assert found["adhoc-gpu"].job_variables["image"] == "anysat:cuda"
    [schedule] = found["monthly-belgium"].schedules
    assert schedule.schedule.cron == "0 6 2 * *" and schedule.active
    # the monthly flow itself: a scheduled run embeds the month before its scheduled time
    from flows.embed_region import embed_month
    from anysat.request import RegionRequest

    request = RegionRequest.build(bbox=DEMO_BBOX, start="2021-01-01", end="2021-01-31",
                                  patch_size_m=60.0, output_uri=str(tmp_path / "monthly"))
    with temporary_settings(updates={PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        manifest = embed_month(request, month="2021-06")
    assert manifest["request"]["start"] == "2021-06-01" and manifest["request"]["end"] == "2021-06-30"
    assert (tmp_path / "monthly" / "2021-06" / "run.json").exists()


def test_bad_parameters_fail_before_any_task_naming_the_field(deployed):
    bad = {"bbox": list(DEMO_BBOX), "start": "2021-06-01", "end": "2021-01-01",
           "output_uri": "s3://anysat/never"}
    state = run_with_worker(deployed, "embed-region/adhoc", {"request": bad})
    assert state.is_failed() and "start 2021-06-01 is after end 2021-01-01" in state.message
    assert not fsspec.filesystem("s3").exists("anysat/never")
    with temporary_settings(updates={PREFECT_API_URL: deployed["PREFECT_API_URL"]}), \
            pytest.raises(Exception, match="tile_size_m"):
        run_deployment("embed-region/adhoc", timeout=0, parameters={"request": {
            **bad, "start": "2021-01-01", "tile_size_m": "big"}})


def block_records(out: Path) -> dict[str, dict]:
    """The continental run's block records (not the blocks' tile summaries)."""
    return {p.stem: json.loads(p.read_text()) for p in (out / "blocks").glob("*.json")
            if not p.name.endswith(".tiles.json")} if (out / "blocks").exists() else {}


def test_continental_killed_midway_and_rerun_runs_every_block_once(deployed, tmp_path):
    """Two zones (the demo square in 31N, a square east of 6 E in 32N): three blocks, two per
    run of `embed-tiles/block` on a process worker. The parent is SIGKILLed once the first
    run's blocks are done; the rerun runs only the last block and writes the manifest."""

    from shapely.geometry import box

    from tests.conftest import SMALL_BBOX

    east = (6.001, 50.6286, 6.006, 50.6310)
    region = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": box(*b).__geo_interface__}
        for b in (SMALL_BBOX, east)]}
    out = tmp_path / "continent"
    request = {"geojson": region, "start": "2020-11-01", "end": "2021-10-31",
               "sensors": ["s2", "s1"], "patch_size_m": 60.0, "output_uri": str(out)}
    script = ("import json, sys\nfrom flows.continental import continental\n"
              "from anysat.request import RegionRequest\n"
              "continental(RegionRequest.build(**json.loads(sys.argv[1])), "
              "deployment='embed-tiles/block', max_concurrent_runs=1, blocks_per_run=2)\n")
    # its own process group: the flow runs it spawned go with it at the end
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "anysat-local", "--limit", "2"],
                              env=deployed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        log = open(tmp_path / "parent.log", "w")  # a file, not a pipe nobody reads meanwhile
        parent = subprocess.Popen([sys.executable, "-c", script, json.dumps(request)], cwd=REPO,
                                  env={**deployed, "ANYSAT_LEASE_TTL_S": "30"},
                                  stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while [r.get("status") for r in block_records(out).values()].count("done") < 2:
            assert parent.poll() is None, (tmp_path / "parent.log").read_text()
            assert time.time() < deadline
            time.sleep(0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        records = block_records(out)
        assert [r["status"] for r in records.values()].count("done") == 2
        assert not (out / "run.json").exists()
        # as if the parent had died after starting the next block's run, before recording it
        for block, record in records.items():
            if record["status"] != "done":
                (out / "blocks" / f"{block}.json").unlink()

        rerun = subprocess.run([sys.executable, "-c", script, json.dumps(request)], cwd=REPO,
                               env={**deployed, "ANYSAT_LEASE_TTL_S": "30"},
                               capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    finally:
        stop_process_group(worker)
    manifest = json.loads((out / "run.json").read_text())
    assert [z["epsg"] for z in manifest["layers"]] == [32631, 32632]
    records = block_records(out)
    from anysat.plan import read_plan

    plan = read_plan(str(out))
    blocks = set(plan.tiles["block"])
    assert set(records) == blocks and len(blocks) == 3
    assert {r["status"] for r in records.values()} == {"done"}
    markers = [json.loads(p.read_text()) for p in (out / "tiles").glob("*.json")]
    assert len(markers) == manifest["tiles"]
    # the manifest's counts, from the blocks' summaries, are the tiles' own
    assert manifest["patches_with_data"] == sum(m["valid_patches"] for m in markers) > 0

    async def block_runs():
        from prefect import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["block"])))

    import asyncio

    with temporary_settings(updates={PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        runs = asyncio.run(block_runs())
    by_block = {}
    for run in runs:
        for tag in (t for t in run.tags if t.startswith("block:")):
            by_block.setdefault(tag, []).append(run.state.name)
    assert by_block == {f"block:{b}": ["Completed"] for b in records}, by_block
    blocks_per_run = sorted(sum(t.startswith("block:") for t in run.tags) for run in runs)
    assert blocks_per_run == [1, 2], blocks_per_run  # 3 blocks, 2 per run
