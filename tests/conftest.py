"""Shared fixtures: the demo catalog region, and real servers on loopback (S3, Prefect)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anysat.cli import DEMO_BBOX  # noqa: F401 - the whole demo footprint (1 km2)
from flows.local_server import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
DEMO_CATALOG = ROOT / "catalogs" / "demo"
# A 600 m tile fully inside the demo footprint, and a small bbox inside that tile.
CENTRAL_TILE = (32631, 1107, 9352, 600.0)
SMALL_BBOX = (5.3245, 50.6318, 5.3275, 50.6340)


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


class Held:
    """Requests held `delay` s each (`hold()`, from any thread), counting the most at once."""

    def __init__(self, delay: float):
        self.delay, self.now, self.most = delay, 0, 0
        self.lock = threading.Lock()

    def hold(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.delay)
        with self.lock:
            self.now -= 1


class _Slow(Held):
    """WSGI middleware: each `method` request for a path that `pattern` matches answered after
    `delay` s (an object store's latency), counting the most held at once."""

    def __init__(self, app, delay: float, method: str, pattern: str):
        super().__init__(delay)
        self.app, self.method, self.pattern = app, method, re.compile(pattern)

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == self.method and self.pattern.search(environ["PATH_INFO"]):
            self.hold()
        return self.app(environ, start_response)


def slow_s3_server(method: str, pattern: str, delay: float = 0.1):
    """The session's S3 server's buckets (moto keeps them per process: use with `s3_endpoint`)
    served again on another port, `method` requests for paths `pattern` matches answered
    after `delay` s; yields (its endpoint, its counter) for a fixture."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    slow = _Slow(DomainDispatcherApplication(create_backend_app), delay, method, pattern)
    server = make_server("127.0.0.1", free_port(), slow, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", slow
    server.shutdown()


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
    from flows.local_server import prefect_server

    with prefect_server(home=str(tmp_path_factory.mktemp("prefect-home"))) as api:
        yield api
