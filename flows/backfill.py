"""Backfill a cohort: plan -> ingest -> render -> commit, for every series; reruns resume.

Thin wiring only: the stages are the tasks of :mod:`xwin.flows.tasks` (plan, ingest, render + commit), whose work is
``xwin.pipeline.ingest``, ``xwin.pipeline.render.render_ring`` and ``storage``.

Idempotence: a series whose ring is committed in ``datasets/<cohort>/<spec_hash>`` is skipped before any task is
submitted, so a crashed or cancelled run is resumed by running it again; storage commits are atomic, so a killed
run leaves no partial volume visible. A series whose transient failure outlived its retries ends the run
``Failed`` (:class:`BackfillIncomplete`) after the summary is written; the rerun picks it up.

One flow body, two drivers (see ``xwin.flows.runtime``): :func:`backfill_cohort` (the Prefect flow, any task runner)
and :func:`run_local` (no Prefect server: the same tasks' functions on a thread pool).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from xwin.flows import reports as rep
from xwin.flows.params import BackfillParams, VerifyMode
from xwin.flows.progress import Progress, artifact_key, emit
from xwin.flows.runtime import LocalStages, PrefectStages, Stages, cpu_slot, ensure_limits_once, render_slot
from xwin.flows.tasks import Outcome, dataset_handle, ingest_series, plan_series, render_series
from xwin.schemas.ingest import RunEntry, RunSummary
from xwin.schemas.render import RenderSpec

log = logging.getLogger(__name__)


class BackfillIncomplete(RuntimeError):
    """Some series failed transiently after all retries (or the store failed verification). Rerun to resume."""

    def __init__(self, summary: RunSummary, failed: list[tuple[str, str]], verify: str | None) -> None:
        self.summary, self.failed, self.verify = summary, failed, verify
        msg = f"{len(failed)} series failed after retries" if failed else f"store verification failed: {verify}"
        super().__init__(msg + " (a rerun resumes; see the run summary)")


def run_backfill(params: BackfillParams, stages: Stages, run_id: str | None = None) -> RunSummary:
    """Plan, skip what is committed, run ingest -> render for the rest, verify, report. Same code in every mode."""
    t_start = time.perf_counter()
    prefect_mode = stages.mode == "prefect"
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    spec_json = params.spec.model_dump_json()
    backend = params.backend_name()
    reports = params.reports_url()

    if prefect_mode:  # create this host's limits before tasks race to do it (strict=True needs them)
        from xwin.pipeline.render import resolve_backend

        ensure_limits_once(cpu_slot(), render_slot(resolve_backend(backend)))
    cands, rejections = stages.result(stages.submit(plan_series, params))
    ds = dataset_handle(params.store, params.cohort, spec_json)  # creates the dataset / refuses another spec
    committed = set(ds.volume_ids())
    summary = RunSummary(rejected=list(rejections))
    todo = []
    for c in cands:
        if c.volume_id in committed:
            summary.skipped.append(
                RunEntry(input=c.input, volume_id=c.volume_id, series_uid=c.series_uid, stage="render")
            )
        else:
            todo.append(c)
    progress = Progress(params.cohort, len(todo), len(summary.skipped), prefect_mode)

    futures: dict[Any, Any] = {}
    for c in todo:
        fi = stages.submit(ingest_series, c, params.store)
        fr = stages.submit(render_series, fi, params.store, params.cohort, spec_json, backend, reports, params.previews)
        futures[fr] = (c, fi)
    failed: list[tuple[str, str]] = []
    previews: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for fr in stages.as_completed(futures):
        c, fi = futures[fr]
        try:
            o: Outcome = stages.result(fr)
        except BaseException as e:  # noqa: BLE001 - transient failure that outlived its retries
            err = e
            try:
                stages.result(fi)
            except BaseException as ei:  # noqa: BLE001 - the ingest stage is the one that failed
                err = ei
            failed.append((c.input, f"{type(err).__name__}: {err}"))
            log.error("series %s failed after retries: %s", c.input, err)
            o = Outcome("rejected")  # counted for progress only; not in the summary
        else:
            if o.status == "done" and o.entry is not None:
                summary.done.append(o.entry)
                if o.preview:
                    previews[o.entry.volume_id] = o.preview
            elif o.status == "skipped" and o.entry is not None:
                summary.skipped.append(o.entry)
            elif o.status == "rejected" and o.rejection is not None:
                summary.rejected.append(o.rejection)
            for k, v in o.seconds.items():
                seconds[k] = seconds.get(k, 0.0) + v
        progress.advance(o)

    verify_msg = None
    verify_ok = True
    if params.verify != "none":
        emit({"event": "stage", "name": f"verify ({params.verify})"})
        rep_v = ds.verify(deep=params.verify == "deep")
        verify_ok = rep_v.clean
        verify_msg = (
            f"{params.verify}: {rep_v.ok}/{rep_v.volumes} rings ok, {len(rep_v.corrupt)} corrupt, "
            f"{len(rep_v.missing)} missing"
        )
    wall = time.perf_counter() - t_start
    md = rep.summary_markdown(
        summary,
        cohort=params.cohort,
        spec_hash=ds.spec_hash,
        store=params.store,
        previews=previews,
        failed=failed,
        verify=verify_msg,
        wall_s=wall,
    )
    extra = {
        "run_id": run_id,
        "cohort": params.cohort,
        "spec_hash": ds.spec_hash,
        "store": params.store,
        "mode": stages.mode,
        "backend": backend,
        "wall_s": wall,
        "stage_seconds": seconds,
        "failed": failed,
        "verify": verify_msg,
        "previews": previews,
    }
    json_url: str | None
    md_url: str | None
    try:
        json_url, md_url = rep.write_run_report(reports, run_id, summary, md, extra)
    except Exception as e:  # noqa: BLE001 - reports are best effort
        log.warning("run report not written: %s", e)
        json_url = md_url = None
    if prefect_mode:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        key = artifact_key("backfill", params.cohort)
        create_markdown_artifact(
            markdown=md + (f"\n[summary file]({rep.link(md_url)})\n" if md_url else ""),
            key=key,
            description=f"backfill {params.cohort} summary",
        )
        rows = [
            {"outcome": "done", "series": len(summary.done)},
            {"outcome": "skipped", "series": len(summary.skipped)},
        ]
        rows += [{"outcome": f"rejected: {k}", "series": v} for k, v in rep.counts_by_reason(summary).items()]
        if failed:
            rows.append({"outcome": "failed (rerun resumes)", "series": len(failed)})
        create_table_artifact(table=rows, key=key + "-counts", description="done / skipped / rejected by reason")
    emit(
        {
            "event": "end",
            "summary": summary,
            "report": md_url,
            "json": json_url,
            "wall_s": wall,
            "verify": verify_msg,
            "failed": failed,
            "previews": previews,
            "stage_seconds": seconds,
        }
    )
    if failed or not verify_ok:
        raise BackfillIncomplete(summary, failed, verify_msg)
    return summary


def _max_workers() -> int:
    return int(os.environ.get("XWIN_STAGE_THREADS") or 4)


@flow(
    name="backfill-cohort",
    task_runner=ThreadPoolTaskRunner(max_workers=_max_workers()),  # type: ignore[arg-type]  # Prefect's runner generics are invariant
    persist_result=False,
)
def backfill_cohort(
    cohort: str,
    store: str,
    source: list[str] | None = None,
    manifest: str | None = None,
    manifest_root: str | None = None,
    spec: RenderSpec | None = None,
    backend: str | None = None,
    limit: int | None = None,
    shard: str | None = None,
    verify: VerifyMode = "shallow",
    previews: int = 4,
    reports: str | None = None,
) -> RunSummary:
    """Backfill ``cohort`` into ``store``: every series ingested, rendered with ``spec`` and committed once."""
    from prefect.context import FlowRunContext

    params = BackfillParams(
        cohort=cohort,
        store=store,
        source=source,
        manifest=manifest,
        manifest_root=manifest_root,
        spec=spec or RenderSpec(),
        backend=backend,
        limit=limit,
        shard=shard,
        verify=verify,
        previews=previews,
        reports=reports,
    )
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    return run_backfill(params, PrefectStages(), run_id=run_id)


def backfill_cohort_on(runner: str = "threads", dask_address: str | None = None, n_workers: int | None = None):
    """The backfill flow with the given task runner: ``threads`` (in-process) or ``dask``."""
    if runner == "threads":
        return backfill_cohort
    if runner == "dask":
        from xwin.flows.backfill_dask import on_dask

        return on_dask(dask_address, n_workers)
    raise ValueError(f"unknown runner {runner!r}: threads | dask")


def run_local(params: BackfillParams, max_workers: int | None = None) -> RunSummary:
    """The same flow body without a Prefect server: task functions on a thread pool, same retries and slots."""
    with LocalStages(max_workers=max_workers or _max_workers()) as stages:
        return run_backfill(params, stages)
