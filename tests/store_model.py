"""A model of the store's write protocol under faults: a fault-injecting backend, a step-by-step scheduler of racing
writers and repairs, and the store invariants I1-I5 of docs/format.md checked against the real objects.

* :class:`FaultyBackend` wraps a real backend (local or S3). Every call of a scheduled actor first waits for the
  scheduler's go, which carries what happens to it: ``ok`` (it runs), ``fail`` (a transient error before its
  effect), ``lost`` (it runs, then its answer is lost: a transient error after the effect) or ``crash`` (the process
  dies there: this call and every later one of the actor has no effect, as after a SIGKILL).
* :class:`RetryingBackend` above it resends transient failures at once, as the S3 client does (a resent
  conditional PUT that in fact landed is refused by its own success).
* :class:`Scheduler` runs each actor (a writer, a repair) in its own thread and lets exactly one backend call of one
  actor proceed per step, so a test decides the interleaving and the fate of every call.
* :class:`StoreModel` holds the actors, the virtual clock that leases expire by, and the invariant checks.

Used by tests/test_store_model.py (a hypothesis state machine) on the local filesystem and on SeaweedFS.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import numpy as np

from xwin.schemas.store import CommitRecord, EntryKind
from xwin.storage.backend import Backend
from xwin.storage.entry import ArrayWrite, commit_entry, sha256_of, write_entry
from xwin.storage.errors import ClaimHeld
from xwin.storage.layout import hu_codec, ring_path, rings_path
from xwin.storage.local import LocalBackend
from xwin.storage.retry import retry
from xwin.storage.scope import Claim, Scope

MODES = ("ok", "fail", "lost", "crash")


class Crash(BaseException):
    """The actor's process died at this call: nothing it does from here on has an effect."""


class StepTimeout(AssertionError):
    """An actor neither reached its next backend call nor ended in time (a deadlock or a busy loop)."""


class Actor:
    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name, self.fn = name, fn
        self.pending: tuple[str, str] | None = None  # the (operation, key) it waits to perform
        self.grant: str | None = None
        self.dead = False
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.tokens: set[str] = set()  # the claim tokens it acquired (its attempt folders)
        self.thread: threading.Thread | None = None


class Scheduler:
    """One backend call of one actor per step. Threads that are not actors (checks, repairs run directly) pass."""

    def __init__(self, step_timeout_s: float = 20.0) -> None:
        self.cv = threading.Condition()
        self.by_thread: dict[int, Actor] = {}
        self.timeout = step_timeout_s
        self.trace: list[tuple[str, str, str, str]] = []  # (actor, operation, key, mode) of every granted call

    def current(self) -> Actor | None:
        return self.by_thread.get(threading.get_ident())

    def gate(self, op: str, key: str) -> str:
        a = self.current()
        if a is None:
            return "ok"
        if a.dead:
            raise Crash(a.name)
        with self.cv:
            a.pending = (op, key)
            self.cv.notify_all()
            while a.grant is None:
                self.cv.wait()
            mode, a.grant, a.pending = a.grant, None, None
        self.trace.append((a.name, op, key, mode))
        if mode == "crash":
            a.dead = True
            raise Crash(a.name)
        return mode

    def start(self, a: Actor) -> None:
        def run() -> None:
            self.by_thread[threading.get_ident()] = a
            try:
                a.result = a.fn()
            except BaseException as e:  # noqa: BLE001 - the actor's outcome, examined by the model
                a.error = e
            finally:
                with self.cv:
                    del self.by_thread[threading.get_ident()]  # thread ids are reused by later threads
                    a.finished = True
                    self.cv.notify_all()

        a.thread = threading.Thread(target=run, daemon=True, name=a.name)
        a.thread.start()
        self._settle(a)

    def step(self, a: Actor, mode: str) -> bool:
        """Let ``a``'s waiting call proceed with ``mode``; returns False when ``a`` waits for nothing."""
        with self.cv:
            if a.finished or a.pending is None:
                return False
            a.grant = mode
            self.cv.notify_all()
        self._settle(a)
        return True

    def _settle(self, a: Actor) -> None:
        with self.cv:
            ok = self.cv.wait_for(lambda: a.finished or (a.pending is not None and a.grant is None), self.timeout)
        if not ok:
            import sys
            import traceback

            frame = sys._current_frames().get(a.thread.ident) if a.thread is not None else None
            where = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "?"
            raise StepTimeout(f"{a.name} neither reached a backend call nor ended within {self.timeout}s:\n{where}")


