"""One Prefect API for a run: PREFECT_API_URL when set, else a local server on loopback that
this process and its Dask workers share (without it each worker process would start its own
ephemeral server, and on a loaded machine one of them timed out while starting)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, what: str, seconds: float = 600) -> None:
    """Until `url` answers 200: as long as the process lives (a slow machine is no failure),
    within a generous overall limit."""
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not become healthy at {url}")
        time.sleep(0.2)


@contextmanager
def prefect_server(home: str | None = None) -> Iterator[str]:
    """Yield the API URL; a server started here is stopped on exit, after the logs and
    events still queued in this process are sent."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", **({"PREFECT_HOME": home} if home else {})}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    wait_for_http(f"{api}/health", proc, "prefect server")
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    # the environment for worker processes; this process read its settings at import
    os.environ.update({"PREFECT_API_URL": api, **({"PREFECT_HOME": home} if home else {})})
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=15)
        EventsWorker.drain_all(timeout=15)
        proc.terminate()
        proc.wait(timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
