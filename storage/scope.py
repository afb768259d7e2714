"""A *scope* is one commit domain: the canonical volumes, or one projection dataset (cohort + spec hash).

Each scope owns three kinds of control objects under its prefix (docs/format.md):

* ``_commits/<volume_id>.json`` — :class:`CommitRecord`, created once with create-if-absent after the data was
  written and verified. Its existence is what makes an entry visible.
* ``_catalog/<b>.json`` — catalog buckets (``b`` = the first ``bucket_hex`` hex digits of sha1(volume_id): 256
  buckets in stores created since 2026-11-24, 16 in older ones, as the store index says), each a JSON list of
  :class:`CatalogRow`; updated by compare-and-swap, rebuilt from commit records by :meth:`Scope.rebuild_catalog`.
  A commit rewrites one bucket: at NLST scale (26k volumes) ~100 rows with 256 buckets instead of ~1,600 with 16
  (the time and bytes per commit: docs/benchmarks.md, Store).
* ``_claims/<volume_id>.json`` — :class:`ClaimRecord` leases (one writer per volume), the fencing objects of the
  commit protocol (:mod:`xwin.storage.entry`, docs/format.md): a holder decides its commit by one compare-and-swap
  of its own claim, conditional on the claim's server ETag, so a holder that lost its lease commits nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from xwin.schemas.store import CatalogRow, ClaimRecord, CommitRecord, EntryStatus
from xwin.storage.backend import Backend
from xwin.storage.errors import ClaimHeld, ClaimLost, ConflictError

DEFAULT_BUCKET_HEX = 2  # new stores: 16**2 = 256 catalog buckets per scope
# The lease of a claim. The holder renews it every ttl/4; another writer takes it over only once it has expired
# (or its holder is provably dead). A writer that stalls past it loses the claim and commits nothing.
DEFAULT_CLAIM_TTL_S = 300.0


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_identity() -> dict[str, Any]:
    """What identifies this process beyond host + pid: the kernel boot id, the pid namespace, the process start
    time (Linux; None elsewhere, where only lease expiry frees a claim)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    return {
        "boot_id": boot.strip() if boot else None,
        "pid_ns": _pid_namespace(),
        "start_ticks": _start_ticks(os.getpid()),
    }


def holder_is_dead(c: ClaimRecord) -> bool:
    """True only when ``c``'s holder provably no longer runs: it ran under this kernel boot and in this pid
    namespace (so its pid means the same process here) and that pid is gone or now names a process started at
    another time. Claims without that identity (older claims, other machines, other containers) never count."""
    if c.boot_id is None or c.pid_ns is None or c.start_ticks is None or c.pid <= 0:
        return False
    me = process_identity()
    if c.boot_id != me["boot_id"] or c.pid_ns != me["pid_ns"]:
        return False
    if c.pid == os.getpid():
        return c.start_ticks != me["start_ticks"]
    return _start_ticks(c.pid) != c.start_ticks


def _bucket(volume_id: str, hex_digits: int) -> str:
    return hashlib.sha1(volume_id.encode()).hexdigest()[:hex_digits]


_HELD: dict[tuple[str, str], Claim] = {}  # (store url, claim key) -> the claim this process holds (re-entrancy)
_HELD_LOCK = threading.Lock()


