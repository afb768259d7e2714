"""Execution plumbing shared by the flows: slots (concurrency limits), transient-error policy, stage runners.

Nothing here knows about CT or rendering. Two ways to run the same flow body (``xwin.flows.backfill.run_backfill``):

* :class:`PrefectStages` -- inside a Prefect flow run: stages are Prefect tasks (``task.submit``), retried by the
  Prefect engine, and bounded by Prefect *global concurrency limits* (``concurrency(name, strict=True)``).
* :class:`LocalStages` -- no Prefect server (the CLI when no ``PREFECT_API_URL`` is configured): the very same
  task functions (``task.fn``) run on a thread pool with the very same retry policy (``task.retries``,
  ``task.retry_delay_seconds``, ``task.retry_condition_fn``), bounded by in-process semaphores of the same names
  and sizes.
* :class:`DaskStages` -- no Prefect server, tasks on Dask workers (``--runner dask`` without ``PREFECT_API_URL``):
  the same task functions and retry policy (:func:`call_with_retries`) run inside the workers, which never talk to
  a Prefect API; slots are host-wide file locks (:func:`slot`), so worker processes on one host share them.

Slot names (one global concurrency limit each; created on ``xwin deploy`` and, if missing, on first use):

    xwin-cpu:<host>          CPU-bound stage work on one host (ingest: decode + canonicalise)   XWIN_CPU_SLOTS (cpus)
    xwin-render-cpu:<host>   CPU renders on one host (numba uses every core)                      1
    xwin-gpu:<gpu id>        renders on one GPU; gpu id = XWIN_GPU_ID or "<host>-cuda<index>"     1
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import as_completed as _cf_as_completed
from typing import Any, Protocol

from xwin.flows import stop
from xwin.storage import is_transient

log = logging.getLogger("xwin.flows")

GPU_BACKENDS = frozenset({"gpu", "triton", "nanodrr"})  # render backends that hold a GPU slot


# ---- slots ---------------------------------------------------------------------------------------------------
def host() -> str:
    return os.environ.get("XWIN_HOST") or socket.gethostname()


def cpu_slot() -> tuple[str, int]:
    """(limit name, slots) bounding CPU stage work on this host."""
    return f"xwin-cpu:{host()}", int(os.environ.get("XWIN_CPU_SLOTS") or (os.cpu_count() or 1))


def gpu_id(device_index: int = 0) -> str:
    return os.environ.get("XWIN_GPU_ID") or f"{host()}-cuda{device_index}"


def render_slot(backend: str) -> tuple[str, int]:
    """(limit name, slots) for a render with ``backend`` (resolved name): one per GPU, one CPU render per host."""
    if backend in GPU_BACKENDS:
        return f"xwin-gpu:{gpu_id()}", 1
    return f"xwin-render-cpu:{host()}", int(os.environ.get("XWIN_CPU_RENDER_SLOTS") or 1)


_local_sems: dict[str, threading.BoundedSemaphore] = {}
_local_lock = threading.Lock()
_ensured: set[str] = set()


def _local_sem(name: str, slots: int) -> threading.BoundedSemaphore:
    with _local_lock:
        s = _local_sems.get(name)
        if s is None:
            s = _local_sems[name] = threading.BoundedSemaphore(max(1, slots))
        return s


def in_prefect_task() -> bool:
    from prefect.context import TaskRunContext

    return TaskRunContext.get() is not None


def ensure_limit(name: str, slots: int) -> bool:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists (an existing one is kept as
    configured). Returns True when it was created. Needs a reachable Prefect API (or ephemeral mode)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        created = create_unless_exists(
            lambda: client.read_global_concurrency_limit_by_name(name),
            lambda: client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots)),
        )
    if created:
        log.info("created global concurrency limit %s (%d slots)", name, slots)
    return created


def create_unless_exists(read: Callable[[], Any], create: Callable[[], Any]) -> bool:
    """Idempotent creation of a Prefect server object: ``read()``; if it is not found, ``create()``; another process
    creating it concurrently is fine. Returns True when this call created it."""
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        read()
        return False
    except ObjectNotFound:
        pass
    try:
        create()
        return True
    except ObjectAlreadyExists:  # created concurrently by another worker
        return False


def ensure_limits_once(*limits: tuple[str, int]) -> None:
    """``ensure_limit`` for each (name, slots), once per process."""
    with _local_lock:
        for name, slots in limits:
            if name not in _ensured:
                ensure_limit(name, slots)
                _ensured.add(name)


@contextlib.contextmanager
def slot(name: str, slots: int) -> Iterator[None]:
    """Hold one slot of ``name`` for the block.

    Inside a Prefect task run: a global concurrency limit with ``strict=True`` (a missing limit is an error, so
    the limit is created once per process first -- it normally exists from ``xwin deploy``). Inside a Dask worker
    without Prefect (:class:`DaskStages`): ``slots`` lock files per name on this host (:func:`host_slot`), shared by
    every worker process here. Elsewhere: an in-process semaphore with the same name and size.
    """
    if in_prefect_task():
        from prefect.concurrency.sync import concurrency

        with _local_lock:  # one creator per process (avoids racing POSTs from sibling threads)
            if name not in _ensured:
                ensure_limit(name, slots)
                _ensured.add(name)
        with concurrency(name, occupy=1, strict=True):
            yield
    elif in_dask_worker():
        with host_slot(name, slots):
            yield
    else:
        with _local_sem(name, slots):
            yield


def in_dask_worker() -> bool:
    """Is this code running in a task on a Dask worker?"""
    if "distributed" not in sys.modules:  # never imported: not a worker (and no import cost)
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def slot_dir() -> str:
    """Where the host-wide slot lock files live: XWIN_SLOT_DIR, else a per-user folder in the temp directory."""
    d = os.environ.get("XWIN_SLOT_DIR") or os.path.join(tempfile.gettempdir(), f"xwin-slots-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


@contextlib.contextmanager
def host_slot(name: str, slots: int, poll_s: float = 0.05) -> Iterator[None]:
    """Hold one of ``slots`` host-wide slots of ``name``: an exclusive ``flock`` on one of ``slots`` lock files.

    Shared by every process (and thread) on this host that uses the same slot directory; the kernel releases the
    lock of a process that dies, so no slot is ever leaked. Waits (polling) while all slots are held.
    """
    import fcntl

    base = os.path.join(slot_dir(), re.sub(r"[^A-Za-z0-9._-]", "_", name))
    while True:
        for k in range(max(1, slots)):
            f = open(f"{base}.{k}.lock", "a+b")  # noqa: SIM115 - held across the yield, closed below
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(poll_s)


# ---- failure policy ------------------------------------------------------------------------------------------
def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - a state whose result cannot be read: retry by default
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


def backoff_delays(retries: int, base_s: float | None = None) -> list[float]:
    """Exponential backoff ``base * 2**k`` (base from XWIN_RETRY_BASE_S, default 2 s)."""
    b = float(os.environ.get("XWIN_RETRY_BASE_S", "2.0")) if base_s is None else base_s
    return [b * 2**k for k in range(retries)]


# ---- stage runners -------------------------------------------------------------------------------------------
class Stages(Protocol):
    """Submits stage tasks. ``args`` may contain futures returned by earlier ``submit`` calls."""

    mode: str

    def submit(self, task: Any, *args: Any) -> Any: ...

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]: ...

    def result(self, future: Any) -> Any: ...

    def cancel_pending(self, futures: Iterable[Any]) -> None:
        """A stop was requested: cancel what has not started (each such future then ends cancelled); work that
        has started stops at its next :func:`xwin.flows.stop.check` and is waited for."""
        ...


def _stop_sleep(seconds: float) -> None:
    """A retry's backoff that a stop cuts short (the next attempt then does not start)."""
    stop.wait(seconds)