def injected(what: str) -> ConnectionResetError:
    return ConnectionResetError(errno.ECONNRESET, f"injected fault: {what}")


class FaultyBackend(Backend):
    """``inner`` with every call of a scheduled actor gated by the scheduler and given its fate (module docstring).
    Deletes are checked against I5 before they take effect (``on_delete``)."""

    def __init__(self, inner: Backend, sched: Scheduler, on_delete: Callable[[str], None]) -> None:
        self.inner, self.sched, self.on_delete = inner, sched, on_delete
        self.url = inner.url

    def _call(self, op: str, key: str, fn: Callable[[], Any], effect: bool) -> Any:
        mode = self.sched.gate(op, key)
        if mode == "fail":
            raise injected(f"{op} {key} failed before its effect")
        if mode == "lost" and not effect:
            raise injected(f"{op} {key}: answer lost")
        try:
            out = fn()
        except Exception:
            if mode == "lost":  # whatever the answer was (a refusal too), it never arrives
                raise injected(f"{op} {key}: answer lost") from None
            raise
        if mode == "lost":
            raise injected(f"{op} {key} took effect, answer lost")
        return out

    def get(self, key: str):
        return self._call("get", key, lambda: self.inner.get(key), False)

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        return self._call(
            "put", key, lambda: self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match), True
        )

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        data = b"".join(pieces)
        self._call("put", key, lambda: self.inner.put_pieces(key, [data]), True)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        def go() -> None:
            if self.inner.exists(key):
                self.on_delete(key)
            self.inner.delete(key, if_match=if_match)

        self._call("delete", key, go, True)

    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        return self._call("get_range", key, lambda: self.inner.get_range(key, start, end), False)

    def read_all(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.inner.read_all(key), False)

    def exists(self, key: str) -> bool:
        return self._call("exists", key, lambda: self.inner.exists(key), False)

    def size(self, key: str) -> int:
        return self._call("size", key, lambda: self.inner.size(key), False)

    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        return self._call("list", prefix, lambda: self.inner.list(prefix, include_partial=include_partial), False)

    def zarr_store(self, sub: str = ""):
        return self.inner.zarr_store(sub)


class RetryingBackend(Backend):
    """Resends transient failures at once (up to ``attempts`` tries), as the S3 client does."""

    def __init__(self, inner: Backend, attempts: int = 2) -> None:
        self.inner, self.attempts = inner, attempts
        self.url = inner.url

    def _r(self, fn: Callable[[], Any], what: str) -> Any:
        return retry(fn, what=what, attempts=self.attempts, base_s=0.0)

    def get(self, key):
        return self._r(lambda: self.inner.get(key), f"get {key}")

    def put(self, key, data, *, if_match=None, if_none_match=False):
        return self._r(lambda: self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match), key)

    def put_pieces(self, key, pieces):
        data = b"".join(pieces)
        self._r(lambda: self.inner.put_pieces(key, [data]), key)

    def delete(self, key, *, if_match=None):
        self._r(lambda: self.inner.delete(key, if_match=if_match), key)

    def get_range(self, key, start, end):
        return self._r(lambda: self.inner.get_range(key, start, end), key)

    def read_all(self, key):
        return self._r(lambda: self.inner.read_all(key), key)

    def exists(self, key):
        return self._r(lambda: self.inner.exists(key), key)

    def size(self, key):
        return self._r(lambda: self.inner.size(key), key)

    def list(self, prefix, *, include_partial=False):
        return self._r(lambda: self.inner.list(prefix, include_partial=include_partial), prefix)

    def zarr_store(self, sub=""):
        return self.inner.zarr_store(sub)


