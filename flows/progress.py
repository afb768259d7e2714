"""Progress of a backfill: events for in-process listeners (the CLI's bar), a Prefect progress artifact, and one
stage line per event (:func:`stage_line`) on the logger ``xwin.stages``, which reaches the logs of the Prefect run
the event happens in (``xwin.flows.runlogs``) and which ``xwin backfill`` prints outside a terminal."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from xwin.flows.tasks import Outcome

log = logging.getLogger(__name__)
stage_log = logging.getLogger("xwin.stages")  # xwin.flows.runlogs.STAGE_LOGGER

ProgressListener = Callable[[dict], None]


_listeners: list[ProgressListener] = []


def add_listener(fn: ProgressListener) -> Callable[[], None]:
    """Receive progress events of flows run in this process: ``{"event": "start"|"step"|"views"|"series"|"stage"|
    "end", ...}`` (``step`` and ``views`` come from the stage tasks when they run in this process)."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn)


def emit(ev: dict) -> None:
    """Send ``ev`` to the listeners of this process and its stage line to ``xwin.stages``."""
    line = stage_line(ev)
    if line is not None and stage_log.isEnabledFor(logging.INFO):
        stage_log.info(line)
    for fn in list(_listeners):
        try:
            fn(ev)
        except Exception:  # a broken progress bar must not break a run
            log.debug("progress listener failed", exc_info=True)


def _vid(ev: dict) -> str:
    """A series as a line names it: the first 12 characters of its volume id (a unique prefix in practice), else
    the input as given, whole."""
    vid = ev.get("volume_id")
    return str(vid)[:12] if vid else str(ev.get("input") or "a series")


def _series(ev: dict) -> str:
    """The series of a ``series`` event: volume id prefix and input (a failed or rejected one is named by both)."""
    vid, given = ev.get("volume_id"), ev.get("input")
    if vid and given and ev.get("status") in ("failed", "rejected"):
        return f"{str(vid)[:12]} ({given})"
    return _vid(ev)


def stage_line(ev: dict) -> str | None:
    """The line that says what a progress event means, or None for events without one (views after the first)."""
    e = ev.get("event")
    if e == "start":  # series accounted for while planning are said, so "0 to process" is never unexplained
        extra = "".join(f", {ev[k]} {k} while planning" for k in ("rejected", "failed") if ev.get(k))
        return f"backfill {ev['cohort']}: {ev['total']} series to process, {ev['skipped']} already done{extra}"
    if e == "step":
        step, s = ev.get("step"), float(ev.get("seconds") or 0.0)
        if step == "ingest":
            what = "ingested" if ev.get("written", True) else "volume already in the store, checked"
            return f"{_vid(ev)}: {what} in {s:.1f} s"
        if step == "render":
            v = int(ev.get("views") or 0)
            rate = f" ({v / s:.1f} views/s)" if s > 0 and v else ""
            return f"{_vid(ev)}: rendered {v} views in {s:.1f} s{rate}"
        if step == "commit":
            return f"{_vid(ev)}: committed in {s:.1f} s"
        return None
    if e == "views":
        return f"{_vid(ev)}: rendering {ev['total']} views" if int(ev.get("done", -1)) == 0 else None
    if e == "series":
        if ev.get("status") == "cancelled":  # said once, in the run's "cancelled: ..." line
            return None
        flags = f" (QC flagged: {', '.join(ev['qc_flags'])})" if ev.get("qc_flags") else ""
        return f"[{ev.get('n', '?')}/{ev.get('of', '?')}] {ev.get('status')} {_series(ev)}{flags}"
    if e == "stage":
        return str(ev.get("name"))
    if e == "validated":
        return (
            f"{_vid(ev)}: FDK reconstruction ({ev.get('backend')}) PSNR {float(ev['psnr']):.1f} dB, "
            f"SSIM {float(ev['ssim']):.3f} in {float(ev.get('seconds') or 0.0):.1f} s"
        )
    if e == "end" and ev.get("summary") is not None:
        summary = ev["summary"]
        c = summary.counts()
        lines = [
            f"backfill {ev.get('cohort', '?')}: done {c['done']}, skipped {c['skipped']}, rejected {c['rejected']}, "
            f"failed {c['failed']} of {summary.planned} planned in {float(ev.get('wall_s') or 0.0):.1f} s"
        ]
        lines += capped([f"  rejected {r.input}: {r.reason.value}: {r.detail}" for r in summary.rejected], "rejected")
        lines += capped(
            [f"  FAILED {f.input} ({f.stage}): {f.error} "
             f"({'a rerun retries it' if f.retryable else 'fix the cause, then rerun'})" for f in summary.failed],
            "failed",
        )  # fmt: skip
        if ev.get("verify"):
            lines.append(f"  verify {ev['verify']}")
        return "\n".join(lines)
    return None


