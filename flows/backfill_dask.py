"""Deployment entry point of the backfill flow on Dask: ``flows/backfill_dask.py:backfill_cohort_dask``.

The scheduler comes from XWIN_DASK_ADDRESS (e.g. ``tcp://dask-scheduler:8786`` in docker-compose.yml); without it
a LocalCluster of XWIN_DASK_WORKERS processes is started for the run.
"""

from xwin.flows.backfill import backfill_cohort, dask_task_runner

backfill_cohort_dask = backfill_cohort.with_options(name="backfill-cohort-dask", task_runner=dask_task_runner())
