"""Validation flow: FDK-reconstruct stored rings and score them (PSNR/SSIM) against their source volumes.

:func:`validate_stored_ring` (storage -> ``xwin.pipeline.reconstruct.validate_volume``) over a cohort's dataset; one
task per volume with the same retry policy as the backfill. Results go to
``<store>-reports/validation/<cohort>/<spec_hash>/<id>.json`` and, in a flow run, to a table artifact. A flow run
is named ``validate-<cohort>``; given the backfill run it checks (``backfill_run``, what ``xwin backfill`` passes),
each run gets a link artifact to the other, and each validated ring is a stage line in the run's logs.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from xwin.flows import reports as rep
from xwin.flows.progress import artifact_key, emit
from xwin.flows.runtime import LocalStages, PrefectStages, Stages, slot
from xwin.flows.tasks import TASK_OPTS, store_handle
from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct import ReconGrid, ValidationResult, validate_volume
from xwin.schemas.render import RenderSpec
from xwin.storage import ProjectionDataset, Store

log = logging.getLogger(__name__)


def recon_backend() -> str:
    """XWIN_RECON_BACKEND, else "auto" where torch sees CUDA (ASTRA probe), else "numba" (skips the probe)."""
    b = os.environ.get("XWIN_RECON_BACKEND")
    if b:
        return b
    try:
        import torch

        return "auto" if torch.cuda.is_available() else "numba"
    except Exception:  # noqa: BLE001 - whatever fails in the CUDA probe means no GPU here  # pragma: no cover
        return "numba"


def validate_stored_ring(
    store: Store,
    dataset: ProjectionDataset,
    volume_id: str,
    grid: ReconGrid | None = None,
    backend: str = "auto",
    **options,
) -> ValidationResult:
    """FDK of one stored ring (geometry only from its stored cone_vecs), scored against its stored volume."""
    record, hu = store.read_volume(volume_id)
    views = ConeBeamViews.from_view_meta(dataset.read_geometry(volume_id))
    proj, _ = dataset.read_views(volume_id, np.arange(len(views)))
    res = validate_volume(
        proj,
        views,
        hu,
        np.asarray(record.affine, dtype=np.float64),
        dataset.spec.mu_water_per_mm,
        grid,
        backend,
        **options,
    )
    res.metrics.update(
        {
            "volume_id": volume_id,
            "cohort": dataset.cohort,
            "spec_hash": dataset.spec_hash,
        }
    )
    return res


@task(name="validate-series", **TASK_OPTS)
def validate_series(
    store_url: str, cohort: str, spec_hash: str, volume_id: str, backend: str, reports: str | None
) -> dict:
    """Metrics of one stored ring: {"volume_id", "psnr", "ssim", "backend", "seconds", ...}."""
    st = store_handle(store_url)
    ds = st.open_dataset(cohort, spec_hash)
    with slot(f"xwin-recon:{os.environ.get('XWIN_HOST') or os.uname().nodename}", 1):
        res = validate_stored_ring(st, ds, volume_id, backend=backend)
    m = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}
    out = {
        "volume_id": volume_id,
        "psnr": float(res.metrics["psnr_db"]),
        "ssim": float(res.metrics["ssim"]),
        "backend": res.metrics.get("backend"),
        "seconds": float(res.metrics.get("seconds", 0.0)),
        "metrics": m,
    }
    if reports:
        rep.write_bytes(
            f"{reports}/validation/{cohort}/{spec_hash}/{volume_id}.json",
            json.dumps(out, indent=1, default=str).encode(),
        )
    emit({"event": "validated", **{k: out[k] for k in ("volume_id", "psnr", "ssim", "backend", "seconds")}})
    return out


def run_validation(
    store: str,
    cohort: str,
    spec_hash: str,
    volume_ids: list[str] | None,
    stages: Stages,
    limit: int | None = None,
    reports: str | None = None,
    backfill_run: str | None = None,
) -> list[dict]:
    st = store_handle(store)
    ds = st.open_dataset(cohort, spec_hash)
    ids = volume_ids or ds.volume_ids()
    ids = ids[:limit] if limit else ids
    reports = reports or rep.reports_url(store)
    backend = recon_backend()
    emit({"event": "stage", "name": f"validate {cohort}/{spec_hash}: {len(ids)} rings, FDK ({backend})"})
    if stages.mode == "prefect" and backfill_run:
        try:
            link_runs(backfill_run, cohort)
        except Exception as e:  # noqa: BLE001 - a missing link never fails the validation
            log.warning("validation not linked to backfill run %s: %s", backfill_run, e)
    futs = [stages.submit(validate_series, store, cohort, spec_hash, v, backend, reports) for v in ids]
    results = [stages.result(f) for f in futs]
    if stages.mode == "prefect":
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            table=[{k: r[k] for k in ("volume_id", "psnr", "ssim", "backend", "seconds")} for r in results],
            key=artifact_key("validation", cohort),
            description=f"FDK validation of {cohort}/{spec_hash}: PSNR [dB], SSIM",
        )
    return results


def run_url(flow_run_id: str) -> str:
    """The UI page of a flow run (``PREFECT_UI_URL``; a path on the same host when that is not set)."""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id) or f"/runs/flow-run/{flow_run_id}"


def link_runs(backfill_run: str, cohort: str) -> None:
    """Link this validation flow run and the backfill run it checks: a link artifact in each, to the other."""
    from uuid import UUID

    from prefect.artifacts import LinkArtifact, create_link_artifact
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    create_link_artifact(
        link=run_url(backfill_run),
        link_text=f"backfill run of {cohort} that this validation checks",
        key=artifact_key("validation", cohort, "backfill"),
        description=f"the backfill run of {cohort}",
    )
    if ctx is not None and ctx.flow_run is not None:
        LinkArtifact(
            link=run_url(str(ctx.flow_run.id)),
            link_text=f"FDK validation of {cohort}: {ctx.flow_run.name}",
            key=artifact_key("backfill", cohort, "validation"),
            description=f"the validation run of {cohort}",
            flow_run_id=UUID(backfill_run),
        ).create()


@flow(
    name="validate-cohort",
    flow_run_name="validate-{cohort}",
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]  # Prefect's runner generics are invariant
    persist_result=False,
)
def validate_cohort(
    store: str,
    cohort: str,
    spec: RenderSpec | None = None,
    spec_hash: str | None = None,
    volume_ids: list[str] | None = None,
    limit: int | None = None,
    backfill_run: str | None = None,
) -> list[dict]:
    """FDK PSNR/SSIM of the stored rings of ``cohort`` (dataset by ``spec`` or ``spec_hash``); ``backfill_run``: the
    id of the backfill flow run that wrote them (the two runs are linked)."""
    return run_validation(
        store,
        cohort,
        spec_hash or (spec or RenderSpec()).spec_hash,
        volume_ids,
        PrefectStages(),
        limit,
        backfill_run=backfill_run,
    )


def validate_volumes(
    store: str,
    cohort: str,
    spec: RenderSpec,
    volume_ids: list[str],
    prefect: bool = False,
    backfill_run: str | None = None,
) -> list[dict[str, Any]]:
    """Validate ``volume_ids`` (the CLI after ``xwin backfill --cohort example``): flow or serverless."""
    if prefect:
        return validate_cohort(store=store, cohort=cohort, spec=spec, volume_ids=volume_ids, backfill_run=backfill_run)
    with LocalStages(max_workers=1) as stages:
        return run_validation(store, cohort, spec.spec_hash, volume_ids, stages)
