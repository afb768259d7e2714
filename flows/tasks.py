"""The backfill's stage tasks: plan the series of a run, ingest one series, render and commit its ring.

Each is a Prefect task with retries and exponential backoff for transient failures (I/O, S3, connection,
timeouts; ``xwin.storage.is_transient``). Bad input is never retried: ``IngestError`` becomes a ``Rejection`` with
its reason code, a render that raises on a valid volume becomes ``render_failed``. The same functions run without a
Prefect server under ``runtime.LocalStages`` (``task.fn``, same retry policy).
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
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from xwin.flows import reports as rep
from xwin.flows.params import BackfillParams
from xwin.flows.runtime import backoff_delays, cpu_slot, render_slot, retry_transient, slot
from xwin.schemas.ingest import Rejection, RejectReason, RunEntry
from xwin.schemas.render import RenderSpec
from xwin.storage import ProjectionDataset, Store, is_transient, open_store

log = logging.getLogger(__name__)

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


@dataclass
class Outcome:
    """Result of one series: exactly one of done / skipped / rejected."""

    status: Literal["done", "skipped", "rejected"]
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


@task(name="plan-series", **TASK_OPTS)
def plan_series(params: BackfillParams) -> tuple[list[Any], list[Rejection]]:
    """Sources/manifest -> (candidates in this shard, rejections). Cheap: headers and checksums only."""
    from xwin.pipeline.ingest import plan_inputs, plan_manifest

    cands, rejs = [], []
    if params.manifest:  # manifest studies are sharded after planning, by volume id
        c, r = plan_manifest(params.manifest, params.cohort, root=params.manifest_root)
        if params.shard:
            c = [x for x in c if in_shard(x.volume_id, params.shard)]
            r = r if params.shard.startswith("0/") else []  # manifest-level rejections: reported by shard 0
        cands += c
        rejs += r
    srcs = params.sources()
    if params.shard:  # sources are sharded before planning: each shard reads only its own headers/files
        srcs = [x for x in srcs if in_shard(x, params.shard)]
    if srcs:
        more, more_rejs = plan_inputs(srcs, params.cohort)
        cands += more
        rejs += more_rejs
    seen: set[str] = set()
    uniq = []
    for cand in cands:  # the same series given twice is one series
        if cand.volume_id not in seen:
            seen.add(cand.volume_id)
            uniq.append(cand)
    if params.limit is not None:
        uniq = uniq[: params.limit]
    return uniq, rejs


@task(name="ingest-series", **TASK_OPTS)
def ingest_series(candidate: Any, store_url: str) -> Ingested | Rejection:
    """Load, validate and commit one canonical volume (skipped when the store has it). Bad input -> Rejection."""
    from xwin.pipeline.ingest import IngestError, load_candidate

    store = store_handle(store_url)
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
    written = store.write_volume(record, hu, owner=task_owner())
    t2 = time.perf_counter()
    return Ingested(
        candidate.input, record.volume_id, record.series_uid, written, {"ingest_load": t1 - t0, "ingest_write": t2 - t1}
    )


@task(name="render-series", **TASK_OPTS)
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
    ds = dataset_handle(store_url, cohort, spec_json)
    if ds.has_ring(vid):
        return Outcome("skipped", entry=entry)
    owner = task_owner()
    secs = dict(ingested.seconds)
    try:
        with ds.claim(vid, owner):
            if ds.has_ring(vid):
                return Outcome("skipped", entry=entry)
            t0 = time.perf_counter()
            record, hu = store_handle(store_url).read_volume(vid)
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
            ds.write_ring(vid, views, geom.view_meta(), prov, owner=owner)
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