def protocol_call(op: str, key: str) -> bool:
    """A call of the commit protocol, not of an attempt's data: claims, commit records, catalog, listings, deletes."""
    return op in ("list", "delete") or any(f"/{c}/" in key for c in ("_claims", "_commits", "_catalog"))


class VirtualClock:
    """The time leases are read against (``storage.scope`` and ``schemas.store``), moved only by the model."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        clock = self

        class _DT(datetime):
            @classmethod
            def now(cls, tz=None):  # type: ignore[override]
                return clock.now

        self._patches = [
            mock.patch("xwin.storage.scope.datetime", _DT),
            mock.patch("xwin.schemas.store._now", lambda: clock.now),
        ]

    def __enter__(self) -> VirtualClock:
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self._patches):
            p.stop()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


PREFIX = "datasets/model/h"
TTL_S = 300.0


def entry_base(vid: str) -> str:
    return ring_path(PREFIX, vid)


def entry_data(vid: str) -> np.ndarray:
    seed = int(hashlib.sha1(vid.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).integers(-1000, 1000, (2, 3, 4), dtype=np.int16)


def write_data(backend: Backend, path: str, vid: str) -> CommitRecord:
    """One entry's data under ``path`` (a real write_entry: metadata, one shard, group document, read-back)."""
    hu = entry_data(vid)
    write_entry(backend, path, {"vid": vid}, [ArrayWrite("hu", hu, hu.shape, hu_codec())])
    return CommitRecord(
        volume_id=vid,
        kind=EntryKind.volume,
        cohort="model",
        path=path,
        array="hu",
        shape=hu.shape,
        dtype="int16",
        nbytes=hu.nbytes,
        checksum=sha256_of(hu),
        writer="model",
    )


def expected_objects(vid: str) -> dict[str, bytes]:
    """The objects of one attempt of ``vid`` relative to its folder (every writer writes the same bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        b = LocalBackend(d)
        write_data(b, "a", vid)
        return {k[2:]: b.read_all(k) for k in b.list("a/")}


class ModelScope(Scope):
    """A scope whose claims have no heartbeat thread (renewals are steps of the writer) and whose acquisitions are
    recorded as the acquiring actor's tokens (I5: who owns which attempt folder)."""

    def __init__(self, backend: Backend, sched: Scheduler) -> None:
        super().__init__(backend, PREFIX, 1)
        self.entries = rings_path(PREFIX)
        self.sched = sched

    def acquire_claim(self, vid: str, owner: str, ttl_s: float, *, heartbeat: bool = True) -> Claim:
        c = super().acquire_claim(vid, owner, TTL_S, heartbeat=False)
        a = self.sched.current()
        if a is not None:
            a.tokens.add(c.token[:16])
        _CLAIMS[threading.get_ident()] = c
        return c


_CLAIMS: dict[int, Claim] = {}


def writer_program(scope: ModelScope, vid: str, owner: str, settled: Callable[[Scope, str], bool]) -> str:
    """What one series' render task does with its ring: the skip check, then the commit protocol around a write that
    renews the claim between its objects. Returns the status it reports: done, skipped or claimed-elsewhere."""
    if settled(scope, vid):
        return "skipped"

    def write(path: str) -> CommitRecord:
        claim = _CLAIMS[threading.get_ident()]
        claim.renew()  # a heartbeat between writes
        return write_data(scope.b, path, vid)

    try:
        wrote = commit_entry(scope, vid, entry_base(vid), lambda: sha256_of(entry_data(vid)), write, owner)
    except ClaimHeld:  # another live writer (or a takeover) has it
        return "claimed-elsewhere"
    return "done" if wrote else "skipped"


