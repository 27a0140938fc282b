"""Many tiles per forward writes the same layer as one tile per forward, and reads and writes
beside the model (as on an accelerator: reader processes or threads) the same as in turns with
it (as on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from anysat.cli import DEMO_BBOX, DEMO_DATES
from anysat import pipeline
from anysat.pipeline import run_region
from anysat.products.zarr_layer import pool_mean, read_layer, read_overview
from anysat.request import RegionRequest
from tests.conftest import slow_s3_server

pytestmark = pytest.mark.integration


def test_batched_inference_equals_one_tile_per_forward(tmp_path, monkeypatch):
    layers = {}
    monkeypatch.setenv("ANYSAT_BLOCK_READERS", "2")
    monkeypatch.setattr(pipeline, "PREVIEW_MAX_SIDE", 10)  # 20 x 20 px layers: an overview, f 2
    for name, batch_size, overlapped in (("one", 1, False), ("four", 4, False),
                                         ("processes", 4, True), ("threads", 4, True)):
        monkeypatch.setattr(pipeline, "overlaps_io", lambda model: overlapped)
        monkeypatch.setenv("ANYSAT_READER_POOL", "threads" if name == "threads" else "processes")
        request = RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1],
                                      patch_size_m=60.0, tiles_per_batch=9, batch_size=batch_size,
                                      tile_size_m=240.0, output_uri=str(tmp_path / name))
        manifest = run_region(request)
        assert manifest["tiles"] == 25   # 5 x 5: blocks of 16, 4, 4 and 1 tiles, two readers
        layers[name] = read_layer(manifest["layers"][0]["layer"])["embedding"].values
    one, four = layers["one"], layers["four"]
    assert np.array_equal(np.isnan(one), np.isnan(four)) and np.isfinite(one).any()
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-5)   # float32 batched matmuls
    np.testing.assert_array_equal(layers["processes"], four)   # the same reads and forwards
    np.testing.assert_array_equal(layers["threads"], four)
    # the writer pooled each tile into the overview the preview was drawn from
    cells, f = read_overview(manifest["layers"][0]["layer"])
    assert f == 2 and cells.shape == (10, 10, one.shape[2])
    np.testing.assert_array_equal(cells[:], pool_mean(layers["threads"], 2))
    assert Image.open(manifest["layers"][0]["preview"]).size == (260, 260)  # 10 px, upscaled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: benchmarks/gpu_session.sh runs it")
def test_a_gpu_run_writes_the_layer_a_cpu_run_writes(tmp_path):
    """The accelerator's stream (reader processes, page-locked batches, a batch launched
    before the one before it lands) writes what the CPU's writes, tile for tile."""
    layers = {}
    for device in ("cpu", "cuda"):
        request = RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1],
                                      patch_size_m=60.0, tile_size_m=240.0, batch_size=4,
                                      device=device, dtype="fp32", output_uri=str(tmp_path / device))
        manifest = run_region(request)
        assert manifest["tiles"] == 25
        layers[device] = read_layer(manifest["layers"][0]["layer"])["embedding"].values
    cpu, gpu = layers["cpu"], layers["cuda"]
    assert np.array_equal(np.isnan(cpu), np.isnan(gpu)) and np.isfinite(cpu).any()
    np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-2)   # other kernels, same tiles


@pytest.fixture
def slow_markers(s3_endpoint):
    """Tile done-markers' PUTs answered after 100 ms."""
    yield from slow_s3_server("PUT", r"/tiles/[^/]+\.json$")


def test_tiles_go_to_an_object_store_on_many_threads_beside_an_accelerator(slow_markers):
    """A tile is 2-4 requests: written one at a time, at tens of ms a request, a GPU run
    would write 3-4 km2/s (benchmarks/tile_writes.py)."""
    import fsspec

    endpoint, slow = slow_markers
    request = dict(bbox=DEMO_BBOX, start=str(DEMO_DATES[0]), end=str(DEMO_DATES[1]), patch_size_m=60.0,
                   tile_size_m=240.0, batch_size=4, output_uri="s3://anysat/many-writers")
    code = ("from anysat import pipeline\n"
            "pipeline.overlaps_io = lambda model: True  # as on an accelerator\n"
            "from anysat.request import RegionRequest\n"
            f"print(pipeline.run_region(RegionRequest.build(**{request!r}))['tiles'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "AWS_ENDPOINT_URL": endpoint, "ANYSAT_READER_POOL": "threads"})
    assert done.returncode == 0 and done.stdout.split()[-1] == "25", done.stderr[-2000:]
    assert len(fsspec.filesystem("s3").ls("anysat/many-writers/tiles")) == 25
    assert slow.most >= 4, slow.most   # a batch's tiles at once (one writer: 1)


def test_a_killed_reader_process_is_a_clear_error_and_a_rerun_completes(tmp_path, monkeypatch):
    import signal

    from anysat import readers
    from anysat.errors import BlockReaderError

    monkeypatch.setattr(pipeline, "overlaps_io", lambda model: True)
    monkeypatch.setenv("ANYSAT_BLOCK_READERS", "1")
    monkeypatch.delenv("ANYSAT_READER_POOL", raising=False)
    readers.start_readers(1)
    for process in list(readers._pools[1]._processes.values()):  # as the OOM killer would
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    request = RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1],
                                  patch_size_m=60.0, tile_size_m=240.0, output_uri=str(tmp_path))
    with pytest.raises(BlockReaderError, match="reader process died.*rerun the same command"):
        run_region(request)
    manifest = run_region(request)   # fresh readers
    assert manifest["tiles"] == 25   # every tile done (a failed one would raise)


