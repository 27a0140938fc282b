"""One writer per output: a lease object (`<output>/lease.json`) that a run holds while it
writes, so two runs started into the same output at once cannot mix their tiles.

The lease is created exclusively (a hard link locally; S3's conditional PUT, If-None-Match)
and renewed by a thread every TTL/4. A lease is free again when it is released, when it was
not renewed for `ANYSAT_LEASE_TTL_S` seconds (its holder died elsewhere), or at once when its
holder was a process of this machine that no longer runs (a killed run, rerun here).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from . import storage
from .errors import AnySatError

log = logging.getLogger("anysat")
LEASE = "lease.json"


class OutputBusyError(AnySatError):
    """Another run holds the output's lease."""


def ttl_s() -> float:
    return float(os.environ.get("ANYSAT_LEASE_TTL_S", 600))


def _now() -> float:
    return time.time()


def _alive_here(holder: dict) -> bool | None:
    """Whether the holder's process still runs, if it ran on this machine (None: elsewhere)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class Lease:
    def __init__(self, output_uri: str, what: str):
        self.uri = storage.join(output_uri, LEASE)
        self.doc = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                    "run": what,
                    "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "renewed_unix": _now()}

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # a torn or foreign file: treat as stale
            return {}

    def acquire(self) -> None:
        if storage.create_exclusive(self.uri, json.dumps(self.doc).encode()):
            return
        holder = self._read()
        if holder is None:  # released meanwhile
            return self.acquire()
        age = _now() - float(holder.get("renewed_unix", 0))
        alive = _alive_here(holder)
        if alive or (alive is None and age < ttl_s()):
            raise OutputBusyError(
                f"output {self.uri.rsplit('/', 1)[0]} is being written by another run ("
                f"{holder.get('run', '?')} on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                f"since {holder.get('started', '?')}, lease renewed {age:.0f} s ago); wait for it "
                f"to finish, or use another output. If that run is dead, its lease expires "
                f"{max(ttl_s() - age, 0):.0f} s from now (ANYSAT_LEASE_TTL_S), or remove {self.uri}")
        log.warning("taking over the lease of a run that %s (%s on %s, pid %s)",
                    "no longer runs" if alive is False else f"was not renewed for {age:.0f} s",
                    holder.get("run", "?"), holder.get("host", "?"), holder.get("pid", "?"))
        self._write()
        time.sleep(min(1.0, ttl_s() / 100))  # two takers at once: the last write wins
        if (self._read() or {}).get("owner") != self.doc["owner"]:
            raise OutputBusyError(f"output {self.uri.rsplit('/', 1)[0]}: another run took over "
                                  "the same expired lease at the same moment; rerun later")

    def _write(self) -> None:
        self.doc["renewed_unix"] = _now()
        storage.write_bytes_atomic(self.uri, json.dumps(self.doc).encode())

    def renew(self) -> bool:
        """Renew if still ours (False: another run took it over after an expiry)."""
        if (self._read() or {}).get("owner") != self.doc["owner"]:
            return False
        self._write()
        return True

    def release(self) -> None:
        if (self._read() or {}).get("owner") == self.doc["owner"]:
            storage.remove(self.uri)


@contextmanager
def hold(output_uri: str, what: str) -> Iterator[Lease]:
    """Hold the output's lease for the body (renewed in the background), then release it.
    An output that cannot be written fails first, with the reason."""
    storage.check_writable(output_uri)
    lease = Lease(output_uri, what)
    lease.acquire()
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(ttl_s() / 4):
            try:
                if not lease.renew():
                    log.error("the lease of %s was taken over by another run", output_uri)
                    return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again next period
                log.warning("could not renew the lease of %s: %s", output_uri, exc)

    keeper = threading.Thread(target=keep, name="anysat-lease", daemon=True)
    keeper.start()
    try:
        yield lease
    finally:
        stop.set()
        keeper.join()
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - storage gone: the lease expires by itself
            log.warning("could not release the lease of %s (%s); it expires in %.0f s, or a "
                        "rerun on this machine takes it over", output_uri, exc, ttl_s())
