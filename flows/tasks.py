"""The backfill's stage tasks: plan the series of a run, ingest one series, render and commit its ring.

Each is a Prefect task with retries and exponential backoff for transient failures (I/O, S3, connection,
timeouts, a full disk, out of memory; ``xwin.storage.is_transient``). Bad input is never retried: ``IngestError``
becomes a ``Rejection`` with its reason code, a render that raises on a valid volume becomes ``render_failed``.
An error that is no verdict on the input -- a transient one, or the file system failing to read it
(``xwin.pipeline.ingest.errors.is_read_failure``) -- is never a rejection: the task raises it (retried while
transient), and the run reports the series under ``failed`` when it outlives the retries. Another live writer
holding a volume's or ring's claim (a concurrent run of the same cohort) makes the series ``skipped``.
The same functions run without a Prefect server under ``runtime.LocalStages`` / ``runtime.DaskStages``
(``task.fn``, same retry policy).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from xwin.flows import progress, stop
from xwin.flows import reports as rep
from xwin.flows.params import BackfillParams
from xwin.flows.runlogs import install as install_run_logs
from xwin.flows.runtime import backoff_delays, cpu_slot, render_slot, retry_transient, slot
from xwin.schemas.ingest import Failure, Rejection, RejectReason, RunEntry
from xwin.schemas.render import RenderSpec
from xwin.storage import ProjectionDataset, Store, is_transient, open_store

log = logging.getLogger(__name__)
install_run_logs()  # xwin's loggers reach the Prefect run they are logged in (every process that runs these tasks)

TASK_RETRIES = int(os.environ.get("XWIN_TASK_RETRIES", "3"))
# the options of every stage task (validate.py's too): retried only when transient, never cached
TASK_OPTS: dict[str, Any] = {
    "retries": TASK_RETRIES,
    "retry_delay_seconds": backoff_delays(TASK_RETRIES),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@dataclass
class Ingested:
    """Result of the ingest stage: the canonical volume is committed in the store."""

    input: str
    volume_id: str
    series_uid: str | None
    written: bool
    seconds: dict[str, float] = field(default_factory=dict)
    held_by: str | None = None  # another live writer held the volume's claim: not written by this run


@dataclass
class Outcome:
    """Result of one series: exactly one of done / skipped / rejected ("failed", "cancelled": the driver's marks
    for progress events of a series whose task raised or was stopped; the summary carries the details)."""

    status: Literal["done", "skipped", "rejected", "failed", "cancelled"]
    entry: RunEntry | None = None
    rejection: Rejection | None = None
    preview: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


# ---- per-process handles -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def store_handle(url: str) -> Store:
    """The store at ``url``, opened once per process."""
    return open_store(url)


@functools.lru_cache(maxsize=32)
def dataset_handle(url: str, cohort: str, spec_json: str) -> ProjectionDataset:
    """The dataset (cohort, spec) of the store at ``url``, opened once per process."""
    return store_handle(url).dataset(cohort, RenderSpec.model_validate_json(spec_json))


def task_owner() -> str:
    """The claim owner of this task run: host, pid and the Prefect task run id (or a random tag)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    tag = str(ctx.task_run.id) if ctx is not None else uuid.uuid4().hex[:12]
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def in_shard(key: str, shard: str | None) -> bool:
    """Does ``key`` (a source string or a volume id) belong to shard "i/n"? Stable across runs and machines."""
    if not shard:
        return True
    i, n = (int(x) for x in shard.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % n == i


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def no_verdict(e: BaseException) -> BaseException | None:
    """The error in ``e``'s chain that says nothing about the input -- transient (``is_transient``) or a read
    failure of the file system (``is_read_failure``) -- or None (``xwin.pipeline.ingest.errors.no_verdict``)."""
    from xwin.pipeline.ingest.errors import no_verdict as _no_verdict

    return _no_verdict(e, is_transient)


def plan_one(label: str, plan: Any, sleep: Any = time.sleep) -> tuple[list[Any], list[Rejection], list[Failure]]:
    """``plan() -> (candidates, rejections)`` for one source; an error of the file system while reading it is
    retried with backoff while transient, then reported as a ``Failure`` of that source (stage "plan")."""
    delays = backoff_delays(TASK_RETRIES)
    for attempt in range(len(delays) + 1):
        try:
            c, r = plan()
            return c, r, []
        except Exception as e:  # filtered: only errors that are no verdict on the input are handled here
            err = no_verdict(e)
            if err is None:
                raise
            retryable = is_transient(err)
            if retryable and attempt < len(delays):
                d = delays[attempt]
                log.warning("planning %s: %s; retry %d/%d in %.1fs", label, e, attempt + 1, len(delays), d)
                sleep(d)
                continue
            return [], [], [Failure(input=label, stage="plan", error=error_text(err), retryable=retryable)]
    raise AssertionError("unreachable")


@task(name="plan-series", **TASK_OPTS)
def plan_series(params: BackfillParams) -> tuple[list[Any], list[Rejection], list[Failure], list[RunEntry]]:
    """Sources/manifest -> (candidates in this shard, rejections, failures, duplicates: inputs that are a second
    copy of a planned series, as skipped entries with their reason). Cheap: headers and checksums only.

    Each source is planned by itself, so a source the file system fails to read (after retries) is one
    ``Failure`` and the other sources plan as usual."""
    from xwin.pipeline.ingest import plan_inputs, plan_manifest

    cands: list[Any] = []
    rejs: list[Rejection] = []
    fails: list[Failure] = []
    if params.manifest:  # manifest studies are sharded after planning, by volume id
        manifest = params.manifest
        cfg = params.ingest_config()
        c, r, f = plan_one(
            manifest, lambda: plan_manifest(manifest, params.cohort, root=params.manifest_root, config=cfg)
        )
        if params.shard:
            c = [x for x in c if in_shard(x.volume_id, params.shard)]
            if not params.shard.startswith("0/"):  # manifest-level rejections and failures: reported by shard 0
                r, f = [], []
        cands += c
        rejs += r
        fails += f
    srcs = params.sources()
    if params.shard:  # sources are sharded before planning: each shard reads only its own headers/files
        srcs = [x for x in srcs if in_shard(x, params.shard)]
    for src in srcs:
        more, more_rejs, more_fails = plan_one(
            src, lambda src=src: plan_inputs([src], params.cohort, config=params.ingest_config())
        )
        cands += more
        rejs += more_rejs
        fails += more_fails
    first: dict[str, Any] = {}
    uniq, twice = [], []
    for cand in cands:  # the same series given twice is one series; the second copy is reported as a duplicate
        if cand.volume_id in first:
            twice.append(cand)
        else:
            first[cand.volume_id] = cand
            uniq.append(cand)
    if params.limit is not None:
        uniq = uniq[: params.limit]
    kept = {c.volume_id for c in uniq}
    dups = [
        RunEntry(
            input=c.input,
            volume_id=c.volume_id,
            series_uid=c.series_uid,
            stage="plan",
            reason=f"duplicate of {first[c.volume_id].input}: the same series given twice",
        )
        for c in twice
        if c.volume_id in kept
    ]
    return uniq, rejs, fails, dups


@task(name="ingest-series", **TASK_OPTS)
def ingest_series(candidate: Any, store_url: str) -> Ingested | Rejection:
    """Load, validate and commit one canonical volume (skipped when the store has it). Bad input -> Rejection;
    an error that is no verdict on the input (transient, or the file system failing to read it) is raised."""
    from xwin.pipeline.ingest import IngestError, load_candidate
    from xwin.storage import ClaimHeld

    stop.check("ingest", started=False)  # a stopped run starts no new series
    store = store_handle(store_url)
    if store.volume_settled(candidate.volume_id):  # committed; a missing catalog row is re-added (I3)
        return Ingested(candidate.input, candidate.volume_id, candidate.series_uid, written=False)
    t0 = time.perf_counter()
    name, n = cpu_slot()
    io_error: BaseException | None = None
    try:
        with slot(name, n):
            stop.check("ingest", started=False)  # stopped while waiting for the slot
            record, hu = load_candidate(candidate)
    except IngestError as e:
        io_error = no_verdict(e)
        if io_error is None:
            return Rejection(
                input=candidate.input,
                reason=e.reason,
                detail=e.detail,
                series_uid=e.series_uid or candidate.series_uid,
            )
    except stop.Cancelled:  # stopped while waiting for the slot: a stop, never a verdict on the input
        raise
    except Exception as e:  # an unexpected reader error on this input: rejected unless it is no verdict on it
        if no_verdict(e) is not None:
            raise
        return Rejection(
            input=candidate.input,
            reason=RejectReason.unreadable_file,
            series_uid=candidate.series_uid,
            detail=f"{candidate.input}: unexpected {type(e).__name__} while loading: {e}",
        )
    if io_error is not None:  # e.g. EIO reading a slice: retried, then failed -- never rejected unreadable_file
        raise io_error  # raised outside the handler, so its context is not the IngestError that wraps it
    t1 = time.perf_counter()
    stop.check("ingest")  # loaded but not written: stop here (the commit below, once begun, finishes)
    try:
        written = store.write_volume(record, hu, owner=task_owner())
    except ClaimHeld as e:  # another live writer (a concurrent run of this cohort) is committing this volume
        log.info("skipping %s: %s", record.volume_id, e)
        return Ingested(candidate.input, record.volume_id, record.series_uid, False, held_by=e.holder.owner)
    t2 = time.perf_counter()
    progress.step(record.volume_id, "ingest", t2 - t0, written=written)
    return Ingested(
        candidate.input, record.volume_id, record.series_uid, written, {"ingest_load": t1 - t0, "ingest_write": t2 - t1}
    )


def project_labels(source: str, record: Any, geom: Any, backend: str, notes: list[str]) -> dict[str, Any]:
    """The write_ring keywords of a labelmap projected into ``geom`` (docs/render.md, "Labels"); {} with a note when
    the labelmap cannot be used (the ring is committed without labels)."""
    from xwin.pipeline.example import example_mask_path
    from xwin.pipeline.labels import LabelError, LabelSpec, align_labels, read_labelmap, render_labels

    try:
        lab, laff, names = read_labelmap(example_mask_path() if source == "example" else source)
        aligned, how = align_labels(lab, laff, tuple(record.shape), np.asarray(record.affine))
    except Exception as e:  # classified: a labelmap that cannot be used never fails the ring (transient ones retry)
        if is_transient(e):
            raise
        why = str(e) if isinstance(e, LabelError) else f"unreadable: {type(e).__name__}: {e}"
        notes.append(f"labels {source} refused: {why}")
        log.warning("labels of %s refused: %s", record.volume_id, why)
        return {}
    spec = LabelSpec()
    maps = render_labels(aligned, names, np.asarray(record.affine), geom, spec, backend=backend)
    notes.append(f"labels from {source} ({how}; label spec {spec.label_hash})")
    return {"labels": maps, "label_channels": spec.channels, "label_spec": spec.model_dump()}


def _stoppable(on_views: Any) -> Any:
    """The render's progress callback, which is also its stop point: a requested stop raises ``stop.Cancelled``
    out of the render at its next chunk of views."""

    def on_progress(done: int, total: int) -> None:
        on_views(done, total)
        if done < total:  # the last chunk is rendered: commit it rather than throw it away
            stop.check("render")

    return on_progress


@task(name="render-series", **TASK_OPTS)
def render_series(
    ingested: Ingested | Rejection,
    store_url: str,
    cohort: str,
    spec_json: str,
    backend: str,
    previews_url: str | None,
    n_preview: int = 4,
    labels: str | None = None,
) -> Outcome:
    """Render the ring of one committed volume and commit it (single writer via the storage claim). ``labels``: a
    labelmap file or folder (or "example") projected into the same views and committed with the ring; a labelmap
    that does not fit the volume is noted in the ring's provenance and the ring is committed without labels."""
    if isinstance(ingested, Rejection):
        return Outcome("rejected", rejection=ingested)
    stop.check("render", started=False)
    from xwin.flows.render import material_bases, ring_provenance
    from xwin.pipeline.render import render_ring, resolve_backend
    from xwin.storage import ClaimHeld

    vid = ingested.volume_id
    entry = RunEntry(input=ingested.input, volume_id=vid, series_uid=ingested.series_uid, stage="render")
    if ingested.held_by is not None:  # the concurrent run that commits the volume renders its ring too
        return Outcome("skipped", entry=entry.model_copy(update={"stage": "claimed-elsewhere"}))
    ds = dataset_handle(store_url, cohort, spec_json)
    if ds.settled(vid):  # skipped only when committed and catalogued (a missing catalog row is re-added here)
        return Outcome("skipped", entry=entry)
    owner = task_owner()
    secs = dict(ingested.seconds)
    try:
        with ds.claim(vid, owner):
            if ds.settled(vid):
                return Outcome("skipped", entry=entry)
            t0 = time.perf_counter()
            record, hu = store_handle(store_url).read_volume(vid)
            entry.qc_flags = [q.name for q in record.qc if q.flagged]  # said in the run's summary, not only the card
            t1 = time.perf_counter()
            name = resolve_backend(backend)
            sname, n = render_slot(name)
            notes: list[str] = []
            try:
                with slot(sname, n):
                    stop.check("render", started=False)  # stopped while waiting for the slot: the claim is released
                    t2 = time.perf_counter()
                    # a CUDA out-of-memory error retries with smaller chunks, then on the CPU (render_views)
                    on_views = _stoppable(progress.views_callback(vid))
                    views, geom = render_ring(
                        hu, np.asarray(record.affine), ds.spec, name, notes=notes, on_progress=on_views
                    )
                    # the material bases (spec.materials): the same rays and backend, in the same commit
                    mat_kw = material_bases(hu, record.affine, ds.spec, geom, name, notes=notes)
                    t3 = time.perf_counter()
                    progress.step(vid, "render", t3 - t2, views=len(geom))
            except Exception as e:  # classified: transient errors (incl. out of memory) retry, the rest reject
                if is_transient(e) or isinstance(e, stop.Cancelled):  # a stop leaves the claim's block: released
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
            label_kw = project_labels(labels, record, geom, name, notes) if labels else {}
            prov = ring_provenance(  # the same fields as `xwin render` writes (xwin.flows.render)
                volume_id=vid,
                source=ingested.input,
                spec=ds.spec,
                backend=name,
                render_seconds=t3 - t2,
                writer=owner,
                series_uid=ingested.series_uid,
                notes=notes,
            )
            ds.write_ring(vid, views, geom.view_meta(), prov, owner=owner, **label_kw, **mat_kw)
            t4 = time.perf_counter()
            progress.step(vid, "commit", t4 - t3)
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