class StoreModel:
    """The store under test (``raw``: the real backend, for checks), racing actors, and the invariant checks."""

    def __init__(
        self,
        raw: Backend,
        vids: tuple[str, ...],
        *,
        settled: Callable[[Scope, str], bool],
        repair: Callable[[Scope], Any],
        checks: Iterable[str] = ("I1", "I2", "I3", "I4", "I5"),
    ) -> None:
        self.raw, self.vids, self.settled, self.repair_fn = raw, vids, settled, repair
        self.checks = set(checks)
        self.sched = Scheduler()
        self.faulty = FaultyBackend(raw, self.sched, self._on_delete)
        self.scope = ModelScope(RetryingBackend(self.faulty), self.sched)
        self.check_scope = Scope(raw, PREFIX, 1)  # unfaulted reads for the checks
        self.check_scope.entries = rings_path(PREFIX)
        self.expected = {v: expected_objects(v) for v in vids}
        self.actors: dict[str, Actor] = {}
        self.first_commit: dict[str, CommitRecord] = {}
        self.wrote: dict[str, list[str]] = {v: [] for v in vids}
        self.violations: list[str] = []
        self.runs = itertools.count()

    # ---- actors ---------------------------------------------------------------------------------------------------
    def idle(self, name: str) -> bool:
        a = self.actors.get(name)
        return a is None or a.finished

    def start_writer(self, name: str, vid: str) -> None:
        owner = f"{name}-{next(self.runs)}"
        a = Actor(name, lambda: (vid, writer_program(self.scope, vid, owner, self.settled)))
        self.actors[name] = a
        self.sched.start(a)
        self._finished(a)

    def start_repair(self, name: str = "repair") -> None:
        def run() -> tuple[str, Any]:
            before = set(self.check_scope.list_commits())
            self.repair_fn(self.scope)
            return "repair", before

        a = Actor(name, run)
        self.actors[name] = a
        self.sched.start(a)
        self._finished(a)

    def step(self, name: str, mode: str, *, to_protocol: bool = False) -> int:
        """Give ``name``'s waiting call the fate ``mode``. ``to_protocol``: first let its data calls (the writes and
        read-backs of its own attempt's objects) run, so ``mode`` falls on its next call on a claim, commit record,
        catalog bucket, listing or delete. Returns the number of calls made."""
        a = self.actors.get(name)
        n = 0
        if a is None:
            return n
        while to_protocol and a.pending is not None and not a.finished and not protocol_call(*a.pending):
            self.sched.step(a, "ok")
            n += 1
        if self.sched.step(a, mode):
            n += 1
        self._finished(a)
        return n

    def _finished(self, a: Actor) -> None:
        """I3/I4 when an actor's run ends: what it reports as done/skipped is committed and catalogued; a repair
        leaves every commit that existed when it began in the catalog and no row without a commit."""
        if not a.finished or a.dead or a.error is not None or getattr(a, "_seen", False):
            return
        a._seen = True  # type: ignore[attr-defined]
        what, status = a.result
        if what == "repair":
            commits = set(self.check_scope.list_commits())
            rows = {r.volume_id: r for r in self.check_scope.catalog()}
            if "I3" in self.checks:
                for v in sorted(status):
                    if v not in rows:
                        self.violations.append(f"I3: repair ended with commit {v} not in the catalog")
                for v in sorted(set(rows) - commits):
                    self.violations.append(f"I3: repair ended with catalog row {v} without a commit")
            return
        vid = what
        if status == "done":
            self.wrote[vid].append(a.name)
        if status in ("done", "skipped") and "I4" in self.checks:
            c = self.check_scope.get_commit(vid)
            row = self.check_scope.catalog_row(vid)
            if c is None:
                self.violations.append(f"I4: {a.name} reported {vid} {status} without a commit record")
            elif row is None or row.path != c.path:
                self.violations.append(f"I4/I3: {a.name} reported {vid} {status}, committed but not catalogued")

    # ---- I5 at each delete ----------------------------------------------------------------------------------------
    def _on_delete(self, key: str) -> None:
        a = self.sched.current()
        if a is None or "I5" not in self.checks:
            return
        vid = next((v for v in self.vids if key.startswith(entry_base(v) + "/")), None)
        if vid is None:
            return
        rest = key[len(entry_base(vid)) + 1 :].split("/", 1)[0]
        if not rest.startswith("attempt-"):
            return
        folder = f"{entry_base(vid)}/{rest}"
        c = self.check_scope.get_commit(vid)
        decided = {c.path} if c is not None else set()
        got = self.check_scope.get_claim(vid)
        if got is not None and got[0].state == "committing" and got[0].commit is not None:
            decided.add(got[0].commit.path)
        if folder in decided:
            self.violations.append(f"I5/I2: {a.name} deleted {key} of the decided attempt {folder}")
        elif rest[len("attempt-") :] not in a.tokens and not a.name.startswith("repair") and c is None:
            self.violations.append(f"I5: {a.name} deleted {key} of another writer's attempt of uncommitted {vid}")

    # ---- invariants after every step ------------------------------------------------------------------------------
    def check(self) -> None:
        for vid in self.vids:
            c = self.check_scope.get_commit(vid)
            got = self.check_scope.get_claim(vid)
            decided = got[0].commit if got is not None and got[0].state == "committing" else None
            if c is not None and "I1" in self.checks:
                first = self.first_commit.setdefault(vid, c)
                if c != first:
                    self.violations.append(f"I1: the commit of {vid} changed from {first.path} to {c.path}")
                if decided is not None and decided.path != c.path:
                    self.violations.append(f"I1: a second decision for {vid}: {decided.path} beside {c.path}")
                if len(self.wrote[vid]) > 1:
                    self.violations.append(f"I1: {vid} reported written by {self.wrote[vid]}")
            if "I2" in self.checks:
                for rec, what in ((c, "commit"), (decided, "decided claim")):
                    if rec is not None:
                        self._intact(vid, rec.path, what)
        assert not self.violations, self.violations

    def _intact(self, vid: str, path: str, what: str) -> None:
        for rel, data in self.expected[vid].items():
            got = self.raw.get(f"{path}/{rel}")
            if got is None or got[0] != data:
                self.violations.append(
                    f"I2: {path}/{rel} of the {what} of {vid} is {'gone' if got is None else 'changed'}"
                )
                return

    # ---- the end of a run -----------------------------------------------------------------------------------------
    def finish(self, clock: VirtualClock) -> None:
        """Every live actor runs to its end without faults; the leases expire; a repair runs (alone, no faults); then
        one clean rerun of every entry. After it: I1-I5, catalog = commits, every entry committed and intact, no
        attempt folder but the committed ones, no claim left."""
        for a in list(self.actors.values()):
            self.run_to_end(a)
        self.check()
        clock.advance(10 * TTL_S)
        self.start_repair("repair-final")
        self.run_to_end(self.actors["repair-final"])
        assert self.actors["repair-final"].error is None, self.actors["repair-final"].error
        self.check()
        for v in self.vids:
            self.start_writer(f"rerun-{v}", v)
            a = self.actors[f"rerun-{v}"]
            self.run_to_end(a)
            assert a.error is None and a.result[1] in ("done", "skipped"), (v, a.result, a.error)
        self.check()
        commits = set(self.check_scope.list_commits())
        rows = {r.volume_id: r for r in self.check_scope.catalog()}
        assert commits == set(self.vids) == set(rows), (commits, rows)
        for v in self.vids:
            c = self.check_scope.get_commit(v)
            assert c is not None and rows[v].path == c.path
            left = {k[len(entry_base(v)) + 1 :].split("/", 1)[0] for k in self.raw.list(entry_base(v) + "/")}
            assert left <= {c.path.rsplit("/", 1)[1], "zarr.json"}, (v, left)
        assert not self.check_scope.list_claims(), self.check_scope.list_claims()

    def run_to_end(self, a: Actor, limit: int = 2000) -> None:
        for _ in range(limit):
            if not self.sched.step(a, "ok"):
                break
        assert a.finished, f"{a.name} did not end within {limit} calls"
        self._finished(a)

    def close(self) -> None:
        for a in self.actors.values():  # a thread still waiting for a step: let it die without effect
            if not a.finished:
                a.dead = True
                with self.sched.cv:
                    a.grant = "crash"
                    self.sched.cv.notify_all()
