"""Backfill a cohort: plan -> ingest -> render -> commit, for every series; reruns resume.

Thin wiring only: the work is ``pipeline.ingest`` (plan_inputs / plan_manifest / load_candidate),
``pipeline.render.render_ring`` and ``storage`` (write_volume, dataset().write_ring, verify).

Stages are Prefect tasks (``plan_series``, ``ingest_series``, ``render_series``) with retries and exponential
backoff for transient failures (I/O, S3, connection, timeouts). Bad input is never retried: ``IngestError``
becomes a ``Rejection`` with its reason code, a render that raises on a valid volume becomes ``render_failed``.
Idempotence: a series whose ring is committed in ``datasets/<cohort>/<spec_hash>`` is skipped before any task is
submitted, so a crashed or cancelled run is resumed by running it again; storage commits are atomic, so a killed
run leaves no partial volume visible. A series whose transient failure outlived its retries ends the run
``Failed`` (:class:`BackfillIncomplete`) after the summary is written; the rerun picks it up.

One flow body, two drivers (see ``flows.runtime``): :func:`backfill_cohort` (the Prefect flow, any task runner)
and :func:`run_local` (no Prefect server: the same tasks' functions on a thread pool).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from xwin.flows import reports as rep
from xwin.flows.runtime import (
    LocalStages,
    PrefectStages,
    Stages,
    backoff_delays,
    cpu_slot,
    ensure_limits_once,
    is_transient,
    render_slot,
    retry_transient,
    slot,
)
from xwin.schemas.ingest import Rejection, RejectReason, RunEntry, RunSummary
from xwin.schemas.render import RenderSpec

log = logging.getLogger("xwin.flows.backfill")

TASK_RETRIES = int(os.environ.get("XWIN_TASK_RETRIES", "3"))
VerifyMode = Literal["none", "shallow", "deep"]


# ---- parameters and outcomes ---------------------------------------------------------------------------------
class BackfillParams(BaseModel):
    """Everything one backfill run needs (all JSON-able: these are the deployment parameters too)."""

    model_config = ConfigDict(extra="forbid")

    cohort: str
    store: str
    source: list[str] | None = None  # NIfTI files, DICOM folders, metadata.csv, or "example"
    manifest: str | None = None  # NBIA metadata.csv
    manifest_root: str | None = None
    spec: RenderSpec = RenderSpec()
    backend: str | None = None  # None: XWIN_RENDER_BACKEND or "auto" (resolved on the worker)
    limit: int | None = None  # at most this many planned series (after sharding), in plan order
    shard: str | None = None  # "i/n": only sources (manifest: series) whose id hashes to i mod n
    verify: VerifyMode = "shallow"
    previews: int = 4  # views per preview montage (0: none)
    reports: str | None = None  # default: "<store>-reports"

    def sources(self) -> list[str]:
        if self.source:
            return list(self.source)
        if self.manifest:
            return []
        if self.cohort == "example":
            return ["example"]
        raise ValueError("give source paths or a manifest (only cohort 'example' has a default source)")

    def reports_url(self) -> str:
        return self.reports or rep.reports_url(self.store)

    def backend_name(self) -> str:
        return self.backend or os.environ.get("XWIN_RENDER_BACKEND") or "auto"


@dataclass
class Ingested:
    """Result of the ingest stage: the canonical volume is committed in the store."""

    input: str
    volume_id: str
    series_uid: str | None
    written: bool
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Outcome:
    """Result of one series: exactly one of done / skipped / rejected."""

    status: Literal["done", "skipped", "rejected"]
    entry: RunEntry | None = None
    rejection: Rejection | None = None
    preview: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


class BackfillIncomplete(RuntimeError):
    """Some series failed transiently after all retries (or the store failed verification). Rerun to resume."""

    def __init__(self, summary: RunSummary, failed: list[tuple[str, str]], verify: str | None) -> None:
        self.summary, self.failed, self.verify = summary, failed, verify
        msg = f"{len(failed)} series failed after retries" if failed else f"store verification failed: {verify}"
        super().__init__(msg + " (a rerun resumes; see the run summary)")


# ---- per-process handles -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _store(url: str):
    from xwin.storage import open_store

    return open_store(url)


@functools.lru_cache(maxsize=32)
def _dataset(url: str, cohort: str, spec_json: str):
    return _store(url).dataset(cohort, RenderSpec.model_validate_json(spec_json))


def _owner() -> str:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    tag = str(ctx.task_run.id) if ctx is not None else uuid.uuid4().hex[:12]
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def _in_shard(key: str, shard: str | None) -> bool:
    """Does ``key`` (a source string or a volume id) belong to shard "i/n"? Stable across runs and machines."""
    if not shard:
        return True
    i, n = (int(x) for x in shard.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % n == i


# ---- stage tasks ---------------------------------------------------------------------------------------------
_TASK_OPTS: dict[str, Any] = dict(
    retries=TASK_RETRIES,
    retry_delay_seconds=backoff_delays(TASK_RETRIES),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)


@task(name="plan-series", **_TASK_OPTS)
def plan_series(params: BackfillParams) -> tuple[list[Any], list[Rejection]]:
    """Sources/manifest -> (candidates in this shard, rejections). Cheap: headers and checksums only."""
    from xwin.pipeline.ingest import plan_inputs, plan_manifest

    cands, rejs = [], []
    if params.manifest:  # manifest studies are sharded after planning, by volume id
        c, r = plan_manifest(params.manifest, params.cohort, root=params.manifest_root)
        if params.shard:
            c = [x for x in c if _in_shard(x.volume_id, params.shard)]
            r = r if params.shard.startswith("0/") else []  # manifest-level rejections: reported by shard 0
        cands += c
        rejs += r
    srcs = params.sources()
    if params.shard:  # sources are sharded before planning: each shard reads only its own headers/files
        srcs = [x for x in srcs if _in_shard(x, params.shard)]
    if srcs:
        c, r = plan_inputs(srcs, params.cohort)
        cands += c
        rejs += r
    seen: set[str] = set()
    uniq = []
    for c in cands:  # the same series given twice is one series
        if c.volume_id not in seen:
            seen.add(c.volume_id)
            uniq.append(c)
    if params.limit is not None:
        uniq = uniq[: params.limit]
    return uniq, rejs


@task(name="ingest-series", **_TASK_OPTS)
def ingest_series(candidate: Any, store_url: str) -> Ingested | Rejection:
    """Load, validate and commit one canonical volume (skipped when the store has it). Bad input -> Rejection."""
    from xwin.pipeline.ingest import IngestError, load_candidate

    store = _store(store_url)
    if store.has_volume(candidate.volume_id):
        return Ingested(candidate.input, candidate.volume_id, candidate.series_uid, written=False)
    t0 = time.perf_counter()
    name, n = cpu_slot()
    try:
        with slot(name, n):
            record, hu = load_candidate(candidate)
    except IngestError as e:
        return Rejection(
            input=candidate.input, reason=e.reason, detail=e.detail, series_uid=e.series_uid or candidate.series_uid
        )
    except Exception as e:  # an unexpected reader error on this input: rejected unless transient
        if is_transient(e):
            raise
        return Rejection(
            input=candidate.input,
            reason=RejectReason.unreadable_file,
            series_uid=candidate.series_uid,
            detail=f"{candidate.input}: unexpected {type(e).__name__} while loading: {e}",
        )
    t1 = time.perf_counter()
    written = store.write_volume(record, hu, owner=_owner())
    t2 = time.perf_counter()
    return Ingested(
        candidate.input, record.volume_id, record.series_uid, written, {"ingest_load": t1 - t0, "ingest_write": t2 - t1}
    )


@task(name="render-series", **_TASK_OPTS)
def render_series(
    ingested: Ingested | Rejection,
    store_url: str,
    cohort: str,
    spec_json: str,
    backend: str,
    previews_url: str | None,
    n_preview: int = 4,
) -> Outcome:
    """Render the ring of one committed volume and commit it (single writer via the storage claim)."""
    if isinstance(ingested, Rejection):
        return Outcome("rejected", rejection=ingested)
    from xwin.pipeline.render import backend_versions, render_ring, resolve_backend
    from xwin.storage import ClaimHeld

    vid = ingested.volume_id
    entry = RunEntry(input=ingested.input, volume_id=vid, series_uid=ingested.series_uid, stage="render")
    ds = _dataset(store_url, cohort, spec_json)
    if ds.has_ring(vid):
        return Outcome("skipped", entry=entry)
    owner = _owner()
    secs = dict(ingested.seconds)
    try:
        with ds.claim(vid, owner):
            if ds.has_ring(vid):
                return Outcome("skipped", entry=entry)
            t0 = time.perf_counter()
            record, hu = _store(store_url).read_volume(vid)
            t1 = time.perf_counter()
            name = resolve_backend(backend)
            sname, n = render_slot(name)
            try:
                with slot(sname, n):
                    t2 = time.perf_counter()
                    views, geom = render_ring(hu, np.asarray(record.affine), ds.spec, name)
                    t3 = time.perf_counter()
            except Exception as e:  # classified: transient errors retry, the rest reject the series
                if is_transient(e):
                    raise
                return Outcome(
                    "rejected",
                    rejection=Rejection(
                        input=ingested.input,
                        reason=RejectReason.render_failed,
                        series_uid=ingested.series_uid,
                        detail=f"{vid}: render backend {name!r} raised {type(e).__name__}: {e}",
                    ),
                )
            del hu
            prov = {
                "source": ingested.input,
                "canonical_volume_id": vid,
                "series_uid": ingested.series_uid,
                "backend": name,
                "backend_versions": backend_versions(name),
                "spec_hash": ds.spec_hash,
                "rendered_at": datetime.now(UTC).isoformat(),
                "writer": owner,
            }
            ds.write_ring(vid, views, geom, prov, owner=owner)
            t4 = time.perf_counter()
    except ClaimHeld as e:  # another live worker is writing this ring right now
        log.info("skipping %s: %s", vid, e)
        return Outcome("skipped", entry=entry.model_copy(update={"stage": "claimed-elsewhere"}))
    secs.update({"render_read": t1 - t0, "render_wait": t2 - t1, "render": t3 - t2, "render_write": t4 - t3})
    preview = None
    if previews_url and n_preview > 0:
        try:
            yaws = [float(y) for y in geom.yaw_deg]
            want = np.linspace(0.0, 360.0, n_preview, endpoint=False)
            im = rep.montage(views, yaws, rep.pick_views(yaws, want), size=256)
            preview = rep.write_bytes(rep.preview_url(previews_url, cohort, ds.spec_hash, vid), rep.png_bytes(im))
        except Exception as e:  # noqa: BLE001 - a preview is a convenience, never a reason to fail a series
            log.warning("preview of %s not written: %s", vid, e)
    return Outcome("done", entry=entry, preview=preview, seconds=secs)


# ---- progress ------------------------------------------------------------------------------------------------
ProgressListener = Callable[[dict], None]
_listeners: list[ProgressListener] = []


def add_listener(fn: ProgressListener) -> Callable[[], None]:
    """Receive progress events of flows run in this process ({"event": "start"|"series"|"stage", ...})."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn)


