"""Stopping a run: one cancellation path for every command and every runner (threads, Dask, Prefect).

A stop is *requested* once -- by the command's signal handlers (:func:`handle_signals`: the first SIGINT or
SIGTERM), by a Prefect flow run cancelled from the UI or the API (:func:`watch_prefect_cancel`), or by code
(:func:`request`) -- and then observed cooperatively:

* work that has not started does not start: :func:`check` at the start of each stage task raises
  :class:`Cancelled` (``started=False``), and the runner cancels what it still holds queued (hooks registered
  with :func:`on_stop`, run in a thread of their own, never inside the signal handler);
* work in progress stops at its next progress callback (a render's chunk of views, a training step):
  :func:`check` raises :class:`Cancelled` (``started=True``); the ``with`` blocks it leaves release what they hold
  (a ring's claim);
* a commit already deciding is never interrupted (no check runs inside it).

The driver then accounts for every planned item (``RunSummary.cancelled``), writes its summary and ends with
:func:`exit_code` (130 after SIGINT, 143 after SIGTERM). A *second* signal ends the process at once
(``os._exit``) with one line; claims are then left to expire and a rerun recovers. A command without stop points
(:func:`interrupt_on_signal`, every ``xwin`` command's default) is interrupted where it is, like SIGINT's
KeyboardInterrupt but for SIGTERM too, and ends with one line and the same exit status.

In a Dask worker the request is not in the process: the runner sets a token reader for the task
(:func:`task_token`, a context variable), which :func:`requested` consults too.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The run was asked to stop. ``started``: False when the work had not begun (it was not started), True when
    it was stopped part-way (what it held has been released on the way out)."""

    def __init__(self, what: str = "", started: bool = True) -> None:
        self.what, self.started = what, started
        super().__init__(f"stopped: {what}" if what else "stopped")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled across processes (Dask) with its fields
        return (Cancelled, (self.what, self.started))


_event = threading.Event()
_lock = threading.Lock()
_signum: int | None = None
_hooks: list[Callable[[], None]] = []
_token: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("xwin_stop_token", default=None)


def requested() -> bool:
    """Has this run been asked to stop (in this process, or -- in a Dask worker -- by the driver)?"""
    if _event.is_set():
        return True
    token = _token.get() or _prefect_dask_token()
    if token is None:
        return False
    try:
        return bool(token())
    except Exception:  # noqa: BLE001 - an unreachable token (scheduler gone) says nothing: keep working
        return False


def event_name(flow_run_id: Any) -> str:
    """The Dask event by which a Prefect flow run on Dask tells its task runs on the workers to stop."""
    return f"xwin-stop-{flow_run_id}"


def _prefect_dask_token() -> Callable[[], bool] | None:
    """In a Prefect task run on a Dask worker (the flow's DaskTaskRunner): its flow run's Dask event."""
    if "distributed" not in sys.modules or "prefect" not in sys.modules:
        return None
    from distributed import Event, get_worker
    from prefect.context import TaskRunContext

    try:
        get_worker()
    except ValueError:
        return None
    ctx = TaskRunContext.get()
    if ctx is None or ctx.task_run.flow_run_id is None:
        return None
    return Event(event_name(ctx.task_run.flow_run_id)).is_set


def check(what: str = "", started: bool = True) -> None:
    """Raise :class:`Cancelled` when a stop was requested (the cooperative stop point of a long loop)."""
    if requested():
        raise Cancelled(what, started)


def callback(what: str = "") -> Callable[..., None]:
    """A progress callback (any arguments) that only checks for a stop: for loops that take one."""

    def on_progress(*_: Any, **__: Any) -> None:
        check(what)

    return on_progress


def wait(seconds: float) -> bool:
    """Sleep ``seconds`` or until a stop is requested; True when it was (a retry's backoff, a poll)."""
    return _event.wait(seconds) if seconds > 0 else _event.is_set()


def request(signum: int | None = None) -> bool:
    """Ask this process's run to stop. Returns True for the first request (then the hooks run, in a thread)."""
    global _signum
    with _lock:
        if _event.is_set():
            return False
        _signum = signum
        _event.set()
        hooks = list(_hooks)
    if hooks:
        threading.Thread(target=_run_hooks, args=(hooks,), name="xwin-stop", daemon=True).start()
    return True


def _run_hooks(hooks: list[Callable[[], None]]) -> None:
    for fn in hooks:
        try:
            fn()
        except Exception:  # one hook failing must not keep the others from stopping their work
            log.warning("stop hook %r failed", fn, exc_info=True)


