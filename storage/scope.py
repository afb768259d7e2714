"""A *scope* is one commit domain: the canonical volumes, or one projection dataset (cohort + spec hash).

Each scope owns three kinds of control objects under its prefix (docs/format.md):

* ``_commits/<volume_id>.json`` — :class:`CommitRecord`, created once with create-if-absent after the data was
  written and verified. Its existence is what makes an entry visible.
* ``_catalog/<b>.json`` — catalog buckets (``b`` = the first ``bucket_hex`` hex digits of sha1(volume_id): 256
  buckets in stores created since 2026-11-24, 16 in older ones, as the store index says), each a JSON list of
  :class:`CatalogRow`; updated by compare-and-swap, rebuilt from commit records by :meth:`Scope.rebuild_catalog`.
  A commit rewrites one bucket: at NLST scale (26k volumes) ~100 rows with 256 buckets instead of ~1,600 with 16
  (the time and bytes per commit: docs/benchmarks.md, Store).
* ``_claims/<volume_id>.json`` — :class:`ClaimRecord` leases (one writer per volume).
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
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from xwin.schemas.store import CatalogRow, ClaimRecord, CommitRecord, EntryStatus
from xwin.storage.backend import Backend
from xwin.storage.errors import ClaimHeld, ConflictError

DEFAULT_BUCKET_HEX = 2  # new stores: 16**2 = 256 catalog buckets per scope


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bucket(volume_id: str, hex_digits: int) -> str:
    return hashlib.sha1(volume_id.encode()).hexdigest()[:hex_digits]


class Claim:
    """A held lease; renewed in a background thread every ttl/3 until released."""

    def __init__(self, scope: Scope, volume_id: str, owner: str, ttl_s: float, heartbeat: bool) -> None:
        self.scope, self.volume_id, self.owner, self.ttl_s = scope, volume_id, owner, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"claim-{volume_id}")
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl_s / 3)):
            try:
                self.scope.acquire_claim(self.volume_id, self.owner, self.ttl_s)
            except ClaimHeld:
                self.lost = True
                return
            except Exception:  # noqa: BLE001 - a failed renewal is retried on the next beat
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.scope.release_claim(self.volume_id, self.owner)


class Scope:
    def __init__(self, backend: Backend, prefix: str, bucket_hex: int = DEFAULT_BUCKET_HEX) -> None:
        if bucket_hex not in (1, 2, 3):
            raise ValueError(f"catalog bucket width must be 1-3 hex digits, got {bucket_hex}")
        self.b = backend
        self.prefix = prefix.strip("/")
        self.bucket_hex = bucket_hex

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
            self._cas_bucket(b, lambda rows, want=want: None if rows == want else dict(want))
        return len(commits)

    # ---- claims -----------------------------------------------------------------------------------------------
    def get_claim(self, vid: str) -> tuple[ClaimRecord, str] | None:
        got = self.b.get(self.claim_key(vid))
        if got is None:
            return None
        try:
            return ClaimRecord.model_validate_json(got[0]), got[1]
        except ValueError:  # unreadable claim: treat as stale
            now = datetime.now(UTC)
            return ClaimRecord(volume_id=vid, owner="?", host="?", pid=0, acquired_at=now, expires_at=now), got[1]

    def claim_is_stale(self, c: ClaimRecord) -> bool:
        if c.expired():
            return True
        return c.host == socket.gethostname() and c.pid > 0 and c.pid != os.getpid() and not _pid_alive(c.pid)

    def acquire_claim(self, vid: str, owner: str, ttl_s: float) -> ClaimRecord:
        """Take or renew the lease on ``vid``. Raises ClaimHeld when another live owner holds it."""
        for _ in range(20):
            now = datetime.now(UTC)
            cur = self.get_claim(vid)
            acquired = now
            if cur is not None:
                holder = cur[0]
                if holder.owner != owner and not self.claim_is_stale(holder):
                    raise ClaimHeld(vid, holder)
                if holder.owner == owner:
                    acquired = holder.acquired_at
            rec = ClaimRecord(
                volume_id=vid,
                owner=owner,
                host=socket.gethostname(),
                pid=os.getpid(),
                acquired_at=acquired,
                expires_at=now + timedelta(seconds=ttl_s),
            )
            try:
                if cur is None:
                    self.b.put(self.claim_key(vid), rec.model_dump_json().encode(), if_none_match=True)
                else:
                    self.b.put(self.claim_key(vid), rec.model_dump_json().encode(), if_match=cur[1])
                return rec
            except ConflictError:
                time.sleep(random.uniform(0.005, 0.03))
        raise RuntimeError(f"could not settle the claim on {vid!r} in {self.prefix}")

    def release_claim(self, vid: str, owner: str) -> None:
        cur = self.get_claim(vid)
        if cur is not None and cur[0].owner == owner:
            self.b.delete(self.claim_key(vid))

    def list_claims(self) -> list[ClaimRecord]:
        out = []
        for k in self.b.list(f"{self.prefix}/_claims/"):
            if k.endswith(".json"):
                got = self.get_claim(k.rsplit("/", 1)[1][: -len(".json")])
                if got is not None:
                    out.append(got[0])
        return out

    @contextlib.contextmanager
    def claim(
        self, vid: str, owner: str | None = None, ttl_s: float = 600.0, heartbeat: bool = True
    ) -> Iterator[Claim]:
        """Hold the single-writer lease on ``vid`` for the block (re-entrant for the same owner)."""
        owner = owner or default_owner()
        prev = self.get_claim(vid)
        reentrant = prev is not None and prev[0].owner == owner and not prev[0].expired()
        self.acquire_claim(vid, owner, ttl_s)
        c = Claim(self, vid, owner, ttl_s, heartbeat=heartbeat and not reentrant)
        try:
            yield c
        finally:
            if reentrant:
                c._stop.set()
            else:
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