def _emit(ev: dict) -> None:
    for fn in list(_listeners):
        try:
            fn(ev)
        except Exception:  # a broken progress bar must not break a run
            log.debug("progress listener failed", exc_info=True)


def _artifact_key(*parts: str) -> str:
    s = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in s)[:100]


class _Progress:
    """A Prefect progress artifact (when in a flow run) + the in-process listeners, throttled to ~2 updates/s."""

    def __init__(self, cohort: str, total: int, skipped: int, prefect: bool) -> None:
        self.total, self.n, self.prefect, self._last = total, 0, prefect, 0.0
        self.artifact = None
        if prefect:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(
                progress=0.0,
                key=_artifact_key("backfill-progress", cohort),
                description=f"backfill {cohort}: {total} series to process, {skipped} already done",
            )
        _emit({"event": "start", "total": total, "skipped": skipped, "cohort": cohort})

    def advance(self, o: Outcome) -> None:
        self.n += 1
        vid = o.entry.volume_id if o.entry else None
        _emit(
            {
                "event": "series",
                "status": o.status,
                "volume_id": vid,
                "input": o.entry.input if o.entry else (o.rejection.input if o.rejection else None),
            }
        )
        now = time.monotonic()
        if self.artifact is not None and (now - self._last > 0.5 or self.n == self.total):
            from prefect.artifacts import update_progress_artifact

            self._last = now
            update_progress_artifact(artifact_id=self.artifact, progress=100.0 * self.n / max(1, self.total))


