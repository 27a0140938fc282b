"""Faults while writing: the object store goes away mid-run and comes back, and a Dask worker
process is SIGKILLed mid-tile. Each time the rerun (or the retried task) ends with every tile
written exactly once and a layer equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import fsspec
import numpy as np
import pytest
import xarray as xr

from tests.conftest import free_port

pytestmark = pytest.mark.integration


class SwitchableProxy:
    """A TCP proxy to the S3 server on loopback that can go down (connections cut, new ones
    refused at once) and come back, as a store behind a failing network does."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.up = threading.Event()
        self.up.set()
        self.connections: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if not self.up.is_set():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            self.connections += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while self.up.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def down(self) -> None:
        self.up.clear()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connections.clear()

    def back(self) -> None:
        self.up.set()


def layer_values(uri: str, **storage_options) -> np.ndarray:
    return xr.open_zarr(uri, consolidated=False, storage_options=storage_options or None
                        ).embedding.values


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's layer (same request, local output)."""
    out = tmp_path_factory.mktemp("reference")
    result = subprocess.run([sys.executable, "-m", "anysat.cli", "embed", "--demo", "--output",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return layer_values(json.loads((out / "run.json").read_text())["layers"][0]["layer"])


@pytest.mark.parametrize("outage_s", [15, 60])
def test_the_object_store_going_away_mid_run_loses_nothing(s3_endpoint, reference, outage_s):
    """A short outage is ridden out by the S3 client's retries; a long one fails the run with
    a clear error, and the rerun resumes."""
    proxy = SwitchableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "ANYSAT_LEASE_TTL_S": "60"}
    command = [sys.executable, "-m", "anysat.cli", "embed", "--demo", "--tiles-per-batch", "1",
               "--batch-size", "1", "--output", f"s3://anysat/outage-{outage_s}"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)  # straight to the server
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    tiles = f"anysat/outage-{outage_s}/tiles"
    while not (fs.exists(tiles) and fs.ls(tiles, refresh=True)):
        assert run.poll() is None, run.stderr.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proxy.down()              # mid-run: some tiles done, the others in flight or to come
    time.sleep(outage_s)
    proxy.back()
    _, stderr = run.communicate(timeout=600)
    if run.returncode:        # the outage outlasted the retries: a clear error, then a rerun
        assert run.returncode == 2 and "Traceback" not in stderr, stderr
        assert "rerun the same command" in stderr.lower()
        assert not fs.exists(f"anysat/outage-{outage_s}/run.json")
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads(fs.cat_file(f"anysat/outage-{outage_s}/run.json"))
    assert manifest["tiles"] == 9 and len(fs.ls(tiles, refresh=True)) == 9
    layer = f"s3://anysat/outage-{outage_s}/embeddings/EPSG32631_patch30m.zarr"
    np.testing.assert_allclose(layer_values(layer), reference, rtol=1e-5, atol=1e-5)
    assert not fs.exists(f"anysat/outage-{outage_s}/lease.json")


def test_a_dask_worker_killed_mid_tile_costs_a_retry_not_a_tile(prefect_api, reference, tmp_path):
    """The flow on a Dask cluster of two worker processes; one is SIGKILLed while it embeds.
    Dask reruns its task elsewhere (its nanny starts a new worker): the flow completes, every
    tile written once, the layer equal to an uninterrupted run's."""
    import signal

    from distributed import Client, LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    from anysat.request import RegionRequest
    from flows.embed_region import embed_region
    from tests.conftest import DEMO_BBOX

    out = tmp_path / "killed-worker"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        request = RegionRequest.build(start="2020-11-01", end="2021-10-31", bbox=DEMO_BBOX,
                                      output_uri=str(out), tiles_per_batch=1, batch_size=1)
        killer_done = threading.Event()

        def kill_a_worker_mid_run() -> None:
            deadline = time.time() + 300
            while time.time() < deadline:  # once a tile is done, the others are in flight
                if (out / "tiles").exists() and any((out / "tiles").iterdir()):
                    os.kill(pids[0], signal.SIGKILL)
                    break
                time.sleep(0.05)
            killer_done.set()

        threading.Thread(target=kill_a_worker_mid_run, daemon=True).start()
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            state = embed_region.with_options(task_runner=runner)(request, return_state=True)
        assert killer_done.wait(10)
        assert pids[0] not in client.run(os.getpid).values()  # that worker is gone
    assert state.is_completed(), state.message
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tiles"] == 9 and len(list((out / "tiles").iterdir())) == 9
    np.testing.assert_allclose(layer_values(manifest["layers"][0]["layer"]), reference,
                               rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_disk(tmp_path):
    """A 600 kB tmpfs (the plan fits, the layer does not); skipped where mounting is not
    allowed (it needs root with CAP_SYS_ADMIN, as on CI's machines)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_full_disk_fails_clearly_and_the_rerun_completes(small_disk, reference):
    command = [sys.executable, "-m", "anysat.cli", "embed", "--demo", "--tiles-per-batch", "1",
               "--output", str(small_disk / "out")]
    full = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    [error] = [line for line in full.stderr.splitlines() if "error:" in line]
    assert "No space left on device" in error and "rerun the same command" in error
    assert not (small_disk / "out" / "run.json").exists()
    done_before = len(list((small_disk / "out" / "tiles").glob("*.json")))
    assert done_before < 9
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((small_disk / "out" / "run.json").read_text())
    assert manifest["tiles"] == 9 and len(list((small_disk / "out" / "tiles").glob("*.json"))) == 9
    np.testing.assert_allclose(layer_values(manifest["layers"][0]["layer"]), reference,
                               rtol=1e-5, atol=1e-5)


def test_an_output_turned_read_only_mid_run_fails_clearly_and_the_rerun_completes(small_disk,
                                                                                 reference):
    """Permission lost mid-run (as root, file modes do not stop writes: the file system is
    remounted read-only instead, EROFS), then given back."""
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    out = small_disk / "out"
    command = [sys.executable, "-m", "anysat.cli", "embed", "--demo", "--tiles-per-batch", "1",
               "--batch-size", "1", "--output", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "tiles").exists() and any((out / "tiles").glob("*.json"))):
        assert run.poll() is None, run.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 2 and "Traceback" not in stderr, stderr
    [error] = [line for line in stderr.splitlines() if "error:" in line]
    assert "Read-only file system" in error and "rerun the same command" in error
    assert not (out / "run.json").exists()
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tiles"] == 9 and len(list((out / "tiles").glob("*.json"))) == 9
    np.testing.assert_allclose(layer_values(manifest["layers"][0]["layer"]), reference,
                               rtol=1e-5, atol=1e-5)
