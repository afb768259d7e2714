"""xwin's own log records in the Prefect run they belong to: what the UI's Logs tab of a flow run shows.

Two loggers reach the Prefect API, through one handler (:class:`RunLogHandler`) attached once per process when
the flows are imported (:func:`install`):

* ``xwin.stages`` (INFO): the stage lines of a run, the same lines ``xwin backfill`` prints outside a terminal
  (``xwin.flows.progress.stage_line``): what starts, each series' ingest, render and commit with their times, each
  series' outcome, the verification, the summary; and each validated ring.
* ``xwin`` and its children at the level the process's logging lets through (WARNING by default): retries,
  refused labelmaps, previews not written, series that failed after their retries.

A record goes to the flow or task run of the context it is logged in (a task on a thread pool or a Dask worker
included); outside a Prefect run the handler drops it silently (``run_local``, ``run_dask``, scripts), so nothing
warns about logs without a run. Prefect's own ``PREFECT_LOGGING_EXTRA_LOGGERS=xwin`` attaches its API handler too,
but warns for every record outside a run and only takes effect where the variable is set before Prefect starts;
where it is set, Prefect's handler sends the records it receives and this one leaves them alone (never twice).
"""

from __future__ import annotations

import logging
import sys
import threading

from prefect.logging.handlers import APILogHandler

STAGE_LOGGER = "xwin.stages"

_lock = threading.Lock()
_handler: RunLogHandler | None = None


def in_prefect_run() -> bool:
    """Is this code running inside a Prefect flow run or task run (this thread's context)?"""
    if "prefect.context" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _prefect_handler_sends(name: str) -> bool:
    """Does one of Prefect's own API log handlers (``PREFECT_LOGGING_EXTRA_LOGGERS``) already receive a record of
    the logger ``name`` (on it or on an ancestor it propagates to)?"""
    lg: logging.Logger | None = logging.getLogger(name)
    while lg is not None:
        if any(isinstance(h, APILogHandler) and not isinstance(h, RunLogHandler) for h in lg.handlers):
            return True
        if not lg.propagate:
            return False
        lg = lg.parent
    return False


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for xwin's loggers, active only inside a flow or task run, and only for records
    no Prefect API handler of its own sends (each record reaches the run once)."""

    def emit(self, record: logging.LogRecord) -> None:
        if in_prefect_run() and not _prefect_handler_sends(record.name):
            super().emit(record)


def install() -> RunLogHandler:
    """Attach the run log handler to ``xwin`` and ``xwin.stages`` (once per process); returns it."""
    global _handler
    with _lock:
        if _handler is None:
            _handler = RunLogHandler()
            logging.getLogger("xwin").addHandler(_handler)
            stages = logging.getLogger(STAGE_LOGGER)
            stages.addHandler(_handler)
            stages.propagate = False  # its records reach the run once, not again through "xwin"
            if stages.level == logging.NOTSET:
                stages.setLevel(logging.INFO)
        return _handler
