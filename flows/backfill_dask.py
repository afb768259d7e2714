"""The backfill flow on Dask as a Prefect flow: the task runner, and the deployment entrypoint
``xwin.flows.backfill_dask.backfill_cohort_dask``.

The scheduler comes from XWIN_DASK_ADDRESS (e.g. ``tcp://dask-scheduler:8786`` in docker-compose.yml); without it
a LocalCluster of XWIN_DASK_WORKERS processes is started for the run.

Prefect task state on Dask needs a Prefect API that every Dask worker process reaches (PREFECT_API_URL, inherited
by LocalCluster workers, set on remote ones): without one, each worker would start an ephemeral API server of its
own, racing the others, failing tasks ("Server process did not start") and leaving the servers behind when the
workers are shut down. So ``xwin backfill --runner dask`` without a configured API runs
:func:`xwin.flows.backfill.run_dask` instead (the same flow body and task functions on Dask, no Prefect in the
workers), and :func:`xwin.flows.backfill.backfill_cohort_on` refuses the Prefect flow on Dask without one.
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


class NoPrefectApi(RuntimeError):
    """The Prefect flow on Dask was asked for without a Prefect API the workers can reach."""


def require_api() -> str:
    """The configured Prefect API URL; raises :class:`NoPrefectApi` when there is none."""
    from xwin.flows.runtime import prefect_api_url

    url = prefect_api_url()
    if not url:
        raise NoPrefectApi(
            "the Prefect flow on Dask needs a Prefect API every Dask worker can reach: set PREFECT_API_URL "
            "(e.g. `prefect server start`, docs/orchestration.md), or run without Prefect: "
            "`xwin backfill --runner dask` without --prefect (xwin.flows.backfill.run_dask)"
        )
    return url


def on_dask(address: str | None = None, n_workers: int | None = None) -> Flow[..., RunSummary]:
    """The backfill flow with its tasks on Dask (:func:`dask_task_runner`). Needs a Prefect API (the deployment
    entrypoint below is run by a Prefect worker, which has one); call :func:`require_api` before running it."""
    return backfill_cohort.with_options(
        name="backfill-cohort-dask",
        task_runner=dask_task_runner(address, n_workers),  # type: ignore[arg-type]  # Prefect's runner generics are invariant
    )


backfill_cohort_dask = on_dask()
