"""Register xwin's work pools, global concurrency limits and deployments with a Prefect server (``xwin deploy``).

Same result as ``prefect deploy --all`` with prefect.yaml (tests/test_flows_deploy.py checks both name the same
deployments). Deployments run from a code directory present on the workers (the image's /opt/xwin, or this
checkout), so no image is built or pushed here.

    pools    xwin-cpu (process), xwin-gpu (process; one worker per GPU, XWIN_GPU_ID=gpu-worker-<i>)
    limits   xwin-gpu:gpu-worker-<i> (1 slot each, i < --gpus)
    deployments
      backfill-cohort/gpu           pool xwin-gpu, renders with backend "triton" (the fused kernel; CUDA torch has it)
      backfill-cohort/cpu           pool xwin-cpu, backend "joseph"
      backfill-cohort-dask/dask     pool xwin-cpu, tasks on the Dask scheduler XWIN_DASK_ADDRESS
      backfill-sharded/fanout       pool xwin-cpu, splits a cohort over N runs of backfill-cohort/gpu
      scan-landing/landing          pool xwin-gpu, cron: new series of the landing location (one run at a time)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DeploymentSpec:
    flow_entrypoint: str  # "xwin.flows.backfill.backfill_cohort"
    name: str
    work_pool: str
    parameters: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cron: str | None = None
    concurrency_limit: int | None = None
    description: str = ""

    @property
    def flow_name(self) -> str:
        """The Prefect flow's name, read from the flow object the entrypoint names."""
        module, attr = self.flow_entrypoint.rsplit(".", 1)
        return str(getattr(importlib.import_module(module), attr).name)

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


def deployment_specs(
    store: str,
    landing: str | None = None,
    cohort: str = "landing",
    cron: str = "*/15 * * * *",
    cpu_pool: str = "xwin-cpu",
    gpu_pool: str = "xwin-gpu",
    dask_address: str | None = None,
) -> list[DeploymentSpec]:
    """The deployments xwin registers (parameters left out here are given per run)."""
    base = {"store": store}
    out = [
        DeploymentSpec(
            "xwin.flows.backfill.backfill_cohort",
            "gpu",
            gpu_pool,
            dict(base, backend="triton"),
            {"XWIN_RENDER_BACKEND": "triton"},
            description="backfill a cohort on a GPU worker",
        ),
        DeploymentSpec(
            "xwin.flows.backfill.backfill_cohort",
            "cpu",
            cpu_pool,
            dict(base, backend="joseph"),
            {"XWIN_RENDER_BACKEND": "joseph"},
            description="backfill a cohort on a CPU worker",
        ),
        DeploymentSpec(
            "xwin.flows.backfill_dask.backfill_cohort_dask",
            "dask",
            cpu_pool,
            dict(base),
            {"XWIN_DASK_ADDRESS": dask_address} if dask_address else {},
            description="backfill with tasks on a Dask cluster",
        ),
        DeploymentSpec(
            "xwin.flows.landing.backfill_sharded",
            "fanout",
            cpu_pool,
            dict(base, shards=8),
            description="split a cohort over N runs of backfill-cohort/gpu",
        ),
    ]
    if landing:
        out.append(
            DeploymentSpec(
                "xwin.flows.landing.scan_landing",
                "landing",
                gpu_pool,
                {"landing": landing, "cohort": cohort, "store": store},
                cron=cron,
                concurrency_limit=1,
                description="backfill new series of the landing location",
            )
        )
    return out


def ensure_pool(name: str, pool_type: str = "process") -> bool:
    """Create work pool ``name`` unless it exists. Returns True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from xwin.flows.runtime import create_unless_exists

    with get_client(sync_client=True) as client:
        return create_unless_exists(
            lambda: client.read_work_pool(name),
            lambda: client.create_work_pool(WorkPoolCreate(name=name, type=pool_type)),
        )


def register(
    specs: list[DeploymentSpec], code_dir: str | Path = REPO_ROOT, gpus: int = 1, gpu_ids: list[str] | None = None
) -> list[str]:
    """Create pools, GPU limits and deployments. Returns the deployment ids."""
    from prefect import flow as prefect_flow
    from prefect.flows import Flow

    from xwin.flows.runtime import ensure_limit

    for pool in sorted({s.work_pool for s in specs}):
        ensure_pool(pool)
    for gid in gpu_ids or [f"gpu-worker-{i}" for i in range(gpus)]:
        ensure_limit(f"xwin-gpu:{gid}", 1)
    ids = []
    for s in specs:
        f = prefect_flow.from_source(source=str(code_dir), entrypoint=s.flow_entrypoint)
        assert isinstance(f, Flow)  # from_source is synchronous outside an event loop
        kw: dict[str, Any] = {}
        if s.cron:
            kw["cron"] = s.cron
        if s.concurrency_limit:
            kw["concurrency_limit"] = s.concurrency_limit
        dep_id = f.deploy(
            name=s.name,
            work_pool_name=s.work_pool,
            parameters=s.parameters,
            job_variables={"env": s.env, "working_dir": str(code_dir)} if s.env else {"working_dir": str(code_dir)},
            description=s.description,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
            **kw,
        )
        ids.append(str(dep_id))
    return ids
