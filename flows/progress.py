"""Progress of a backfill: events for in-process listeners (the CLI's bar) and a Prefect progress artifact."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from xwin.flows.tasks import Outcome

log = logging.getLogger(__name__)

ProgressListener = Callable[[dict], None]


_listeners: list[ProgressListener] = []


def add_listener(fn: ProgressListener) -> Callable[[], None]:
    """Receive progress events of flows run in this process: ``{"event": "start"|"step"|"views"|"series"|"stage"|
    "end", ...}`` (``step`` and ``views`` come from the stage tasks when they run in this process)."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn)


def emit(ev: dict) -> None:
    for fn in list(_listeners):
        try:
            fn(ev)
        except Exception:  # a broken progress bar must not break a run
            log.debug("progress listener failed", exc_info=True)


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
