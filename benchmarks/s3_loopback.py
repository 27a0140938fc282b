"""An S3 server on loopback for the benchmarks: moto, in its own process, so that its Python
work does not take the GIL from the benchmark's own (a loader reading chips in-process).
On 2 cores it answers about 150-600 GETs a second, a ceiling on any S3 figure measured here.
`latency_ms` holds every request that long before answering (an object store's round trip:
what many requests in flight hide, and requests in turn pay in full).

    python benchmarks/s3_loopback.py PORT [LATENCY_MS]    # serve until killed
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def serve(port: int, latency_ms: float = 0.0) -> None:
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    app = DomainDispatcherApplication(create_backend_app)

    def held(environ, start_response):
        time.sleep(latency_ms / 1000)
        return app(environ, start_response)

    make_server("127.0.0.1", port, held if latency_ms else app, threaded=True).serve_forever()


def _exit_with_parent(parent: int) -> None:
    """A benchmark killed outright (SIGKILL, SIGTERM: no atexit) leaves no server behind."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def start_s3(latency_ms: float = 0.0) -> None:
    """Start the server (once per process) and point this process's S3 clients at it."""
    if "ANYSAT_BENCH_S3" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, str(port), str(latency_ms)])
    atexit.register(server.terminate)
    while True:  # no fixed deadline: a loaded machine starts it late; a failed start says so
        if server.poll() is not None:
            raise SystemExit(f"the S3 server on loopback exited ({server.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "ANYSAT_BENCH_S3": "1"})
    import fsspec

    fsspec.filesystem("s3").mkdir("bench")


def s3_copy(store: str, name: str = "chips.zarr") -> str:
    """Copy a local store into the server (started on first use) as `name`; its URI."""
    import fsspec

    start_s3()
    fsspec.filesystem("s3").put(str(Path(store)).rstrip("/") + "/", f"bench/{name}", recursive=True)
    return f"s3://bench/{name}"


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
