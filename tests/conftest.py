"""Shared fixtures: the demo catalog region, and real servers on loopback (S3, Prefect)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from anysat.cli import DEMO_BBOX  # noqa: F401 - the whole demo footprint (1 km2)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CATALOG = ROOT / "catalogs" / "demo"
# A 600 m tile fully inside the demo footprint, and a small bbox inside that tile.
CENTRAL_TILE = (32631, 1107, 9352, 600.0)
SMALL_BBOX = (5.3245, 50.6318, 5.3275, 50.6340)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on loopback, with bucket `anysat`."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="anysat")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def wait_for_http(url: str, proc: subprocess.Popen, what: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not become healthy at {url}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def stac_api(tmp_path_factory):
    """A real STAC API server on loopback (rustac's stac-server, in-memory backend) serving
    the demo catalog's collections and items, asset hrefs made file:// URIs."""
    import json

    import pystac

    folder = tmp_path_factory.mktemp("stac-api")
    hrefs = []
    for collection in pystac.Catalog.from_file(str(DEMO_CATALOG / "catalog.json")).get_children():
        items = []
        for item in collection.get_items(recursive=True):
            item = item.clone()
            item.make_asset_hrefs_absolute()
            for asset in item.assets.values():  # a bare path would resolve against the API URL
                asset.href = Path(asset.href).as_uri()
            items.append({**item.to_dict(include_self_link=False, transform_hrefs=False), "links": []})
        collection_file, items_file = folder / f"{collection.id}.json", folder / f"{collection.id}-items.json"
        collection_file.write_text(json.dumps({**collection.to_dict(include_self_link=False,
                                                                    transform_hrefs=False), "links": []}))
        items_file.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
        hrefs += [str(collection_file), str(items_file)]
    port = free_port()
    rustac = Path(sys.executable).with_name("rustac")
    proc = subprocess.Popen([str(rustac), "serve", "--addr", f"127.0.0.1:{port}", *hrefs],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/collections", proc, "rustac STAC API")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server on loopback for the whole session."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    wait_for_http(f"{api}/health", proc, "prefect server")
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ.update({"PREFECT_API_URL": api, "PREFECT_HOME": str(home)})
    yield api
    # Send what Prefect still queues (logs, events) while the server is up, or its workers
    # keep retrying a closed port at interpreter exit.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
