"""The xwin store: canonical HU volumes and projection datasets in one sharded Zarr v3 hierarchy (docs/format.md).

A :class:`Store` is a handle on one root (a local path or ``s3://bucket/prefix``): the store index, the canonical
volumes (one commit domain) and the projection datasets (:mod:`xwin.storage.dataset`, one commit domain each).
Every entry is written by the protocol of :mod:`xwin.storage.entry`.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from jaxtyping import Int16, Integer

from xwin.schemas.cohort import SplitsDoc
from xwin.schemas.ingest import VolumeRecord
from xwin.schemas.render import RenderSpec
from xwin.schemas.store import (
    CatalogRow,
    CommitRecord,
    DatasetInfo,
    EntryKind,
    ScopeStatus,
    StoreStatus,
    VerifyReport,
)
from xwin.storage.backend import Backend, make_backend
from xwin.storage.dataset import ProjectionDataset
from xwin.storage.entry import ArrayWrite, commit_entry, ensure_group, library_versions, sha256_of, write_entry
from xwin.storage.errors import ConflictError, DatasetLookupError, NotCommitted, StorageError
from xwin.storage.layout import (
    DEFAULT_VIEW_CODEC,
    FORMAT_NAME,
    FORMAT_VERSION,
    HU_CHUNK_Z,
    INDEX_KEY,
    VOLUMES,
    check_id,
    dataset_path,
    hu_codec,
    spec_key,
    splits_key,
    volume_path,
)
from xwin.storage.retry import RetryingStore
from xwin.storage.scope import DEFAULT_BUCKET_HEX, Scope, default_owner
from xwin.storage.shardwrite import encode_pool
from xwin.storage.verify import verify_scope


class Store:
    """Handle on one store root (local path or ``s3://bucket/prefix``). Cheap to create; picklable (reopens)."""

    def __init__(
        self, url: str | os.PathLike[str], storage_options: dict | None = None, *, create: bool = True
    ) -> None:
        self._url_arg, self._opts = str(url), storage_options
        self.backend: Backend = make_backend(url, storage_options)
        self.url = self.backend.url
        self._zstore: RetryingStore | None = None
        self._lock = threading.Lock()
        self.bucket_hex = self._check_or_init(create)
        self.volumes = Scope(self.backend, VOLUMES, self.bucket_hex, entries=VOLUMES)

    def __reduce__(self):
        return (Store, (self._url_arg, self._opts))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def zstore(self):
        with self._lock:
            if self._zstore is None:
                self._zstore = RetryingStore(self.backend.zarr_store())
            return self._zstore

    # ---- store index --------------------------------------------------------------------------------------------
    def _read_index(self) -> tuple[dict, str | None]:
        got = self.backend.get(INDEX_KEY)
        if got is None:
            return {}, None
        return json.loads(got[0]), got[1]

    def _check_or_init(self, create: bool) -> int:
        """Check (or create) the store index; returns the catalog bucket width (hex digits) of this store."""
        idx, _ = self._read_index()
        if idx:
            if idx.get("format") != FORMAT_NAME or idx.get("format_version") != FORMAT_VERSION:
                raise StorageError(f"{self.url}: not an {FORMAT_NAME} v{FORMAT_VERSION} store ({idx.get('format')!r})")
            return int(idx.get("catalog_bucket_hex", 1))  # stores written before the key existed: 16 buckets
        if not create:
            raise FileNotFoundError(f"no xwin store at {self.url} (missing {INDEX_KEY})")
        ensure_group(self.backend, "", {"xwin": {"format": FORMAT_NAME, "version": FORMAT_VERSION}})
        ensure_group(self.backend, "volumes")
        body = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "catalog_bucket_hex": DEFAULT_BUCKET_HEX,
            "datasets": [],
        }
        try:
            self.backend.put(INDEX_KEY, json.dumps(body, indent=1).encode(), if_none_match=True)
        except ConflictError:  # created concurrently by another process: use what it wrote
            return int(self._read_index()[0].get("catalog_bucket_hex", 1))
        return DEFAULT_BUCKET_HEX

    def datasets(self) -> list[DatasetInfo]:
        return [DatasetInfo.model_validate(d) for d in self._read_index()[0].get("datasets", [])]

    def _register_dataset(self, info: DatasetInfo) -> None:
        for _ in range(50):
            idx, etag = self._read_index()
            ds = idx.setdefault("datasets", [])
            if any(d["cohort"] == info.cohort and d["spec_hash"] == info.spec_hash for d in ds):
                return
            ds.append(info.model_dump())
            ds.sort(key=lambda d: (d["cohort"], d["spec_hash"]))
            try:
                self.backend.put(INDEX_KEY, json.dumps(idx, indent=1).encode(), if_match=etag)
                return
            except ConflictError:
                continue
        raise RuntimeError("store index stayed contended")

    # ---- canonical volumes --------------------------------------------------------------------------------------
    def has_volume(self, volume_id: str) -> bool:
        """True only for committed volumes (one existence check of the commit record)."""
        return self.volumes.has_commit(check_id("volume_id", volume_id))

    def volume_settled(self, volume_id: str) -> bool:
        """Whether a rerun may skip this volume: it is committed, and its catalog row is written now if it was
        missing (:meth:`Scope.settled`)."""
        return self.volumes.settled(check_id("volume_id", volume_id)) is not None

    def write_volume(self, record: VolumeRecord, hu: Integer[np.ndarray, "X Y Z"], *, owner: str | None = None) -> bool:
        """Store a canonical HU volume (int16, shape == record.shape). Atomic and idempotent.

        Returns True when written now, False when an identical volume was already committed.
        Raises ChecksumMismatch when a committed volume with this id holds different voxels, ClaimHeld when
        another live writer is writing it.
        """
        vid = check_id("volume_id", record.volume_id)
        check_id("cohort", record.cohort)
        hu = np.asarray(hu)
        if hu.ndim != 3 or tuple(hu.shape) != tuple(record.shape):
            raise ValueError(f"volume {vid}: hu shape {hu.shape} != record.shape {tuple(record.shape)}")
        if hu.dtype != np.int16:
            if not np.issubdtype(hu.dtype, np.integer) or hu.min() < -32768 or hu.max() > 32767:
                raise ValueError(f"volume {vid}: hu must be int16 (got {hu.dtype})")
            hu = hu.astype(np.int16)
        hu = np.ascontiguousarray(hu)
        checksum = encode_pool().submit(sha256_of, hu).result  # hashed while the shard is encoded
        base = volume_path(vid)
        record_json = json.loads(record.model_dump_json())

        def write(path: str) -> CommitRecord:
            chunks = (hu.shape[0], hu.shape[1], min(HU_CHUNK_Z, hu.shape[2]))
            write_entry(self.backend, path, {"record": record_json}, [ArrayWrite("hu", hu, chunks, hu_codec())])
            return CommitRecord(
                volume_id=vid,
                kind=EntryKind.volume,
                cohort=record.cohort,
                path=path,
                array="hu",
                shape=tuple(hu.shape),
                dtype="int16",
                nbytes=int(hu.nbytes),
                checksum=checksum(),
                writer=owner or default_owner(),
                versions=library_versions(),
                record=record_json,
            )

        return commit_entry(self.volumes, vid, base, checksum, write, owner)

    def _volume_commit(self, volume_id: str) -> CommitRecord:
        c = self.volumes.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(f"volume {volume_id!r} is not committed in {self.url}")
        return c

    def volume_record(self, volume_id: str) -> VolumeRecord:
        return VolumeRecord.model_validate(self._volume_commit(volume_id).record)

    def read_volume(self, volume_id: str) -> tuple[VolumeRecord, Int16[np.ndarray, "X Y Z"]]:
        """(record, int16 HU array (X, Y, Z) in canonical RAS voxel order)."""
        c = self._volume_commit(volume_id)
        hu = np.asarray(zarr.open_array(self.zstore, path=f"{c.path}/{c.array}", mode="r", zarr_format=3)[...])
        return VolumeRecord.model_validate(c.record), hu

    def list_volumes(self, cohort: str | None = None) -> list[VolumeRecord]:
        """Records of committed volumes (optionally of one cohort), from the catalog (no store listing)."""
        rows = [r for r in self.volumes.catalog() if cohort is None or r.cohort == cohort]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as ex:
            return list(ex.map(lambda r: self.volume_record(r.volume_id), rows))

    # ---- subject-level splits -----------------------------------------------------------------------------------
    def read_splits(self, cohort: str) -> SplitsDoc | None:
        """The stored split assignment of ``cohort`` (None: never assigned)."""
        got = self.backend.get(splits_key(cohort))
        return None if got is None else SplitsDoc.model_validate_json(got[0])

    def update_splits(self, cohort: str, update: Callable[[SplitsDoc | None], SplitsDoc]) -> SplitsDoc:
        """Replace the assignment by ``update(current)`` with a compare-and-swap (retried on a concurrent update,
        with ``update`` called again on the fresh state). Returns what was stored."""
        key = splits_key(cohort)
        for attempt in range(50):
            got = self.backend.get(key)
            cur = None if got is None else SplitsDoc.model_validate_json(got[0])
            new = update(cur)
            if new.cohort != cohort:
                raise ValueError(f"split assignment of cohort {new.cohort!r} given for {cohort!r}")
            data = new.model_dump_json(indent=1).encode()
            try:
                if got is None:
                    self.backend.put(key, data, if_none_match=True)
                else:
                    self.backend.put(key, data, if_match=got[1])
                return new
            except ConflictError:
                time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
        raise RuntimeError(f"{key} stayed contended after 50 attempts")

    def volume_catalog(self) -> list[CatalogRow]:
        return self.volumes.catalog()

    # ---- projection datasets ------------------------------------------------------------------------------------
    def dataset(
        self, cohort: str, spec: RenderSpec, create: bool = True, *, views_codec: str = DEFAULT_VIEW_CODEC
    ) -> ProjectionDataset:
        """The dataset of ``cohort`` rendered with ``spec``. Refuses a group whose stored spec differs.
        ``views_codec``: the codec new rings are written with (layout.VIEW_CODECS; readers need no setting)."""
        return ProjectionDataset(self, check_id("cohort", cohort), spec, create=create, views_codec=views_codec)

    def open_dataset(self, cohort: str, spec_hash: str) -> ProjectionDataset:
        """Open an existing dataset by hash, taking the spec from the store (readers without the spec)."""
        got = self.backend.get(spec_key(dataset_path(cohort, spec_hash)))
        if got is None:
            raise FileNotFoundError(f"no dataset {cohort}/{spec_hash} in {self.url}")
        return ProjectionDataset(self, cohort, RenderSpec.model_validate_json(got[0]), create=False)

    def find_dataset(
        self, cohort: str | None = None, spec_hash: str | None = None, volume_id: str | None = None
    ) -> ProjectionDataset:
        """The one dataset matching every filter given: ``cohort``, ``spec_hash`` (a unique prefix is enough) and
        holding a committed ring of ``volume_id``. Raises DatasetLookupError (a LookupError and a ValueError) naming
        what matched when none or several do."""
        found = self._datasets_matching(cohort, spec_hash)
        if volume_id is not None:
            found = [ds for ds in found if ds.has_ring(volume_id)]
        what = _filters(cohort=cohort, spec_hash=spec_hash, volume=volume_id)
        if not found:
            have = ", ".join(f"{d.cohort}/{d.spec_hash}" for d in self.datasets()) or "none"
            raise DatasetLookupError(f"no dataset{what} in {self.url} (datasets: {have})")
        if len(found) > 1:
            names = ", ".join(f"{ds.cohort}/{ds.spec_hash}" for ds in found)
            raise DatasetLookupError(
                f"{len(found)} datasets{what} in {self.url} ({names}): name one by cohort and spec hash"
            )
        return found[0]

    def find_ring(
        self, volume: str, cohort: str | None = None, spec_hash: str | None = None
    ) -> tuple[ProjectionDataset, str]:
        """(dataset, volume id) of the one committed ring whose id is ``volume`` or starts with it, among the
        datasets matching ``cohort`` / ``spec_hash``. Raises DatasetLookupError naming the candidates when none or
        several match."""
        hits = [(ds, v) for ds in self._datasets_matching(cohort, spec_hash) for v in ds.volume_ids()]
        exact = [(ds, v) for ds, v in hits if v == volume]
        hits = exact or [(ds, v) for ds, v in hits if v.startswith(volume)]
        if not hits:
            raise DatasetLookupError(
                f"no committed ring of volume {volume!r}{_filters(cohort=cohort, spec_hash=spec_hash)} in {self.url}"
            )
        if len(hits) > 1:
            names = ", ".join(f"{ds.cohort}/{ds.spec_hash}/{v}" for ds, v in hits)
            raise DatasetLookupError(
                f"{volume!r} is ambiguous ({names}): give a longer id, the cohort or the spec hash"
            )
        return hits[0]

    def _datasets_matching(self, cohort: str | None, spec_hash: str | None) -> list[ProjectionDataset]:
        return [
            self.open_dataset(d.cohort, d.spec_hash)
            for d in self.datasets()
            if (cohort is None or d.cohort == cohort) and (spec_hash is None or d.spec_hash.startswith(spec_hash))
        ]

    # ---- whole-store operations ---------------------------------------------------------------------------------
    def status(self) -> StoreStatus:
        vol_rows = self.volumes.catalog()
        per_cohort: dict[str, int] = {}
        for r in vol_rows:
            per_cohort[r.cohort] = per_cohort.get(r.cohort, 0) + 1
        vols = ScopeStatus(
            scope="volumes", kind=EntryKind.volume, counts=self.volumes.entry_status(), per_cohort=per_cohort
        )
        out = []
        for d in self.datasets():
            ds = self.open_dataset(d.cohort, d.spec_hash)
            counts = ds.scope.entry_status()
            out.append(
                ScopeStatus(
                    scope=ds.scope.prefix,
                    kind=EntryKind.ring,
                    cohort=d.cohort,
                    spec_hash=d.spec_hash,
                    counts=counts,
                    per_cohort={d.cohort: counts["committed"]},
                )
            )
        return StoreStatus(url=self.url, volumes=vols, datasets=out)

    def verify(self, *, deep: bool = True, remove_orphans: bool = False, repair: bool = False) -> VerifyReport:
        """Recompute every committed checksum (volumes and all datasets) and compare each catalog with its commit
        records; ``deep`` also lists leftover attempt folders (``orphans``), which ``remove_orphans`` deletes.
        ``repair`` first makes every scope say what it holds (``verify.repair_scope``; docs/format.md)."""
        kw: dict[str, Any] = {"deep": deep, "remove_orphans": remove_orphans, "repair": repair}
        rep = verify_scope(self, self.volumes, **kw)
        for d in self.datasets():
            scope = self.open_dataset(d.cohort, d.spec_hash).scope
            rep = rep.merge(verify_scope(self, scope, **kw))
        return rep

    def rebuild_catalogs(self) -> dict[str, int]:
        out = {"volumes": self.volumes.rebuild_catalog()}
        for d in self.datasets():
            s = self.open_dataset(d.cohort, d.spec_hash).scope
            out[s.prefix] = s.rebuild_catalog()
        return out


def _filters(**given: str | None) -> str:
    """ " with cohort 'c', volume 'v'" for the filters that were given ("" when none)."""
    said = ", ".join(f"{k.replace('_', ' ')} {v!r}" for k, v in given.items() if v)
    return f" with {said}" if said else ""


def open_store(url: str | os.PathLike[str], storage_options: dict | None = None, *, create: bool = True) -> Store:
    """Open (or initialise) the store at a local path, ``file://`` URL or ``s3://bucket/prefix``.

    S3 endpoint/credentials come from ``storage_options`` or the environment (XWIN_S3_ENDPOINT / AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); they are never stored or logged.
    """
    return Store(url, storage_options, create=create)
