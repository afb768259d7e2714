"""``ingest_sources``: plan -> skip what the store has -> load -> write. Every input ends in one list."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.errors import IngestError, no_verdict
from xwin.pipeline.ingest.load import load_candidate
from xwin.pipeline.ingest.plan import plan_inputs, plan_manifest
from xwin.schemas.ingest import CancelledEntry, Failure, Rejection, RunEntry, RunSummary, VolumeRecord

T = TypeVar("T")
RETRY_DELAYS_S = (1.0, 2.0, 4.0)  # backoff of an error that can pass (``transient``), then the input fails


class _Failed(Exception):
    """An input's error that is no verdict on it, after its retries: becomes a Failure."""

    def __init__(self, err: BaseException, retryable: bool) -> None:
        super().__init__(str(err))
        self.err, self.retryable = err, retryable


def _attempts(
    fn: Callable[[], T],
    transient: Callable[[BaseException], bool] | None,
    delays: Sequence[float],
    sleep: Callable[[float], None],
) -> T:
    """``fn()``, retried with backoff while it raises an error that can pass; an error that is no verdict on the
    input (``errors.no_verdict``) and outlives the retries raises :class:`_Failed`; anything else propagates."""
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as e:  # filtered: only errors that are no verdict on the input are handled here
            err = no_verdict(e, transient)
            if err is None:
                raise
            can_pass = transient is not None and transient(err)
            if can_pass and attempt < len(delays):
                sleep(delays[attempt])
                continue
            raise _Failed(err, can_pass) from e
    raise AssertionError("unreachable")


def _failure(label: str, stage: str, f: _Failed, volume_id: str | None = None, uid: str | None = None) -> Failure:
    return Failure(
        input=label,
        stage=stage,
        error=f"{type(f.err).__name__}: {f.err}",
        retryable=f.retryable,
        volume_id=volume_id,
        series_uid=uid,
    )


class VolumeStore(Protocol):
    """The part of ``xwin.storage.open_store(url)`` that ingest uses."""

    def volume_settled(self, volume_id: str) -> bool: ...  # committed (and catalogued: a missing row is re-added)

    def write_volume(self, record: VolumeRecord, hu: np.ndarray) -> bool: ...


