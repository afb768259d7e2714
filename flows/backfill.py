"""Backfill a cohort: plan -> ingest -> render -> commit, for every series; reruns resume.

Thin wiring only: the stages are the tasks of :mod:`xwin.flows.tasks` (plan, ingest, render + commit), whose work is
``xwin.pipeline.ingest``, ``xwin.pipeline.render.render_ring`` and ``storage``.

Idempotence: a series whose ring is committed in ``datasets/<cohort>/<spec_hash>`` is skipped before any task is
submitted, so a crashed or cancelled run is resumed by running it again; storage commits are atomic, so a killed
run leaves no partial volume visible. A series whose failure outlived its retries is in the summary's ``failed``
list and ends the run ``Failed`` (:class:`BackfillIncomplete`, carrying the summary) after the summary is written;
the rerun picks it up.

Stopping (``xwin.flows.stop``: Ctrl-C, SIGTERM, a cancelled flow run): no series starts after the request, a
render in progress stops at its next chunk of views and releases its claim, a commit already deciding finishes;
every planned series not finished is in the summary's ``cancelled`` list, the summary is written as usual (report,
artifact, ``end`` event) and the run ends with :class:`BackfillCancelled` (the Prefect flow: state ``Cancelled``).

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
from xwin.flows import stop
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
from xwin.schemas.ingest import CancelledEntry, Failure, Rejection, RunEntry, RunSummary
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


class BackfillCancelled(BackfillIncomplete):
    """The run was asked to stop (``xwin.flows.stop``): ``summary.cancelled`` lists what it did not finish; what it
    finished is committed. Running it again continues."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary, self.verify = summary, None
        RuntimeError.__init__(self, summary.cancel_line())


def is_cancel(e: BaseException) -> bool:
    """Did a stage end because the run was stopped: it raised ``stop.Cancelled``, or its future was cancelled
    before it started (threads, Dask and Prefect futures all raise a ``CancelledError``)?"""
    import asyncio
    import concurrent.futures

    return isinstance(e, (stop.Cancelled, concurrent.futures.CancelledError, asyncio.CancelledError))


