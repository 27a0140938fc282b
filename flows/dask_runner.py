"""The Dask task runner of the flows: a Dask scheduler at ANYSAT_DASK_ADDRESS (a cluster on
Kubernetes, Coiled, ...) when set, else a LocalCluster of two single-threaded processes."""

from __future__ import annotations

import logging
import os

from prefect_dask import DaskTaskRunner


def dask_task_runner() -> DaskTaskRunner:
    address = os.environ.get("ANYSAT_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                          "silence_logs": logging.WARNING})
