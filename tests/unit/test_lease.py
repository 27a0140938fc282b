"""The output lease: one writer at a time, a dead holder's lease taken over, renewal."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from anysat import lease
from anysat.lease import LEASE, OutputBusyError


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path):
    with lease.hold(str(tmp_path), "first"):
        held = json.loads((tmp_path / LEASE).read_text())
        assert held["run"] == "first" and held["host"] == socket.gethostname()
        with pytest.raises(OutputBusyError, match=r"being written by another run \(first on .*pid"):
            lease.Lease(str(tmp_path), "second").acquire()
    assert not (tmp_path / LEASE).exists()  # released
    with lease.hold(str(tmp_path), "second"):
        pass


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LEASE).write_text(json.dumps({"owner": "x", "host": socket.gethostname(),
                                              "pid": int(dead), "renewed_unix": time.time()}))
    with lease.hold(str(tmp_path), "rerun") as held:
        assert json.loads((tmp_path / LEASE).read_text())["owner"] == held.doc["owner"]
    assert "no longer runs" in caplog.text


def test_another_machines_lease_holds_until_it_expires(tmp_path, monkeypatch):
    other = {"owner": "x", "host": "some-other-host", "pid": 1, "run": "flow"}
    (tmp_path / LEASE).write_text(json.dumps({**other, "renewed_unix": time.time() - 30}))
    with pytest.raises(OutputBusyError, match="some-other-host.*renewed 30 s ago"):
        lease.Lease(str(tmp_path), "mine").acquire()
    monkeypatch.setenv("ANYSAT_LEASE_TTL_S", "20")  # now 30 s old is expired
    lease.Lease(str(tmp_path), "mine").acquire()
    assert json.loads((tmp_path / LEASE).read_text())["run"] == "mine"


def test_the_holder_renews_its_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSAT_LEASE_TTL_S", "0.4")
    with lease.hold(str(tmp_path), "long run"):
        first = json.loads((tmp_path / LEASE).read_text())["renewed_unix"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LEASE).read_text())["renewed_unix"] > first

