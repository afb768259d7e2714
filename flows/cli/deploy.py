"""``xwin deploy``: register the work pools, GPU concurrency limits and deployments with a Prefect server."""

from __future__ import annotations

from pathlib import Path

import typer

from xwin.flows.cli.common import quiet_prefect, require_prefect_server
from xwin.flows.deploy import REPO_ROOT


def deploy_cmd(
    store: str = typer.Option(..., "--store", help="store URL the deployments write to"),
    landing: str | None = typer.Option(None, "--landing", help="landing dir or s3://bucket/prefix to scan"),
    cohort: str = typer.Option("landing", "--cohort", help="cohort of the landing scan"),
    cron: str = typer.Option("*/15 * * * *", "--cron", help="landing scan schedule"),
    gpus: int = typer.Option(1, "--gpus", min=0, help="GPU workers: one-slot limits xwin-gpu:gpu-worker-<i>"),
    code_dir: Path = typer.Option(REPO_ROOT, "--code-dir", help="where the workers find this code"),
    dask_address: str | None = typer.Option(None, "--dask-address", help="scheduler for backfill-cohort-dask"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Prefect INFO logs"),
) -> None:
    """Register work pools, GPU concurrency limits and the deployments (the cron landing scan included) with the
    Prefect server of PREFECT_API_URL (refused without one that answers)."""
    require_prefect_server("xwin deploy")  # never into the throw-away local database no worker reads
    quiet_prefect(verbose)
    from xwin.flows.deploy import deployment_specs, register

    specs = deployment_specs(store, landing, cohort, cron, dask_address=dask_address)
    ids = register(specs, code_dir=code_dir, gpus=gpus)
    for s, i in zip(specs, ids):
        typer.echo(f"{s.full_name} -> {s.work_pool}{' cron ' + s.cron if s.cron else ''} ({i})")