def ingest_sources(
    sources: Sequence[str | Path],
    cohort: str,
    store: VolumeStore,
    config: IngestConfig | None = None,
    manifests: Sequence[str | Path] = (),
    on_entry: Callable[[str, RunEntry | Rejection | Failure], None] | None = None,
    transient: Callable[[BaseException], bool] | None = None,
    retry_delays: Sequence[float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    held: Callable[[BaseException], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunSummary:
    """Ingest sources (and NBIA manifests) into ``store``; return the RunSummary.

    A candidate whose volume_id the store already has, or that an earlier input of the same run produced,
    is ``skipped`` without decoding pixels. When the chosen series of a study fails to load, the next-ranked one
    that loads is written under its own volume_id (``load_candidate``); a rerun retries the chosen series and
    skips the fallback if the store has it. A bad input becomes a Rejection and never stops the others; errors
    of the store itself propagate (the run cannot complete). ``on_entry(kind, entry)`` is called per result.

    An error that is no verdict on an input -- the file system failing to read it (``errors.is_read_failure``), or
    any error ``transient`` says can pass (callers pass ``xwin.storage.is_transient``: I/O errors, timeouts, a
    full disk, ...) while reading or writing it -- is retried after each of ``retry_delays`` (default
    ``RETRY_DELAYS_S``) while it can pass, then the input is ``failed`` (never rejected); the others go on. Without
    ``transient`` nothing is retried.
    Every planned input is in exactly one list and ``planned`` counts them.

    ``should_stop()``: asked before each candidate (a stopped command); once True, the candidates not begun are
    ``cancelled`` (not started) and the run returns. A volume being written is always finished.

    ``held(error)``: True for the store's "another live writer is writing this volume" (callers pass
    ``lambda e: isinstance(e, xwin.storage.ClaimHeld)``): such an input is ``skipped`` (stage
    ``claimed-elsewhere``), as two runs of one cohort at once must both finish; the other run commits it.
    """
    cfg = config or IngestConfig()
    delays = RETRY_DELAYS_S if retry_delays is None else retry_delays
    cands: list = []
    rejs: list[Rejection] = []
    failed: list[Failure] = []

    def plan(label: str, fn: Callable[[], tuple[list, list[Rejection]]]) -> None:
        try:
            c, r = _attempts(fn, transient, delays, sleep)
        except _Failed as f:
            failed.append(_failure(label, "plan", f))
            if on_entry:
                on_entry("failed", failed[-1])
            return
        cands.extend(c)
        rejs.extend(r)

    for src in sources:  # one at a time: a source that cannot be read fails alone
        plan(str(src), partial(plan_inputs, [src], cohort, cfg))
    for m in manifests:
        plan(str(m), partial(plan_manifest, m, cohort, config=cfg))
    summary = RunSummary(rejected=list(rejs), failed=list(failed))
    if on_entry:
        for rej in rejs:
            on_entry("rejected", rej)
    seen: dict[str, tuple[str, str | None]] = {}  # planned volume_id -> (stored volume_id, its series_uid)
    first_input: dict[str, str] = {}  # planned volume_id -> the input of this run that produced it first
    for i, c in enumerate(cands):
        if should_stop is not None and should_stop():
            summary.cancelled.extend(
                CancelledEntry(input=x.input, stage="ingest", started=False, volume_id=x.volume_id) for x in cands[i:]
            )
            break
        if c.volume_id in seen or store.volume_settled(c.volume_id):
            vid, uid = seen.get(c.volume_id, (c.volume_id, c.series_uid))
            first = first_input.get(c.volume_id)
            why = f"duplicate of {first}: the same series given twice" if first is not None else None
            entry = RunEntry(input=c.input, volume_id=vid, series_uid=uid, reason=why)
            summary.skipped.append(entry)
            kind = "skipped"
        else:
            try:
                record, hu = _attempts(partial(load_candidate, c), transient, delays, sleep)
            except _Failed as f:
                summary.failed.append(_failure(c.input, "ingest", f, c.volume_id, c.series_uid))
                if on_entry:
                    on_entry("failed", summary.failed[-1])
                continue
            except IngestError as e:
                rejection = Rejection(
                    input=c.input, reason=e.reason, detail=e.detail, series_uid=e.series_uid or c.series_uid
                )
                summary.rejected.append(rejection)
                if on_entry:
                    on_entry("rejected", rejection)
                continue
            # record.volume_id is the study's next-ranked series when the chosen one failed to load: a rerun
            # tries the chosen series again (it may have been repaired) and skips a fallback it already has
            flags = [q.name for q in record.qc if q.flagged]
            entry = RunEntry(input=c.input, volume_id=record.volume_id, series_uid=record.series_uid, qc_flags=flags)
            fell_back = record.volume_id != c.volume_id
            if fell_back and (record.volume_id in seen or store.volume_settled(record.volume_id)):
                summary.skipped.append(entry)
                kind = "skipped"
            else:
                try:
                    _attempts(partial(store.write_volume, record, hu), transient, delays, sleep)
                except _Failed as f:
                    summary.failed.append(_failure(c.input, "write", f, record.volume_id, record.series_uid))
                    if on_entry:
                        on_entry("failed", summary.failed[-1])
                    del hu
                    continue
                except Exception as e:
                    if held is None or not held(e):
                        raise
                    entry = entry.model_copy(update={"stage": "claimed-elsewhere"})
                    summary.skipped.append(entry)
                    if on_entry:
                        on_entry("skipped", entry)
                    del hu
                    continue
                summary.done.append(entry)
                kind = "done"
            del hu
            seen[record.volume_id] = (record.volume_id, record.series_uid)
        seen.setdefault(c.volume_id, (entry.volume_id, entry.series_uid))
        first_input.setdefault(c.volume_id, c.input)
        if on_entry:
            on_entry(kind, entry)
    return RunSummary(
        done=summary.done,
        skipped=summary.skipped,
        rejected=summary.rejected,
        failed=summary.failed,
        cancelled=summary.cancelled,
        planned=len(cands) + len(rejs) + len(failed),
    )
