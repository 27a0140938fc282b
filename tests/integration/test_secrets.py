"""A signed provider's token never reaches a log, an error, an output or the Prefect API.

The demo catalog's assets are served over HTTP by the S3 server on loopback; a providers file
(`ANYSAT_PROVIDERS`) declares that catalog with `signing: sas-token`, so every href is read
with `?sv=…&sig=<token>` appended, and one asset is missing (404). Runs through the CLI and
through the Prefect flow end with that asset's tiles failed; everything they wrote is
scanned for the token."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from anysat.request import RegionRequest
from anysat.resources import catalogs_dir
from tests.conftest import DEMO_BBOX

pytestmark = pytest.mark.integration
TOKEN = "sv=2026-01-01&sr=c&sig=SECRET456token"
SECRET = "SECRET456"


@pytest.fixture(scope="module")
def private_catalog(s3_endpoint, tmp_path_factory):
    """The demo catalog with its assets on http://127.0.0.1 (one S2 B04 missing), and a
    providers file naming it `private`, signed with the token from ANYSAT_TEST_SAS."""
    root = tmp_path_factory.mktemp("private")
    shutil.copytree(catalogs_dir() / "demo", root / "catalog")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    missing = None
    for item_path in sorted((root / "catalog").rglob("*.json")):
        item = json.loads(item_path.read_text())
        if item.get("type") != "Feature":
            continue
        for key, asset in item["assets"].items():
            local = (item_path.parent / asset["href"]).resolve()
            relative = local.relative_to(root / "catalog").as_posix()
            asset["href"] = f"{s3_endpoint}/anysat/private/{relative}"
            if missing is None and key == "B04":
                missing = relative  # never uploaded: a 404 for a signed URL
            else:
                s3.put_object(Bucket="anysat", Key=f"private/{relative}", Body=local.read_bytes(),
                              ACL="public-read")  # read by URL, as a container with a SAS
        item_path.write_text(json.dumps(item))
    providers = root / "providers.yaml"
    providers.write_text(f"private:\n  kind: static\n  url: {root / 'catalog' / 'catalog.json'}\n"
                         "  naming: demo\n  signing: sas-token\n  token_env: ANYSAT_TEST_SAS\n")
    env = {"ANYSAT_PROVIDERS": str(providers), "ANYSAT_TEST_SAS": TOKEN,
           "GDAL_HTTP_MAX_RETRY": "0"}
    return {"env": env, "missing": missing, "url": f"{s3_endpoint}/anysat/private"}


def scan(folder: Path) -> list[str]:
    """Files under `folder` that hold the token."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_cli_run_with_a_failing_signed_asset_leaks_no_token(private_catalog, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "anysat.cli", "embed", "--demo", "--catalog", "private",
         "--output", str(out), "--products", "cog,vectors"],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, **private_catalog["env"]})
    assert result.returncode == 2, result.stderr
    # the failure names the tile and the asset (never its signed URL) and the reason
    missing = f"asset {private_catalog['url']}/{private_catalog['missing']}: HTTP response code: 404"
    assert "tiles failed" in result.stderr and missing in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("anysat: error:")]
    assert error.count(missing) == 1 and "and 6 more" in error  # one reason, the tiles it hit
    assert SECRET not in result.stdout + result.stderr and "sig=" not in result.stderr
    assert scan(out) == []
    assert (out / "plan" / "items").exists()  # the plan was written: its hrefs are unsigned


def test_flow_run_with_a_failing_signed_asset_leaks_no_token(private_catalog, prefect_api,
                                                            tmp_path, monkeypatch, capfd):
    from prefect import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                LogFilter, LogFilterFlowRunId)

    from flows.embed_region import embed_region

    for key, value in private_catalog["env"].items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "flow"
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        request = RegionRequest.build(start="2020-11-01", end="2021-10-31", bbox=DEMO_BBOX,
                                      catalog="private", output_uri=str(out))
        state = embed_region(request, return_state=True)
        assert state.is_failed()
        flow_run_id = state.state_details.flow_run_id

        async def everything_prefect_holds() -> str:
            async with get_client() as client:
                logs = await client.read_logs(log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
                run = await client.read_flow_run(flow_run_id)
                tasks = await client.read_task_runs()
                artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return "\n".join([*(log.message for log in logs), run.model_dump_json(),
                              *(t.model_dump_json() for t in tasks if t.flow_run_id == flow_run_id),
                              *(a.model_dump_json() for a in artifacts)])

        import asyncio

        held = asyncio.run(everything_prefect_holds())
    missing = f"asset {private_catalog['url']}/{private_catalog['missing']}: HTTP response code: 404"
    assert missing in held  # the failure is in the Prefect logs, its URL unsigned
    assert SECRET not in held and "sig=" not in held
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    assert scan(out) == []
    with pytest.raises(Exception) as failure:
        state.result()
    assert SECRET not in str(failure.value) and "tiles failed" in str(failure.value)
