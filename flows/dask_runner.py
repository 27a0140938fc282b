"""The Dask task runner of the flows: a Dask scheduler at ANYSAT_DASK_ADDRESS (a cluster on
Kubernetes, Coiled, ...) when set, else a LocalCluster of two single-threaded processes."""

from __future__ import annotations

import logging
import os

import dask
from prefect_dask import DaskTaskRunner

# Dask starts its local workers as daemonic processes unless told otherwise, and a daemonic
# process cannot start children: beside an accelerator, a task's block readers are processes
# (anysat.readers). A worker still exits when its nanny dies (Dask watches the parent).
if "DASK_DISTRIBUTED__WORKER__DAEMON" not in os.environ:
    dask.config.set({"distributed.worker.daemon": False})


def dask_task_runner() -> DaskTaskRunner:
    address = os.environ.get("ANYSAT_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                          "silence_logs": logging.WARNING})