def _cancelled(c: Any, stage: str, err: BaseException) -> CancelledEntry:
    started = isinstance(err, stop.Cancelled) and err.started
    return CancelledEntry(input=c.input, stage=stage, started=started, volume_id=c.volume_id, series_uid=c.series_uid)


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
    cancelled: list[CancelledEntry],
) -> None:
    """A second copy of a planned series (``first_input``: volume id -> the input planned first) shares the fate of
    the first: skipped, with its reason, when the series is committed; cancelled when a stop cancelled the first;
    else rejected or failed as the first was."""
    ok = {e.volume_id for e in done + skipped}
    stopped = {x.volume_id: x for x in cancelled if x.volume_id}
    for d in duplicates:
        if d.volume_id in ok:
            skipped.append(d)
            continue
        if d.volume_id in stopped:
            x = stopped[d.volume_id]
            cancelled.append(CancelledEntry(input=d.input, stage=x.stage, started=False, volume_id=d.volume_id))
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

    The summary accounts for every planned series: done, skipped, rejected (bad input), failed (an error that
    outlived its retries, with whether it can pass: ``Failure.retryable``) or cancelled (the run was stopped);
    ``planned`` is their number."""
    t_start = time.perf_counter()
    prefect_mode = stages.mode == "prefect"
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    spec_json = params.spec.model_dump_json()
    backend = params.backend_name()
    reports = params.reports_url()

    if prefect_mode:  # create this host's limits before tasks race to do it (strict=True needs them)
        from xwin.pipeline.render import resolve_backend

        ensure_limits_once(cpu_slot(), render_slot(resolve_backend(backend)))
    try:
        cands, rejections, plan_failures, duplicates = stages.result(stages.submit(plan_series, params))
    except stop.Cancelled as e:  # stopped before planning: nothing was planned, nothing started
        raise BackfillCancelled(RunSummary()) from e
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
    progress = Progress(params.cohort, len(todo), len(skipped), prefect_mode, len(rejected), len(failed))

    cancelled: list[CancelledEntry] = []
    futures: dict[Any, Any] = {}
    for c in todo:
        if stop.requested():  # stopped while submitting: the rest never starts
            cancelled.append(_cancelled(c, "ingest", stop.Cancelled(started=False)))
            continue
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
    pending = [f for fr, (_, fi) in futures.items() for f in (fi, fr)]
    unhook = stop.on_stop(lambda: stages.cancel_pending(pending))  # runs at once if the stop came already
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
                stages.result(fi)  # waits for an ingest still committing
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as ei:  # noqa: BLE001 - the ingest stage is the one that failed
                err, stage = ei, "ingest"
            if is_cancel(err):
                cancelled.append(_cancelled(c, stage, err))
                o = Outcome("cancelled")
            else:
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
        progress.advance(o, c)
    unhook()
    _account_duplicates(duplicates, {c.volume_id: c.input for c in cands}, done, skipped, rejected, failed, cancelled)
    summary = RunSummary(
        done=done, skipped=skipped, rejected=rejected, failed=failed, cancelled=cancelled, planned=planned
    )

    verify_msg = None
    verify_ok = True
    if cancelled or stop.requested():
        verify_msg = "not run (the run was stopped)"
    elif params.verify != "none":
        emit({"event": "stage", "name": f"verify ({params.verify})"})
        rep_v = ds.verify(deep=params.verify == "deep")
        verify_ok = rep_v.clean
        verify_msg = (
            f"{params.verify}: {rep_v.ok}/{rep_v.volumes} rings ok, {len(rep_v.corrupt)} corrupt, "
            f"{len(rep_v.missing)} missing, {len(rep_v.uncataloged)} uncatalogued"
        )
    sheet, shown = None, rep.pick_evenly(previews, rep.SHEET_SERIES)
    if previews:  # one image of a few series' previews, whatever the cohort's size (rep.SHEET_*)
        try:
            sheet, got = rep.sheet_of(previews)
            shown = got or shown
        except Exception as e:  # noqa: BLE001 - previews are a convenience
            log.warning("preview sheet not made: %s", e)
    wall = time.perf_counter() - t_start
    md = rep.summary_markdown(
        summary,
        cohort=params.cohort,
        spec_hash=ds.spec_hash,
        store=params.store,
        previews=previews,
        verify=verify_msg,
        wall_s=wall,
        sheet=sheet,
        shown=shown,
    )
    extra = {
        "run_id": run_id,
        "finished_at": datetime.now(UTC).isoformat(),
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
        if cancelled:
            rows.append({"outcome": "cancelled (rerun continues)", "series": len(cancelled)})
        create_table_artifact(table=rows, key=key + "-counts", description="done / skipped / rejected by reason")
    emit(
        {
            "event": "end",
            "cohort": params.cohort,
            "run_id": run_id,
            "summary": summary,
            "report": md_url,
            "json": json_url,
            "wall_s": wall,
            "verify": verify_msg,
            "previews": previews,
            "stage_seconds": seconds,
        }
    )
    if cancelled:
        raise BackfillCancelled(summary)
    if failed or not verify_ok:
        raise BackfillIncomplete(summary, verify_msg)
    return summary


def _max_workers() -> int:
    return int(os.environ.get("XWIN_STAGE_THREADS") or 4)


def _run_name() -> str:
    """A backfill flow run's name: ``backfill-<cohort>`` (``-shard-i-of-n`` for a shard)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    shard = p.get("shard")
    return f"backfill-{p.get('cohort')}" + (f"-shard-{str(shard).replace('/', '-of-')}" if shard else "")


@flow(
    name="backfill-cohort",
    flow_run_name=_run_name,
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
    return run_in_flow(lambda: run_backfill(params, PrefectStages(), run_id=run_id), run_id)


def run_in_flow(body: Any, flow_run_id: str | None) -> Any:
    """``body()`` inside a Prefect flow run, stoppable like every other run (``xwin.flows.stop``): a SIGTERM or
    SIGINT (a worker shutting down, ``docker stop``) or the flow run cancelled from the UI or the API stops it
    the same way; it then ends ``Cancelled`` (its summary artifact written), never ``Running`` or ``Crashed``."""
    from prefect.states import Cancelled

    undo = stop.install_in_flow()
    unwatch = stop.watch_prefect_cancel(flow_run_id) if flow_run_id else (lambda: None)
    try:
        return body()
    except BackfillCancelled as e:  # the state's data is the exception: calling the flow raises it
        return Cancelled(message=str(e), data=e)
    finally:
        unwatch()
        undo()


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
