"""Where a run's squares of tiles are read: in turn with a model on the CPU (it uses every
core), and beside a model on an accelerator in reader processes (default) or threads.

Processes, because a block read holds Python's GIL for about 60 % of its time (odc-stac's
per-asset set-up, GDAL's opens; py-spy --gil on the demo's squares): reader threads then wait
on each other and on the thread that drives the device. On 2 cores, the reads alone of 64
tiles in squares of 16 (benchmarks/block_reads.py): 8.3 km2/s on one reader process, 8.3-8.6
on two threads, 12.8 on two processes.
A square's batches come back through shared memory, packed into one buffer (`_pack`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from .cube.batch import READ_THREADS, load_block_batches, tensor_shapes
from .errors import BlockReaderError, RequestError, TileReadError
from .plan import RunPlan, plan_for_worker
from .redact import redact_logs
from .stac.signing import url_signer
from .tiles import Tile

log = logging.getLogger("anysat")
POOLS = ("processes", "threads")
WATCH_S = 1.0  # how often a reader looks whether the run's process is still there
# Readers yield the CPU to the run's own threads. Each reader reads on READ_THREADS threads, so
# beside a GPU 8 readers are 64 busy threads on 16 cores, and the thread that drives the
# device, bound by its kernel launches, got a fraction of a core: on an H100 the stream ran
# at half the reads' rate, and slower with 14 readers than with 8. 2 cores, 2 readers, a
# host-bound stand-in forward: the stream's time in the model 1.27-1.88 s at nice 0 against
# 0.65-0.93 s at 10, the stream 2.0-2.5 s against 2.6-3.2 s.
READER_NICE = 10
_said_threads: list[bool] = []
Loaded = list  # per tile of the square: (tile, batch, dates, seconds) or {"tile", "failed", ...}


def count_from_env(name: str, default: int, what: str) -> int:
    """The whole number (1 or more) of `what` in environment variable `name`, else `default`."""
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise RequestError(f"{name}={value!r}: give a whole number of {what}, 1 or more")
    return int(value)


def block_readers() -> int:
    """Squares read at once beside an accelerator: `ANYSAT_BLOCK_READERS`, by default one
    per 2 cores, up to 8 (a 16-core GPU host: 8; each reader holds about one square)."""
    return count_from_env("ANYSAT_BLOCK_READERS", max(1, min(8, (os.cpu_count() or 1) // 2)),
                          "blocks read at once")


def reader_pool() -> str:
    """`ANYSAT_READER_POOL`: processes (default) or threads. Threads where this process may
    not start processes (a daemonic one: a Dask worker's, unless `distributed.worker.daemon`
    is false, as the flows' Dask runner sets it)."""
    value = os.environ.get("ANYSAT_READER_POOL", "") or "processes"
    if value not in POOLS:
        raise RequestError(f"ANYSAT_READER_POOL={value!r}: give one of {', '.join(POOLS)}")
    if value == "processes" and multiprocessing.current_process().daemon:
        if not _said_threads:
            _said_threads.append(True)
            log.info("block readers: threads (a daemonic process, such as a Dask worker's, "
                     "cannot start reader processes; Dask: distributed.worker.daemon false)")
        return "threads"
    return value


def read_square(plan: RunPlan, tiles: list[Tile], square: tuple[Tile, Tile],
                as_stored: bool = False) -> Loaded:
    """The tiles of one reading square (`RunPlan.reading_blocks`), read as one block from
    the plan's items: each tile's batch, dates and read seconds, or its failure (logged by
    `BlockReaders.result`, in the run's process). `as_stored`: the batches keep their block
    as stored until looked up (`cube.batch.BlockTileBatch`: a square read in turn with the
    model); else they are made physical here, by the reader."""
    request = plan.request
    provider = request.provider()
    started = time.perf_counter()
    loaded = load_block_batches([plan.items(t.id) for t in tiles], request.modality_specs(),
                                tiles, area=square, naming=provider.naming,
                                patch_url=url_signer(provider), time_bin=request.time_bin,
                                backend=request.cube_backend, threads=READ_THREADS)
    if not as_stored:
        loaded = [r if isinstance(r, TileReadError) else (dict(r[0]), r[1]) for r in loaded]
    seconds = (time.perf_counter() - started) / len(tiles)
    out: Loaded = []
    for tile, result in zip(tiles, loaded):
        if isinstance(result, TileReadError):  # this tile fails, the others go on; a rerun retries it
            out.append({"tile": tile.id, "failed": str(result), "area_km2": tile.area_km2})
        else:
            out.append((tile, *result, seconds))
    return out


def _read_in_process(request, plan_hash: str, plan_uri: str, tiles: list[Tile],
                     square: tuple[Tile, Tile]) -> tuple[torch.Tensor, Loaded]:
    return _pack(read_square(plan_for_worker(request, plan_hash, plan_uri), tiles, square,
                             as_stored=True))


ALIGN = 64  # bytes: every tensor in a packed buffer starts aligned for any dtype


def _pack(loaded: Loaded) -> tuple[torch.Tensor, Loaded]:
    """A square's tensors in one uint8 buffer, and where each lies, so that they cross to
    the run's process as one shared-memory segment. torch shares each tensor as its own
    (9 a tile: each a /dev/shm file and a descriptor passed over a socket, in turn). Squares
    of 16 tiles of 2 MB on 2 cores: 3.6 ms a tile of the run's process went to taking them
    apart, 0.5 ms packed (at 28 km2/s a run takes a 600 m tile every 13 ms). Consumes
    `loaded`: a tile read as stored is made physical as it is copied, then let go, so the
    reader holds its square as stored and the buffer, not a float32 copy besides."""
    layout: Loaded = []
    size = 0
    for entry in loaded:
        if isinstance(entry, dict):  # a failed tile
            layout.append(entry)
            continue
        tile, batch, dates, seconds = entry
        where = {}
        for key, (shape, dtype) in tensor_shapes(batch).items():
            where[key] = (size, shape, dtype)
            size += -(-torch.Size(shape).numel() * dtype.itemsize // ALIGN) * ALIGN
        layout.append((tile, where, dates, seconds))
    buffer = torch.empty(size, dtype=torch.uint8)
    for index, packed in enumerate(layout):
        if not isinstance(packed, dict):
            for key, value in loaded[index][1].items():
                _view(buffer, *packed[1][key]).copy_(value)
            loaded[index] = None
    return buffer, layout


def _unpack(buffer: torch.Tensor, layout: Loaded) -> Loaded:
    """`_pack`'s inverse: each tile's batch as views of the buffer (no copy)."""
    return [entry if isinstance(entry, dict) else
            (entry[0], {key: _view(buffer, *where) for key, where in entry[1].items()}, *entry[2:])
            for entry in layout]


def _view(buffer: torch.Tensor, offset: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    count = torch.Size(shape).numel()
    return buffer[offset:offset + count * dtype.itemsize].view(dtype).view(shape)


def _start_reader(level: int, run_pid: int) -> None:
    torch.set_num_threads(1)  # the parent's cores are for its model and the other readers
    os.nice(READER_NICE)
    _keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(level)
    redact_logs(log)
    threading.Thread(target=_exit_after, args=(run_pid,), name="anysat-run-watch",
                     daemon=True).start()


# glibc gives an array over 32 MB its own mapping and unmaps it when freed, so every square's
# arrays (a 64-tile square's S2 block alone is about 100 MB) faulted in fresh pages. Kept in
# the reader's heap instead, the next square reuses them. One reader process, the same square
# of 64 tiles read 6 times, 2 cores: 4,000-5,300 page faults a square after the first against
# 30-480, the first square 1.16-1.18 s against 0.77-0.88 s, later ones 0.59-1.13 s against
# 0.48-0.74 s, peak RSS the same (810-834 MB: a square's arrays are its peak anyway).
READER_HEAP_KEEP = 2**30  # bytes: malloc's mmap and trim thresholds in a reader
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


@functools.cache  # looked up once: the heap is trimmed before every square read in turn
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (its allocator's knobs below), else None: another
    allocator is left as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _keep_freed_memory() -> None:
    if libc := _glibc():
        libc.mallopt(_M_MMAP_THRESHOLD, READER_HEAP_KEEP)
        libc.mallopt(_M_TRIM_THRESHOLD, READER_HEAP_KEEP)


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc keeps what it cannot trim from the
    top of the heap): before each square read in turn, so that the run's process, which
    also holds the model, does not grow square by square (2 cores, 256 tiles of 600 m in 4
    squares, 3 runs each: peak RSS 840-880 MB, 890-930 MB without)."""
    if libc := _glibc():
        libc.malloc_trim(0)


def _exit_after(run_pid: int) -> None:
    """Exit once the run's process is gone. A reader holds both ends of its pool's pipes (as
    any forkserver child does), so a run killed outright (SIGKILL, out of memory, a Dask
    worker stopped) would leave it waiting for work forever, and the forkserver with it."""
    while True:
        time.sleep(WATCH_S)
        try:
            os.kill(run_pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (its pid taken by another user's)
            os._exit(0)
        if _zombie(run_pid):
            os._exit(0)


def _zombie(pid: int) -> bool:
    """Dead but not yet reaped by its parent (Linux; elsewhere not seen)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


_pools: dict[int, ProcessPoolExecutor] = {}
_lock = threading.Lock()


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """One pool per process and size, kept between calls (a reader starts in seconds: it
    imports torch, GDAL and odc-stac). forkserver, not fork: a fork of a process whose
    OpenMP threads have run hangs (seen: the child stuck in torch.isfinite). As with spawn,
    a reader imports the main script: one that calls anysat needs a `__main__` guard."""
    with _lock:
        if workers not in _pools:
            _pools[workers] = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("forkserver"),
                initializer=_start_reader, initargs=(log.getEffectiveLevel(), os.getpid()))
        return _pools[workers]


def start_readers(workers: int) -> None:
    """Start the reader processes now and wait until they are up (a benchmark, like a model
    loaded before timing, leaves their start-up out)."""
    pool = _process_pool(workers)
    for future in [pool.submit(int) for _ in range(workers)]:
        future.result()


def _shm_full(exc: RuntimeError) -> BlockReaderError:
    room = ""
    if os.path.isdir("/dev/shm"):
        usage = shutil.disk_usage("/dev/shm")
        room = f" ({usage.free / 2**20:,.0f} MB free of {usage.total / 2**20:,.0f} MB)"
    return BlockReaderError(
        f"reader processes cannot hand their batches back: /dev/shm is full{room} ({exc}). "
        "Give it room (docker run --shm-size=8g; on Kubernetes a memory-backed emptyDir at "
        "/dev/shm), or read with fewer readers (ANYSAT_BLOCK_READERS) or on threads "
        "(ANYSAT_READER_POOL=threads); rerun the same command to resume")


class InTurn(Executor):
    """Runs each call at once in the caller's thread (reads and writes in turn with the
    model), behind the same interface as the pools that overlap them."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - raised where the result is taken, as a pool's
            future.set_exception(exc)
        return future


class BlockReaders:
    """Reads a run's squares: `submit(tiles, square)` now, `result(future)` when needed.
    `overlap` False: in the caller's thread, at submit. True: `block_readers()` at once, in
    the `reader_pool()` kind. A context manager, like the executors it wraps."""

    def __init__(self, plan: RunPlan, overlap: bool):
        self.plan = plan
        self.workers = block_readers() if overlap else 1
        self.kind = reader_pool() if overlap else "in turn"
        if self.kind == "processes":
            self._executor: Executor = _process_pool(self.workers)
        elif self.kind == "threads":
            self._executor = ThreadPoolExecutor(self.workers)
        else:
            self._executor = InTurn()

    def __enter__(self) -> BlockReaders:
        return self

    def __exit__(self, *exc) -> None:
        if self.kind != "processes":  # the process pool stays for the next call
            self._executor.shutdown()

    def submit(self, tiles: list[Tile], square: tuple[Tile, Tile]) -> Future:
        if self.kind == "in turn":
            give_back_freed_memory()
        if self.kind != "processes":
            return self._executor.submit(read_square, self.plan, tiles, square,
                                         self.kind == "in turn")
        plan = self.plan
        try:
            return self._executor.submit(_read_in_process, plan.request, plan.hash, plan.uri,
                                         tiles, square)
        except BrokenProcessPool:
            raise self._died() from None

    def result(self, future: Future) -> Loaded:
        try:
            loaded = future.result()
            if self.kind == "processes":
                loaded = _unpack(*loaded)
        except BrokenProcessPool:
            raise self._died() from None
        except RuntimeError as exc:
            if self.kind == "processes" and "shared memory" in str(exc):
                raise _shm_full(exc) from None
            raise
        for failed in (r for r in loaded if isinstance(r, dict)):
            log.error("%s", failed["failed"])
        return loaded

    def _died(self) -> BlockReaderError:
        with _lock:
            if _pools.get(self.workers) is self._executor:
                del _pools[self.workers]  # the next run starts fresh readers
        return BlockReaderError(
            "a block reader process died during the run: killed (out of memory? fewer readers: "
            "ANYSAT_BLOCK_READERS, or ANYSAT_READER_POOL=threads), or it could not start (a "
            "script that calls anysat must run it under `if __name__ == \"__main__\":`, as "
            "reader processes import the script); the tiles written so far are kept, rerun the "
            "same command to resume")