def on_stop(fn: Callable[[], None], first: bool = False) -> Callable[[], None]:
    """Call ``fn()`` (in the stop's thread, after the hooks registered before it; ``first``: before them) when a
    stop is requested -- at once if it already was. Returns the function that unregisters it."""
    with _lock:
        already = _event.is_set()
        if not already:
            _hooks.insert(0, fn) if first else _hooks.append(fn)
    if already:
        threading.Thread(target=_run_hooks, args=([fn],), name="xwin-stop", daemon=True).start()

    def remove() -> None:
        with _lock, contextlib.suppress(ValueError):
            _hooks.remove(fn)

    return remove


def signum() -> int | None:
    """The signal that asked for the stop (None: requested by code or by a cancelled flow run)."""
    return _signum


def exit_code() -> int:
    """The exit status of a stopped command: 128 + the signal number (130 SIGINT, 143 SIGTERM; 130 otherwise)."""
    return 128 + (_signum or signal.SIGINT)


def reset() -> None:
    """Forget a previous request and its hooks (a new run in this process)."""
    global _signum
    with _lock:
        _event.clear()
        _signum = None
        _hooks.clear()


@contextlib.contextmanager
def task_token(token: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, :func:`requested` also asks ``token()`` (a runner's view of the driver's request)."""
    t = _token.set(token)
    try:
        yield
    finally:
        _token.reset(t)


NOTICE = "stopping: no new work starts, work in progress stops at its next step (again to exit at once)"


def _handler(sig: int, _frame: Any) -> None:
    """The signal handler: the first signal requests a stop (nothing else here: the hooks run in their own thread,
    so no lock the interrupted code holds is ever taken); the second ends the process at once."""
    if request(sig):
        return
    # the second signal: no cleanup, no summary; claims expire (or are seen dead) and a rerun recovers
    os.write(2, f"\nstopped at once ({signal.Signals(sig).name}); run the same command again to continue\n".encode())
    os._exit(128 + sig)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def handle_signals(notice: bool = True, fresh: bool = True) -> Iterator[None]:
    """For the block: the first SIGINT or SIGTERM requests a stop (with ``notice``, one line on stderr says so), a
    second one ends the process at once with one line (exit status 128 + signal). Outside the main thread the
    handlers are not installed (signals are delivered to the main thread only).

    ``fresh``: forget a previous request and its hooks first (:func:`reset`): a command starts with none."""
    if fresh:
        reset()
    unhook = on_stop(lambda: _say(NOTICE)) if notice else (lambda: None)
    if threading.current_thread() is not threading.main_thread():
        yield
        unhook()
        return
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        unhook()
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(sig: int, frame: Any) -> None:
    """The handler of a command without stop points: the first signal raises :class:`Cancelled` where the main
    thread is (as SIGINT's KeyboardInterrupt would, for SIGTERM too); ``with`` blocks release what they hold."""
    _handler(sig, frame)  # the second signal: out at once
    raise Cancelled(started=True)


@contextlib.contextmanager
def interrupt_on_signal() -> Iterator[None]:
    """For the block (a whole command): the first SIGINT or SIGTERM raises :class:`Cancelled` in the main thread, a
    second one ends the process at once. Commands with stop points install :func:`handle_signals` inside it."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def install_in_flow() -> Callable[[], None]:
    """Inside a Prefect flow run on the main thread: this module's handlers instead of Prefect's SIGTERM bridge
    (which would end the run Crashed, without its summary), for the rest of the run; a request made before (by the
    command that runs the flow) is kept. Returns the undo."""
    stack = contextlib.ExitStack()
    stack.enter_context(handle_signals(notice=False, fresh=False))
    return stack.close


def watch_prefect_cancel(flow_run_id: Any, every_s: float = 2.0) -> Callable[[], None]:
    """Poll the state of Prefect flow run ``flow_run_id``: when it is cancelling or cancelled (from the UI or the
    API), request a stop. Returns the function that ends the watch."""
    done = threading.Event()

    def watch() -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not done.wait(every_s):
                try:
                    st = client.read_flow_run(flow_run_id).state
                except Exception:  # noqa: BLE001 - the API unreachable for a moment: ask again next time
                    continue
                if st is not None and (st.is_cancelling() or st.is_cancelled()):
                    log.warning("flow run %s was cancelled: stopping", flow_run_id)
                    request()
                    return

    t = threading.Thread(target=watch, name="xwin-cancel-watch", daemon=True)
    t.start()

    def stop_watch() -> None:
        done.set()

    return stop_watch