class Claim:
    """A held lease: the claim record this process wrote and the server ETag it got back. Renewed in a background
    thread every ttl/4 by a compare-and-swap on that ETag; a failed swap means another writer took the claim over
    (``lost``), after which :meth:`decide` refuses and :meth:`release` deletes nothing."""

    def __init__(self, scope: Scope, record: ClaimRecord, etag: str, heartbeat: bool = True) -> None:
        self.scope, self.record, self.etag = scope, record, etag
        self.volume_id, self.owner = record.volume_id, record.owner
        self.ttl_s = (record.expires_at - record.acquired_at).total_seconds()
        self._lock = threading.Lock()  # one compare-and-swap on the claim at a time (heartbeat vs decide/release)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.decided = False
        self.thread = threading.get_ident()  # the thread that holds it (re-entry is per thread)
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"claim-{self.volume_id}")
            self._thread.start()

    @property
    def token(self) -> str:
        return self.record.token

    @property
    def attempt(self) -> str:
        """The path segment this holder's data goes under (``attempt-<token>``)."""
        return self.record.attempt

    def owns(self, rec: ClaimRecord) -> bool:
        """Whether ``rec`` (a claim read from the server) is this holder's: same token and generation. Ownership is
        decided by the token alone, never by the rest of the record (expiry, state), which our own writes change."""
        return bool(rec.token) and rec.token == self.token and rec.generation == self.record.generation

    def _swap(self, update: Callable[[ClaimRecord], ClaimRecord]) -> ClaimRecord:
        """Replace the claim with ``update(current record)`` if it is still the one we hold (If-Match our ETag). The
        new record is built under the lock, so a heartbeat never writes back a copy older than a decision.

        A refused swap is checked against the server before the claim counts as lost: a write of ours that landed
        but whose answer was lost (a timeout, a 5xx; this swap's own resend, or an earlier renewal that raised) left
        our ETag stale. If the claim on the server still carries our token and generation it is still ours: we take
        its ETag and record and apply ``update`` to that. Any other claim, or none, means it was taken over (or
        rolled forward and removed): ClaimLost."""
        with self._lock:
            if self.lost:
                raise self._lost_error()
            key = self.scope.claim_key(self.volume_id)
            for _ in range(5):
                rec = update(self.record)
                try:
                    self.etag = self.scope.b.put(key, rec.model_dump_json().encode(), if_match=self.etag)
                    self.record = rec
                    return rec
                except ConflictError:
                    landed = self.scope.get_claim(self.volume_id)
                    if landed is None or not self.owns(landed[0]):
                        self.lost = True
                        raise self._lost_error() from None
                    self.record, self.etag = landed
                    if landed[0] == rec:  # this very write landed, its answer was lost
                        return rec
            raise RuntimeError(f"claim on {self.volume_id!r} in {self.scope.prefix} kept changing under its holder")

    def _lost_error(self) -> ClaimLost:
        cur = self.scope.get_claim(self.volume_id)
        holder = cur[0] if cur is not None else self.record
        return ClaimLost(self.volume_id, holder)

    def renew(self) -> None:
        """Extend the lease by ttl from now (compare-and-swap). Raises ClaimLost when it was taken over."""

        def extend(cur: ClaimRecord) -> ClaimRecord:
            return cur.model_copy(update={"expires_at": datetime.now(UTC) + timedelta(seconds=self.ttl_s)})

        self._swap(extend)

    def _beat(self) -> None:
        while not self._stop.wait(max(0.2, self.ttl_s / 4)):
            try:
                self.renew()
            except ClaimLost:
                return
            except Exception:  # noqa: BLE001 - a failed renewal (transient) is retried on the next beat
                continue

    def check(self) -> None:
        """Raise ClaimLost when a renewal found the claim taken over (cheap: no request)."""
        if self.lost:
            raise self._lost_error()

    def decide(self, commit: CommitRecord) -> None:
        """The commit point: swap our claim into ``state="committing"`` carrying ``commit``, conditional on still
        holding it. After this the commit is decided: creating the commit record and the catalog row are
        idempotent steps any party may complete (:meth:`Scope.roll_forward`). Raises ClaimLost otherwise."""

        def committing(cur: ClaimRecord) -> ClaimRecord:
            now = datetime.now(UTC)
            return cur.model_copy(
                update={"state": "committing", "commit": commit, "expires_at": now + timedelta(seconds=self.ttl_s)}
            )

        self._swap(committing)
        self.decided = True

    def decided_on_server(self, path: str | None = None) -> bool:
        """Whether our commit is decided, asked of the server after a decide that raised without a clear answer (a
        lost response, an interrupt between the swap and ``decided``): the claim is ours and ``committing``, or the
        commit record names our attempt ``path`` (another writer rolled our decision forward and removed the claim).
        Unknown (the server does not answer) counts as decided: nothing a commit may point at is deleted."""
        if self.decided:
            return True
        try:
            cur = self.scope.get_claim(self.volume_id)
            if cur is not None and self.owns(cur[0]) and cur[0].state == "committing":
                self.decided = True
            elif path is not None:
                c = self.scope.get_commit(self.volume_id)
                self.decided = c is not None and c.path == path
        except Exception:  # noqa: BLE001 - unknown: assume decided, so nothing it may point at is deleted
            return True
        return self.decided

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop renewing and delete the claim if (and only if) it is still the one we hold. A decided claim stays
        unless its commit record exists and its catalog row names the same data: the next writer, the skip check or
        a repair rolls it forward (:meth:`Scope.roll_forward`), so a commit whose catalog write failed is never left
        without a trace."""
        self.stop()
        with self._lock:
            if self.lost:
                return
            if self.decided:
                try:
                    c = self.scope.get_commit(self.volume_id)
                    row = self.scope.catalog_row(self.volume_id) if c is not None else None
                except Exception:  # noqa: BLE001 - unknown: the decided claim stays for a roll-forward
                    row = c = None
                if c is None or row is None or row.path != c.path:
                    self.lost = True
                    return
            with contextlib.suppress(ConflictError):  # taken over meanwhile: it is not ours to delete
                self.scope.b.delete(self.scope.claim_key(self.volume_id), if_match=self.etag)
            self.lost = True  # released: nothing more may be done in its name


class Scope:
    def __init__(
        self, backend: Backend, prefix: str, bucket_hex: int = DEFAULT_BUCKET_HEX, entries: str | None = None
    ) -> None:
        if bucket_hex not in (1, 2, 3):
            raise ValueError(f"catalog bucket width must be 1-3 hex digits, got {bucket_hex}")
        self.b = backend
        self.prefix = prefix.strip("/")
        self.bucket_hex = bucket_hex
        # the folder that holds one folder per entry (``<entries>/<volume_id>/attempt-<token>/``): where repairs look
        # for attempt folders no commit names (None: not known, no such search)
        self.entries = entries.strip("/") if entries else None

    def buckets(self) -> list[str]:
        return [f"{i:0{self.bucket_hex}x}" for i in range(16**self.bucket_hex)]

    def bucket_of(self, vid: str) -> str:
        return _bucket(vid, self.bucket_hex)

    def __repr__(self) -> str:
        return f"Scope({self.prefix!r})"

    # ---- keys -------------------------------------------------------------------------------------------------
    def commit_key(self, vid: str) -> str:
        return f"{self.prefix}/_commits/{vid}.json"

    def claim_key(self, vid: str) -> str:
        return f"{self.prefix}/_claims/{vid}.json"

    def bucket_key(self, b: str) -> str:
        return f"{self.prefix}/_catalog/{b}.json"

    # ---- commits ----------------------------------------------------------------------------------------------
    def get_commit(self, vid: str) -> CommitRecord | None:
        got = self.b.get(self.commit_key(vid))
        return None if got is None else CommitRecord.model_validate_json(got[0])

    def has_commit(self, vid: str) -> bool:
        return self.b.exists(self.commit_key(vid))

    def put_commit(self, rec: CommitRecord) -> CommitRecord:
        """Create the commit record once. If one exists already, return the existing one (first writer wins)."""
        try:
            self.b.put(self.commit_key(rec.volume_id), rec.model_dump_json(indent=1).encode(), if_none_match=True)
            return rec
        except ConflictError:
            existing = self.get_commit(rec.volume_id)
            if existing is None:  # pragma: no cover - deleted between the two calls
                raise
            return existing

    def list_commits(self) -> list[str]:
        """Volume ids of all commit records (lists the store: for rebuild/verify, not for readers)."""
        keys = self.b.list(f"{self.prefix}/_commits/")
        return sorted(k.rsplit("/", 1)[1][: -len(".json")] for k in keys if k.endswith(".json"))

    # ---- catalog ----------------------------------------------------------------------------------------------
    def _read_bucket(self, b: str) -> tuple[list[CatalogRow], str | None]:
        got = self.b.get(self.bucket_key(b))
        if got is None:
            return [], None
        return [CatalogRow.model_validate(r) for r in json.loads(got[0])], got[1]

    def catalog(self) -> list[CatalogRow]:
        # one listing of this scope's _catalog/ (at most 16**bucket_hex small keys), then only the buckets that exist
        names = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in self.b.list(f"{self.prefix}/_catalog")}
        buckets = [b for b in self.buckets() if b in names]
        with ThreadPoolExecutor(max_workers=16) as ex:
            parts = list(ex.map(lambda b: self._read_bucket(b)[0], buckets))
        return sorted((r for p in parts for r in p), key=lambda r: r.volume_id)

    def catalog_row(self, vid: str) -> CatalogRow | None:
        for r in self._read_bucket(self.bucket_of(vid))[0]:
            if r.volume_id == vid:
                return r
        return None

    def _cas_bucket(self, b: str, mutate) -> None:
        for attempt in range(50):
            rows, etag = self._read_bucket(b)
            new = mutate({r.volume_id: r for r in rows})
            if new is None:
                return
            data = json.dumps(
                [r.model_dump(mode="json") for r in sorted(new.values(), key=lambda r: r.volume_id)], indent=0
            ).encode()
            try:
                if etag is None:
                    self.b.put(self.bucket_key(b), data, if_none_match=True)
                else:
                    self.b.put(self.bucket_key(b), data, if_match=etag)
                return
            except ConflictError:
                time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
        raise RuntimeError(f"catalog bucket {self.bucket_key(b)} stayed contended after 50 attempts")

    def catalog_add(self, row: CatalogRow) -> None:
        self.catalog_add_many([row])

    def catalog_add_many(self, rows: Iterable[CatalogRow]) -> None:
        """Add (or replace) rows: one compare-and-swap per bucket touched, whatever the number of rows."""
        by_bucket: dict[str, dict[str, CatalogRow]] = {}
        for r in rows:
            by_bucket.setdefault(self.bucket_of(r.volume_id), {})[r.volume_id] = r
        for b, add in by_bucket.items():

            def mutate(cur: dict[str, CatalogRow], add: dict[str, CatalogRow] = add) -> dict[str, CatalogRow] | None:
                if all(cur.get(k) == r for k, r in add.items()):
                    return None
                cur.update(add)
                return cur

            self._cas_bucket(b, mutate)

    def repair_catalog(self) -> tuple[list[str], list[str]]:
        """Make the catalog say what the commit records hold: add (or correct) the row of every commit record and
        drop every row whose entry has no commit record. Safe while writers run: each bucket is rewritten by
        compare-and-swap, and a row is dropped only if its commit record is still absent at that moment (a row is
        only ever added after its commit record). Returns (volume ids added, volume ids dropped)."""
        want: dict[str, CatalogRow] = {}
        for vid in self.list_commits():
            c = self.get_commit(vid)
            if c is not None:
                want[vid] = row_of(c)
        have = {r.volume_id: r for r in self.catalog()}
        added = sorted(v for v, r in want.items() if have.get(v) != r)
        dropped: list[str] = []
        for b in sorted({self.bucket_of(v) for v in added} | {self.bucket_of(v) for v in have if v not in want}):
            gone: list[str] = []

            def mutate(rows: dict[str, CatalogRow], b: str = b, gone: list[str] = gone) -> dict[str, CatalogRow] | None:
                gone.clear()
                new = dict(rows)
                new.update({v: r for v, r in want.items() if self.bucket_of(v) == b})
                for v in [v for v in new if v not in want]:
                    if not self.has_commit(v):
                        del new[v]
                        gone.append(v)
                return None if new == rows else new

            self._cas_bucket(b, mutate)
            dropped += gone
        return added, sorted(dropped)

    def bucket_nbytes(self) -> dict[str, int]:
        """Size in bytes of each catalog bucket object that exists."""
        keys = self.b.list(f"{self.prefix}/_catalog")
        return {k.rsplit("/", 1)[-1].removesuffix(".json"): self.b.size(k) for k in keys}

    def rebuild_catalog(self) -> int:
        """Make the catalog equal to the commit records (adds missed rows, drops rows without a commit)."""
        commits = {}
        for vid in self.list_commits():
            c = self.get_commit(vid)
            if c is not None:
                commits[vid] = row_of(c)
        by_bucket: dict[str, dict[str, CatalogRow]] = {b: {} for b in self.buckets()}
        for vid, r in commits.items():
            by_bucket[self.bucket_of(vid)][vid] = r
        for b, want in by_bucket.items():

            def mutate(rows: dict[str, CatalogRow], want: dict[str, CatalogRow] = want) -> dict[str, CatalogRow] | None:
                # a row committed after the listing above stays (its commit record exists now)
                new = dict(want)
                new.update({k: r for k, r in rows.items() if k not in want and self.has_commit(k)})
                return None if rows == new else new

            self._cas_bucket(b, mutate)
        return len(commits)

    # ---- claims -----------------------------------------------------------------------------------------------
    def get_claim(self, vid: str) -> tuple[ClaimRecord, str] | None:
        got = self.b.get(self.claim_key(vid))
        if got is None:
            return None
        try:
            return ClaimRecord.model_validate_json(got[0]), got[1]
        except ValueError:  # unreadable claim: treat as expired
            now = datetime.now(UTC)
            return ClaimRecord(volume_id=vid, owner="?", host="?", pid=0, acquired_at=now, expires_at=now), got[1]

    def claim_is_stale(self, c: ClaimRecord) -> bool:
        """Whether ``c`` may be taken over: its lease expired, or its holder is provably dead (``holder_is_dead``)."""
        return c.expired() or holder_is_dead(c)

    def settled(self, vid: str) -> CommitRecord | None:
        """The check a rerun skips an entry by: its commit record, once the catalog row is known to name it (a
        missing or stale row is written first), so whatever is skipped is committed and catalogued. A decided
        commit not completed yet (a ``committing`` claim whose writer died) is completed here. None: not committed."""
        c = self.get_commit(vid)
        if c is None:
            got = self.get_claim(vid)
            if got is None or got[0].state != "committing":
                return None
            return self.roll_forward(vid, *got)
        if self.catalog_row(vid) != row_of(c):
            self.catalog_add(row_of(c))
        return c

    def roll_forward(self, vid: str, claim: ClaimRecord, etag: str) -> CommitRecord | None:
        """Complete a decided commit (a claim in ``state="committing"``): create its commit record if absent, add
        its catalog row, then delete the claim if unchanged. Returns the commit record in force."""
        if claim.state != "committing" or claim.commit is None:
            return None
        committed = self.put_commit(claim.commit)
        self.catalog_add(row_of(committed))
        with contextlib.suppress(ConflictError):
            self.b.delete(self.claim_key(vid), if_match=etag)
        return committed

    def acquire_claim(self, vid: str, owner: str, ttl_s: float, *, heartbeat: bool = True) -> Claim:
        """Take the lease on ``vid`` with a fresh fencing token. Raises ClaimHeld when another holder's lease is live.

        A claim found in ``state="committing"`` is a decided commit: it is rolled forward first (whoever holds it),
        then the claim is taken as usual (its caller will find the commit record)."""
        for _ in range(20):
            now = datetime.now(UTC)
            cur = self.get_claim(vid)
            generation = 1
            if cur is not None:
                holder, etag = cur
                if holder.state == "committing":
                    self.roll_forward(vid, holder, etag)
                    continue
                if not self.claim_is_stale(holder):
                    raise ClaimHeld(vid, holder)
                generation = holder.generation + 1
            rec = ClaimRecord(
                volume_id=vid,
                owner=owner,
                host=socket.gethostname(),
                pid=os.getpid(),
                acquired_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
                token=uuid.uuid4().hex,
                generation=generation,
                **process_identity(),
            )
            data = rec.model_dump_json().encode()
            try:
                if cur is None:
                    new_etag = self.b.put(self.claim_key(vid), data, if_none_match=True)
                else:
                    new_etag = self.b.put(self.claim_key(vid), data, if_match=cur[1])
            except ConflictError:
                landed = self.get_claim(vid)  # a PUT that landed but whose answer was lost is refused when resent
                if landed is not None and landed[0] == rec:
                    return Claim(self, rec, landed[1], heartbeat=heartbeat)
                time.sleep(random.uniform(0.005, 0.03))
                continue
            return Claim(self, rec, new_etag, heartbeat=heartbeat)
        raise RuntimeError(f"could not settle the claim on {vid!r} in {self.prefix}")

    def attempt_folders(self, vid: str | None = None) -> dict[str, dict[str, int]]:
        """Entry id -> {path of an attempt folder under it: its object count}, from one listing of the entries'
        folder (or of one entry's). Temporary objects of unfinished local writes count."""
        if self.entries is None:
            return {}
        root = self.entries + "/" + (f"{vid}/" if vid else "")
        n = len(self.entries) + 1
        out: dict[str, dict[str, int]] = {}
        for k in self.b.list(root, include_partial=True):
            parts = k[n:].split("/")
            if len(parts) >= 3 and parts[1].startswith("attempt-"):
                folders = out.setdefault(parts[0], {})
                f = f"{self.entries}/{parts[0]}/{parts[1]}"
                folders[f] = folders.get(f, 0) + 1
        return out

    def remove_orphans(self, vid: str, owner: str = "repair") -> list[str]:
        """Delete the attempt folders of ``vid`` that its commit record does not name, fenced: the claim on ``vid`` is
        taken first (only when it is absent or stale, else ClaimHeld; a decided claim is rolled forward first), so
        no writer can decide an attempt while its folder goes, and a stalled writer that resumes is refused. The
        claim is released after (a stale claim left by a dead writer goes with it). Returns the folders removed."""
        with self.claim(vid, owner, heartbeat=False):
            c = self.get_commit(vid)
            keep = c.path if c is not None else None
            gone = sorted(f for f in self.attempt_folders(vid).get(vid, {}) if f != keep)
            for f in gone:
                self.b.delete_prefix(f)
        return gone

    def list_claims(self) -> list[ClaimRecord]:
        out = []
        for k in self.b.list(f"{self.prefix}/_claims/"):
            if k.endswith(".json"):
                got = self.get_claim(k.rsplit("/", 1)[1][: -len(".json")])
                if got is not None:
                    out.append(got[0])
        return out

    def held_claim(self, vid: str) -> Claim | None:
        """The claim on ``vid`` this process holds now (inside a :meth:`claim` block), if any."""
        with _HELD_LOCK:
            return _HELD.get((self.b.url, self.claim_key(vid)))

    @contextlib.contextmanager
    def claim(
        self, vid: str, owner: str | None = None, ttl_s: float = DEFAULT_CLAIM_TTL_S, heartbeat: bool = True
    ) -> Iterator[Claim]:
        """Hold the single-writer lease on ``vid`` for the block. Re-entrant for the same owner in this process
        (the inner block gets the outer :class:`Claim`, whose token and ETag the commit is fenced by)."""
        owner = owner or default_owner()
        key = (self.b.url, self.claim_key(vid))
        with _HELD_LOCK:
            outer = _HELD.get(key)
        if outer is not None and outer.owner == owner and outer.thread == threading.get_ident() and not outer.lost:
            yield outer  # re-entry by the same owner in the same thread; another thread must take the claim itself
            return
        c = self.acquire_claim(vid, owner, ttl_s, heartbeat=heartbeat)
        with _HELD_LOCK:
            _HELD[key] = c
        try:
            yield c
        finally:
            with _HELD_LOCK:
                if _HELD.get(key) is c:
                    del _HELD[key]
            c.release()

    def entry_status(self) -> dict[str, int]:
        """Counts per EntryStatus: committed from the catalog, in-progress / stale from the (small) claims prefix."""
        counts = {s.value: 0 for s in EntryStatus}
        committed = {r.volume_id for r in self.catalog()}
        counts[EntryStatus.committed.value] = len(committed)
        for c in self.list_claims():
            if c.volume_id in committed:
                continue
            key = EntryStatus.stale_claim if self.claim_is_stale(c) else EntryStatus.in_progress
            counts[key.value] += 1
        return counts


def row_of(c: CommitRecord) -> CatalogRow:
    return CatalogRow(
        volume_id=c.volume_id,
        kind=c.kind,
        cohort=c.cohort,
        spec_hash=c.spec_hash,
        status=EntryStatus.committed,
        path=c.path,
        shape=c.shape,
        dtype=c.dtype,
        nbytes=c.nbytes,
        checksum=c.checksum,
        committed_at=c.committed_at,
    )