LIST_LIMIT = 20  # series named per list (QC flagged, rejected, failed) in a printed run summary


def capped(lines: list[str], what: str, limit: int = LIST_LIMIT) -> list[str]:
    """At most ``limit`` of a summary's per-series ``lines``, then one line saying how many more ``what`` there are
    (the JSON summary and the markdown report list every one)."""
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"  ... and {len(lines) - limit} more {what} (--json lists every one)"]


def step(volume_id: str, name: str, seconds: float, **fields: object) -> None:
    """A series finished a step: ``ingest`` (``written``), ``render`` (``views``) or ``commit``."""
    emit({"event": "step", "volume_id": volume_id, "step": name, "seconds": seconds, **fields})


def views_callback(volume_id: str) -> Callable[[int, int], None]:
    """The ``on_progress(done, total)`` of one ring's render (``xwin.pipeline.render.render_ring``): a ``views``
    event per call."""

    def on_progress(done: int, total: int) -> None:
        emit({"event": "views", "volume_id": volume_id, "done": done, "total": total})

    return on_progress


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from ``parts``: lower case, letters, digits and '-' only, at most 100 characters."""
    s = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in s)[:100]


class Progress:
    """A Prefect progress artifact (when in a flow run) + the in-process listeners, throttled to ~2 updates/s."""

    def __init__(
        self, cohort: str, total: int, skipped: int, prefect: bool, rejected: int = 0, failed: int = 0
    ) -> None:
        self.total, self.n, self.prefect, self._last = total, 0, prefect, 0.0
        self.artifact: UUID | None = None
        if prefect:
            from prefect.artifacts import create_progress_artifact

            artifact = create_progress_artifact(
                progress=0.0,
                key=artifact_key("backfill-progress", cohort),
                description=f"backfill {cohort}: {total} series to process, {skipped} already done",
            )
            assert isinstance(artifact, UUID)  # synchronous inside a flow run
            self.artifact = artifact
        # rejected / failed: series already accounted for while planning (never "to process")
        emit(
            {
                "event": "start",
                "total": total,
                "skipped": skipped,
                "cohort": cohort,
                "rejected": rejected,
                "failed": failed,
            }
        )

    def advance(self, o: Outcome, candidate: object = None) -> None:
        """One series finished with ``o``; ``candidate`` (the planned series) names it when ``o`` does not (a
        series whose task raised)."""
        self.n += 1
        vid = o.entry.volume_id if o.entry else getattr(candidate, "volume_id", None)
        given = o.entry.input if o.entry else (o.rejection.input if o.rejection else None)
        emit(
            {
                "event": "series",
                "n": self.n,
                "of": self.total,
                "status": o.status,
                "volume_id": vid,
                "input": given or getattr(candidate, "input", None),
                "qc_flags": list(o.entry.qc_flags) if o.entry else [],
            }
        )
        now = time.monotonic()
        if self.artifact is not None and (now - self._last > 0.5 or self.n == self.total):
            from prefect.artifacts import update_progress_artifact

            self._last = now
            update_progress_artifact(artifact_id=self.artifact, progress=100.0 * self.n / max(1, self.total))