def _readers_in_a_worker() -> tuple[bool, str, list[int]]:
    import multiprocessing

    from anysat import readers

    readers.start_readers(1)  # a forkserver reader, started from the Dask worker
    return (multiprocessing.current_process().daemon, readers.reader_pool(),
            list(readers._pools[1]._processes))


def _gone(pids: list[int], within_s: float = 60.0) -> bool:
    import psutil

    deadline = time.time() + within_s
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids):
            return True
        time.sleep(0.5)
    return False


def test_the_flows_dask_workers_start_reader_processes_that_end_with_them(monkeypatch):
    """Beside an accelerator, the embed-region flow's Dask tasks read on reader processes: a
    daemonic worker (Dask's default) could not start them and would read on threads. The
    readers end with the worker, which Dask stops without shutting their pool down."""
    from distributed import Client, LocalCluster

    from flows.dask_runner import dask_task_runner

    monkeypatch.delenv("ANYSAT_READER_POOL", raising=False)
    kwargs = {**dask_task_runner().cluster_kwargs, "n_workers": 1}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        daemon, kind, pids = client.submit(_readers_in_a_worker, pure=False).result()
    assert (daemon, kind) == (False, "processes") and pids
    assert _gone(pids), f"reader processes {pids} outlived their Dask worker"


def test_reader_processes_end_when_their_run_is_killed(tmp_path):
    """A run killed outright (SIGKILL: the OOM killer) leaves no reader process behind."""
    import signal
    import subprocess
    import sys

    script = ("from anysat import readers\n"
              "if __name__ == '__main__':\n"
              "    readers.start_readers(2)\n"
              "    print(*readers._pools[2]._processes, flush=True)\n"
              "    import time; time.sleep(600)\n")
    (tmp_path / "run.py").write_text(script)
    run = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], stdout=subprocess.PIPE,
                           text=True)
    pids = [int(p) for p in run.stdout.readline().split()]
    assert len(pids) == 2
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert _gone(pids), f"reader processes {pids} outlived their run"


def test_a_device_this_machine_lacks_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from anysat.errors import RequestError

    with pytest.raises(RequestError, match="sees no CUDA device"):
        RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1], device="cuda")
    with pytest.raises(RequestError, match="fp16 needs a CUDA device"):
        RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1], dtype="fp16")


READ_WITH_PROCESSES = """
import sys
from anysat.cli import DEMO_BBOX, DEMO_DATES
from anysat.errors import BlockReaderError
from anysat.pipeline import plan_run
from anysat.readers import BlockReaders
from anysat.request import RegionRequest

if __name__ == "__main__":
    request = RegionRequest.build(bbox=DEMO_BBOX, start=DEMO_DATES[0], end=DEMO_DATES[1],
                                  patch_size_m=60.0, tile_size_m=240.0, output_uri=sys.argv[1])
    plan = plan_run(request, create_layers=False)
    try:
        with BlockReaders(plan, overlap=True) as readers:
            for square in plan.reading_blocks(list(map(plan.tile, plan.tile_ids))):
                readers.result(readers.submit(*square))
    except BlockReaderError as exc:
        print(exc)
        sys.exit(3)
"""


def test_a_full_dev_shm_is_a_clear_error(tmp_path):
    """Reader processes hand batches back through /dev/shm: a small one (a container's
    default) is named, with what to do, not a RuntimeError from deep inside torch."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True).returncode:
        pytest.skip("cannot mount a small /dev/shm in a private mount namespace here")
    script = tmp_path / "read.py"
    script.write_text(READ_WITH_PROCESSES)
    run = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm "
                          f"&& exec {sys.executable} {script} {tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ANYSAT_BLOCK_READERS": "1", "ANYSAT_READER_POOL": ""})
    assert run.returncode == 3, run.stdout + run.stderr[-2000:]
    assert "/dev/shm is full" in run.stdout and "--shm-size" in run.stdout
    assert "Traceback" not in run.stderr