class PrefectStages:
    """Stages as Prefect tasks of the current flow run (its task runner: threads, Dask, ...)."""

    mode = "prefect"

    def __init__(self) -> None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        self.flow_run_id = ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None
        self.names: dict[Any, str] = {}  # task run id -> the stage it runs

    def submit(self, task: Any, *args: Any) -> Any:
        future = prefect_task(task).submit(*args)
        self.names[future.task_run_id] = task.name.removesuffix("-series")  # its stage: "render-series" -> "render"
        return future

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        from prefect.futures import as_completed

        yield from as_completed(list(futures))

    def result(self, future: Any) -> Any:
        """The task's value; a task run a stop ended (state Cancelled) raises :class:`stop.Cancelled` again, as the
        other runners do. A task run whose upstream a stop ended never ran: Prefect leaves it Pending ("NotReady"),
        so it is set Cancelled here (not started) rather than left unfinished."""
        from prefect.exceptions import CancelledRun, UnfinishedRun

        try:
            return future.result()
        except CancelledRun:
            st = future.state
            if not st.is_cancelled():
                raise
            raise cancelled_of_state(st) from None
        except UnfinishedRun:
            st = future.state
            if not (st.is_pending() and st.name == "NotReady" and stop.requested()):
                raise
            err = stop.Cancelled(self.names.get(future.task_run_id, ""), started=False)
            _set_cancelled(future.task_run_id, err)
            raise err from None

    def cancel_pending(self, futures: Iterable[Any]) -> None:
        on_dask = []
        for f in futures:  # a task of this process that has not started (threads); started ones check the stop
            wrapped = getattr(f, "wrapped_future", None)
            if isinstance(wrapped, Future):
                wrapped.cancel()
            elif wrapped is not None and hasattr(wrapped, "client") and hasattr(wrapped, "key"):
                on_dask.append(wrapped)  # the flow's DaskTaskRunner: cancel what no worker has started
        if on_dask:  # task runs on the workers see the stop through the flow run's Dask event (xwin.flows.stop)
            from distributed import Event

            client = on_dask[0].client
            Event(stop.event_name(self.flow_run_id), client=client).set()
            running = {k for keys in client.processing().values() for k in keys}
            client.cancel([w for w in on_dask if w.key not in running and not w.done()])


