"""The backfill flow on Dask: the task runner, and the deployment entrypoint
``xwin.flows.backfill_dask.backfill_cohort_dask``.

The scheduler comes from XWIN_DASK_ADDRESS (e.g. ``tcp://dask-scheduler:8786`` in docker-compose.yml); without it
a LocalCluster of XWIN_DASK_WORKERS processes is started for the run.
"""

from __future__ import annotations

import os

from prefect.flows import Flow
from prefect_dask import DaskTaskRunner

from xwin.flows.backfill import backfill_cohort
from xwin.schemas.ingest import RunSummary


def dask_task_runner(address: str | None = None, n_workers: int | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner on an existing scheduler (``address`` / XWIN_DASK_ADDRESS) or a LocalCluster."""
    address = address or os.environ.get("XWIN_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    kw = {
        "n_workers": n_workers or int(os.environ.get("XWIN_DASK_WORKERS") or 2),
        "threads_per_worker": 2,
        "processes": True,
        "dashboard_address": None,
    }
    return DaskTaskRunner(cluster_kwargs=kw)


def on_dask(address: str | None = None, n_workers: int | None = None) -> Flow[..., RunSummary]:
    """The backfill flow with its tasks on Dask (:func:`dask_task_runner`)."""
    return backfill_cohort.with_options(
        name="backfill-cohort-dask",
        task_runner=dask_task_runner(address, n_workers),  # type: ignore[arg-type]  # Prefect's runner generics are invariant
    )


backfill_cohort_dask = on_dask()