# ---- the flow body ------------------------------------------------------------------------------------------
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
    ds = _dataset(params.store, params.cohort, spec_json)  # creates the dataset / refuses another spec
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
    progress = _Progress(params.cohort, len(todo), len(summary.skipped), prefect_mode)

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
            if o.status == "done":
                summary.done.append(o.entry)
                if o.preview:
                    previews[o.entry.volume_id] = o.preview
            elif o.status == "skipped":
                summary.skipped.append(o.entry)
            else:
                summary.rejected.append(o.rejection)
            for k, v in o.seconds.items():
                seconds[k] = seconds.get(k, 0.0) + v
        progress.advance(o)

    verify_msg = None
    verify_ok = True
    if params.verify != "none":
        _emit({"event": "stage", "name": f"verify ({params.verify})"})
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
    try:
        json_url, md_url = rep.write_run_report(reports, run_id, summary, md, extra)
    except Exception as e:  # noqa: BLE001 - reports are best effort
        log.warning("run report not written: %s", e)
        json_url = md_url = None
    if prefect_mode:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        key = _artifact_key("backfill", params.cohort)
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
    _emit(
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


# ---- drivers -------------------------------------------------------------------------------------------------
def _max_workers() -> int:
    return int(os.environ.get("XWIN_STAGE_THREADS") or 4)


@flow(name="backfill-cohort", task_runner=ThreadPoolTaskRunner(max_workers=_max_workers()), persist_result=False)
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


def dask_task_runner(address: str | None = None, n_workers: int | None = None):
    """A DaskTaskRunner on an existing scheduler (``address`` / XWIN_DASK_ADDRESS) or a LocalCluster."""
    from prefect_dask import DaskTaskRunner

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


def backfill_cohort_on(runner: str = "threads", dask_address: str | None = None, n_workers: int | None = None):
    """The backfill flow with the given task runner: ``threads`` (in-process) or ``dask``."""
    if runner == "threads":
        return backfill_cohort
    if runner == "dask":
        return backfill_cohort.with_options(
            name="backfill-cohort-dask", task_runner=dask_task_runner(dask_address, n_workers)
        )
    raise ValueError(f"unknown runner {runner!r}: threads | dask")


def run_local(params: BackfillParams, max_workers: int | None = None) -> RunSummary:
    """The same flow body without a Prefect server: task functions on a thread pool, same retries and slots."""
    with LocalStages(max_workers=max_workers or _max_workers()) as stages:
        return run_backfill(params, stages)


def summary_json(summary: RunSummary) -> str:
    return json.dumps(json.loads(summary.model_dump_json()), indent=1)