def cancelled_state(err: stop.Cancelled) -> Any:
    """The Prefect state of a task run a stop ended: Cancelled, its message naming the stage (``stopped: render``,
    ``... (not started)`` when it had not begun)."""
    from prefect.states import Cancelled

    return Cancelled(message=str(err) + ("" if err.started else " (not started)"))


_STOPPED = re.compile(r"^stopped(?:: (?P<what>.*?))?(?P<not_started> \(not started\))?$")


def cancelled_of_state(state: Any) -> stop.Cancelled:
    """:func:`cancelled_state` read back: the :class:`stop.Cancelled` of a Cancelled task run (one cancelled by
    anything else than a stop: not started)."""
    m = _STOPPED.match(state.message or "")
    if m is None:
        return stop.Cancelled(state.message or "", started=False)
    return stop.Cancelled(m.group("what") or "", started=m.group("not_started") is None)


_prefect_tasks: dict[int, Any] = {}


def prefect_task(task: Any) -> Any:
    """The Prefect task a Prefect flow run submits for stage ``task``: the same function, name and retry policy,
    except that a stop (:class:`stop.Cancelled` raised by the function) ends the task run ``Cancelled``
    (:func:`cancelled_state`) instead of ``Failed``. A returned Cancelled state is final: Prefect retries only
    exceptions and Failed states."""
    with _local_lock:
        got = _prefect_tasks.get(id(task))
        if got is not None and got[0] is task:
            return got[1]
    fn = task.fn

    @functools.wraps(fn)
    def run_stage(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except stop.Cancelled as e:
            return cancelled_state(e)

    wrapped = copy.copy(task)
    wrapped.fn = run_stage
    with _local_lock:
        _prefect_tasks[id(task)] = (task, wrapped)
    return wrapped


def _set_cancelled(task_run_id: Any, err: stop.Cancelled, tries: int = 20) -> None:
    """Set task run ``task_run_id`` Cancelled (:func:`cancelled_state`) through the API (its record may lag behind
    the engine's events a moment: asked again then)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for _ in range(tries):
            try:
                client.set_task_run_state(task_run_id, cancelled_state(err), force=True)
                return
            except (ObjectNotFound, httpx.HTTPStatusError) as e:
                if isinstance(e, httpx.HTTPStatusError) and e.response.status_code != 404:
                    log.warning("task run %s not set Cancelled: %s", task_run_id, e)
                    return
                time.sleep(0.25)
            except Exception as e:  # noqa: BLE001 - the state is a display; the run's summary is what counts
                log.warning("task run %s not set Cancelled: %s", task_run_id, e)
                return
    log.warning("task run %s not set Cancelled: not found", task_run_id)


class LocalStages:
    """Stages as plain function calls (``task.fn``) on a thread pool with the task's own retry policy.

    FIFO scheduling makes waiting on a dependency safe: a stage is only queued after the stage it waits on.
    """

    mode = "local"

    def __init__(self, max_workers: int = 4, sleep: Callable[[float], None] = _stop_sleep) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="xwin-stage")
        self.sleep = sleep
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> LocalStages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, name: str) -> None:
        with self._lock:
            self.attempts[name] = self.attempts.get(name, 0) + 1

    def _call(self, task: Any, args: tuple[Any, ...]) -> Any:
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)
        return call_with_retries(task, args, self.sleep, self._count)

    def submit(self, task: Any, *args: Any) -> Future:
        return self.pool.submit(self._call, task, args)

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        yield from _cf_as_completed(list(futures))

    def result(self, future: Future) -> Any:
        return future.result()

    def cancel_pending(self, futures: Iterable[Future]) -> None:
        for f in futures:
            f.cancel()  # False for a running one: it stops at its next stop check


def call_with_retries(
    task: Any,
    args: tuple[Any, ...],
    sleep: Callable[[float], None] = _stop_sleep,
    on_attempt: Callable[[str], None] | None = None,
) -> Any:
    """``task.fn(*args)`` with the task's own retry policy (``retries``, ``retry_delay_seconds``,
    ``retry_condition_fn``), as the Prefect engine would apply it, without Prefect. No attempt starts once a stop
    was requested (:class:`xwin.flows.stop.Cancelled`, never retried)."""
    delays = task.retry_delay_seconds
    retries = int(task.retries or 0)
    for attempt in range(retries + 1):
        stop.check(task.name, started=attempt > 0)
        if on_attempt is not None:
            on_attempt(task.name)
        try:
            return task.fn(*args)
        except Exception as e:  # filtered by the task's retry condition
            cond = task.retry_condition_fn
            retry = is_transient(e) if cond is None or cond is retry_transient else bool(cond(task, None, _Failed(e)))
            if attempt >= retries or not retry:
                raise
            d = delays[min(attempt, len(delays) - 1)] if isinstance(delays, (list, tuple)) else float(delays or 0)
            log.warning(
                "%s failed (%s: %s), retry %d/%d in %.1fs", task.name, type(e).__name__, e, attempt + 1, retries, d
            )
            sleep(d)
    raise AssertionError("unreachable")


def _run_on_worker(task: Any, stop_event: str, *args: Any) -> Any:
    """What :class:`DaskStages` submits: one task with its retry policy, inside a Dask worker; a stop of the
    driver reaches it through the Dask event ``stop_event`` (:func:`xwin.flows.stop.task_token`)."""
    from distributed import Event

    ev = Event(stop_event)
    with stop.task_token(ev.is_set):
        return call_with_retries(task, args)


class DaskStages:
    """Stages as Dask tasks without Prefect: the task functions with their retry policy run inside the workers
    (:func:`call_with_retries`); futures passed as arguments are resolved by Dask.

    The scheduler: ``address`` / XWIN_DASK_ADDRESS (an existing cluster), else a LocalCluster of ``n_workers`` /
    XWIN_DASK_WORKERS (default 2) processes with ``threads_per_worker`` threads each, started for the run and shut
    down with it (``with DaskStages() as stages:``): no process it started outlives the block.

    A stop (:meth:`cancel_pending`) sets the run's Dask event, which the tasks on the workers check (at their start
    and at each progress callback), and cancels the tasks no worker has started.
    """

    mode = "dask"

    def __init__(self, address: str | None = None, n_workers: int | None = None, threads_per_worker: int = 2) -> None:
        from distributed import Client, LocalCluster

        address = address or os.environ.get("XWIN_DASK_ADDRESS") or None
        self.cluster: Any = None
        if address:
            self.client = Client(address, set_as_default=False)
        else:
            self.cluster = LocalCluster(
                n_workers=n_workers or int(os.environ.get("XWIN_DASK_WORKERS") or 2),
                threads_per_worker=threads_per_worker,
                processes=True,
                dashboard_address=None,
            )
            try:
                self.client = Client(self.cluster, set_as_default=False)
            except BaseException:
                self.cluster.close()
                raise
        self.stop_event = f"xwin-stop-{uuid.uuid4().hex}"

    def __enter__(self) -> DaskStages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
                self.cluster = None

    def submit(self, task: Any, *args: Any) -> Any:
        key = f"{task.name}-{uuid.uuid4().hex}"
        return self.client.submit(_run_on_worker, task, self.stop_event, *args, pure=False, key=key)

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        from distributed import as_completed

        yield from as_completed(list(futures), loop=self.client.loop)

    def result(self, future: Any) -> Any:
        return future.result()

    def cancel_pending(self, futures: Iterable[Any]) -> None:
        from distributed import Event

        Event(self.stop_event, client=self.client).set()
        running = {k for keys in self.client.processing().values() for k in keys}
        self.client.cancel([f for f in futures if f.key not in running and not f.done()])


class _Failed:
    """Minimal stand-in for a Prefect Failed state (for custom retry conditions under LocalStages)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self, raise_on_failure: bool = True) -> BaseException:
        return self.exc


# ---- Prefect API presence ------------------------------------------------------------------------------------
def prefect_api_url() -> str | None:
    """The configured Prefect API URL (env or profile), or None (then flows would start an ephemeral server)."""
    try:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        return str(url) if url else None
    except Exception:  # noqa: BLE001 - unreadable Prefect settings: fall back to the environment  # pragma: no cover
        return os.environ.get("PREFECT_API_URL") or None
