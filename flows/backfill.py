"""Backfill a cohort: plan -> ingest -> render -> commit, for every series; reruns resume.

Thin wiring only: the stages are the tasks of :mod:`xwin.flows.tasks` (plan, ingest, render + commit), whose work is
``xwin.pipeline.ingest``, ``xwin.pipeline.render.render_ring`` and ``storage``.

Idempotence: a series whose ring is committed in ``datasets/<cohort>/<spec_hash>`` is skipped before any task is
submitted, so a crashed or cancelled run is resumed by running it again; storage commits are atomic, so a killed
run leaves no partial volume visible. A series whose failure outlived its retries is in the summary's ``failed``
list and ends the run ``Failed`` (:class:`BackfillIncomplete`, carrying the summary) after the summary is written;
the rerun picks it up.

One flow body, three drivers (see ``xwin.flows.runtime``): :func:`backfill_cohort` (the Prefect flow, any task
runner), :func:`run_local` (no Prefect server: the same tasks' functions on a thread pool) and :func:`run_dask` (no
Prefect server: the same functions on Dask workers).
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
from xwin.flows.runtime import (
    DaskStages,
    LocalStages,
    PrefectStages,
    Stages,
    cpu_slot,
    ensure_limits_once,
    render_slot,
)
from xwin.flows.tasks import Outcome, dataset_handle, error_text, ingest_series, plan_series, render_series
from xwin.schemas.ingest import Failure, Rejection, RunEntry, RunSummary
from xwin.schemas.render import RenderSpec
from xwin.storage import is_transient

log = logging.getLogger(__name__)


class BackfillIncomplete(RuntimeError):
    """Some series failed after all retries (``summary.failed``), or the store failed verification. The summary
    accounts for every planned series; a rerun resumes."""

    def __init__(self, summary: RunSummary, verify: str | None = None) -> None:
        self.summary, self.verify = summary, verify
        n = len(summary.failed)
        msg = f"{n} series failed after retries" if n else f"store verification failed: {verify}"
        super().__init__(msg + " (a rerun resumes; see the run summary)")

    @property
    def failed(self) -> list[Failure]:
        return self.summary.failed


def _failure(c: Any, stage: str, err: BaseException) -> Failure:
    return Failure(
        input=c.input,
        stage=stage,
        error=error_text(err),
        retryable=is_transient(err),
        volume_id=c.volume_id,
        series_uid=c.series_uid,
    )


def _account_duplicates(
    duplicates: list[RunEntry],
    first_input: dict[str, str],
    done: list[RunEntry],
    skipped: list[RunEntry],
    rejected: list[Rejection],
    failed: list[Failure],
) -> None:
    """A second copy of a planned series (``first_input``: volume id -> the input planned first) shares the fate of
    the first: skipped, with its reason, when the series is committed; else rejected or failed as the first was."""
    ok = {e.volume_id for e in done + skipped}
    for d in duplicates:
        if d.volume_id in ok:
            skipped.append(d)
            continue
        first = first_input.get(d.volume_id)
        rej = next((r for r in rejected if r.input == first), None)
        fail = next((f for f in failed if f.volume_id == d.volume_id), None)
        if rej is not None:
            rejected.append(rej.model_copy(update={"input": d.input, "detail": f"{d.reason}; {rej.detail}"}))
        else:
            failed.append(
                Failure(
                    input=d.input,
                    stage=fail.stage if fail is not None else "plan",
                    error=f"{d.reason}; {fail.error if fail is not None else 'the series was not committed'}",
                    retryable=fail.retryable if fail is not None else True,
                    volume_id=d.volume_id,
                    series_uid=d.series_uid,
                )
            )


def run_backfill(params: BackfillParams, stages: Stages, run_id: str | None = None) -> RunSummary:
    """Plan, skip what is committed, run ingest -> render for the rest, verify, report. Same code in every mode.

    The summary accounts for every planned series: done, skipped, rejected (bad input) or failed (an error that
    outlived its retries, with whether it can pass: ``Failure.retryable``); ``planned`` is their number."""
    t_start = time.perf_counter()
    prefect_mode = stages.mode == "prefect"
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    spec_json = params.spec.model_dump_json()
    backend = params.backend_name()
    reports = params.reports_url()

    if prefect_mode:  # create this host's limits before tasks race to do it (strict=True needs them)
        from xwin.pipeline.render import resolve_backend

        ensure_limits_once(cpu_slot(), render_slot(resolve_backend(backend)))
    cands, rejections, plan_failures, duplicates = stages.result(stages.submit(plan_series, params))
    planned = len(cands) + len(rejections) + len(plan_failures) + len(duplicates)
    ds = dataset_handle(params.store, params.cohort, spec_json)  # creates the dataset / refuses another spec
    committed = ds.settled_ids()  # committed and catalogued: the rest go to the tasks (whose skip check repairs)
    done: list[RunEntry] = []
    skipped: list[RunEntry] = []
    rejected: list[Rejection] = list(rejections)
    failed: list[Failure] = list(plan_failures)
    todo = []
    for c in cands:
        if c.volume_id in committed:
            skipped.append(RunEntry(input=c.input, volume_id=c.volume_id, series_uid=c.series_uid, stage="render"))
        else:
            todo.append(c)
    progress = Progress(params.cohort, len(todo), len(skipped), prefect_mode)

    futures: dict[Any, Any] = {}
    for c in todo:
        fi = stages.submit(ingest_series, c, params.store)
        fr = stages.submit(
            render_series,
            fi,
            params.store,
            params.cohort,
            spec_json,
            backend,
            reports,
            params.previews,
            params.label_source(c.input),
        )
        futures[fr] = (c, fi)
    previews: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for fr in stages.as_completed(futures):
        c, fi = futures[fr]
        try:
            o: Outcome = stages.result(fr)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a failure that outlived its retries (or was not retried)
            err, stage = e, "render"
            try:
                stages.result(fi)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as ei:  # noqa: BLE001 - the ingest stage is the one that failed
                err, stage = ei, "ingest"
            failed.append(_failure(c, stage, err))
            log.error("series %s failed in %s after retries: %s", c.input, stage, error_text(err))
            o = Outcome("failed")
        else:
            if o.status == "done" and o.entry is not None:
                done.append(o.entry)
                if o.preview:
                    previews[o.entry.volume_id] = o.preview
            elif o.status == "skipped" and o.entry is not None:
                skipped.append(o.entry)
            elif o.status == "rejected" and o.rejection is not None:
                rejected.append(o.rejection)
            for k, v in o.seconds.items():
                seconds[k] = seconds.get(k, 0.0) + v
        progress.advance(o)
    _account_duplicates(duplicates, {c.volume_id: c.input for c in cands}, done, skipped, rejected, failed)
    summary = RunSummary(done=done, skipped=skipped, rejected=rejected, failed=failed, planned=planned)

    verify_msg = None
    verify_ok = True
    if params.verify != "none":
        emit({"event": "stage", "name": f"verify ({params.verify})"})
        rep_v = ds.verify(deep=params.verify == "deep")
        verify_ok = rep_v.clean
        verify_msg = (
            f"{params.verify}: {rep_v.ok}/{rep_v.volumes} rings ok, {len(rep_v.corrupt)} corrupt, "
            f"{len(rep_v.missing)} missing, {len(rep_v.uncataloged)} uncatalogued"
        )
    wall = time.perf_counter() - t_start
    md = rep.summary_markdown(
        summary,
        cohort=params.cohort,
        spec_hash=ds.spec_hash,
        store=params.store,
        previews=previews,
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
            "previews": previews,
            "stage_seconds": seconds,
        }
    )
    if failed or not verify_ok:
        raise BackfillIncomplete(summary, verify_msg)
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
    qc: str = "flag",
    labels: str | None = None,
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
        qc=qc,
        labels=labels,
    )
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    return run_backfill(params, PrefectStages(), run_id=run_id)


def backfill_cohort_on(runner: str = "threads", dask_address: str | None = None, n_workers: int | None = None):
    """The backfill flow with the given task runner: ``threads`` (in-process) or ``dask`` (needs a Prefect API the
    workers reach: ``backfill_dask.NoPrefectApi`` without one; :func:`run_dask` runs on Dask without Prefect)."""
    if runner == "threads":
        return backfill_cohort
    if runner == "dask":
        from xwin.flows.backfill_dask import on_dask, require_api

        require_api()  # without an API every Dask worker would start an ephemeral server of its own
        return on_dask(dask_address, n_workers)
    raise ValueError(f"unknown runner {runner!r}: threads | dask")


def run_local(params: BackfillParams, max_workers: int | None = None) -> RunSummary:
    """The same flow body without a Prefect server: task functions on a thread pool, same retries and slots."""
    with LocalStages(max_workers=max_workers or _max_workers()) as stages:
        return run_backfill(params, stages)


def run_dask(params: BackfillParams, address: str | None = None, n_workers: int | None = None) -> RunSummary:
    """The same flow body on Dask without a Prefect server: task functions with their retry policy run inside the
    workers, which never need a Prefect API (``runtime.DaskStages``). A LocalCluster started here (no ``address``
    / XWIN_DASK_ADDRESS) is shut down before this returns or raises."""
    with DaskStages(address, n_workers) as stages:
        return run_backfill(params, stages)
