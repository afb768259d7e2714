"""The xwin store: canonical HU volumes and projection datasets in one sharded Zarr v3 hierarchy (docs/format.md).

Write protocol for every entry (volume or ring), the same in both scopes:

1. a commit record already exists -> nothing is rewritten (idempotent); the catalog row is re-added if missing;
2. take the single-writer claim (lease with expiry, dead local holders detected by pid);
3. write the zarr group + arrays, each data array as ONE whole shard (never a partial shard write), with
   :mod:`storage.shardwrite` (zarr-python's metadata documents and byte-identical shards, encoded in parallel and
   streamed out) while the sha256 of the pixels (the content checksum of the commit) is computed beside it;
4. read every written object back as raw bytes and compare it with what was written (size + crc32c);
5. create the commit record with create-if-absent (one atomic PUT / os.replace): the entry is now visible;
6. add the catalog row (compare-and-swap on the catalog bucket).

A writer killed anywhere before 5 leaves only invisible garbage that the next run overwrites; killed between 5 and
6 leaves a committed entry that the next ``write_*`` call (or ``rebuild_catalog``) puts into the catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

from xwin.schemas.ingest import VolumeRecord
from xwin.schemas.render import RenderSpec
from xwin.schemas.store import (
    CatalogRow,
    CommitRecord,
    DatasetInfo,
    EntryKind,
    ScopeStatus,
    StoreStatus,
    VerifyIssue,
    VerifyReport,
    ViewMeta,
)
from xwin.storage.backend import Backend, ConflictError, LocalBackend, RetryingStore, StorageError, make_backend
from xwin.storage.scope import DEFAULT_BUCKET_HEX, ClaimHeld, Scope, check_id, default_owner, row_of
from xwin.storage.shardwrite import Crc32cTee, cast, encode_pool, encode_shard, shard_layout

if TYPE_CHECKING:  # pragma: no cover
    from xwin.pipeline.geometry import ConeBeamViews

FORMAT_NAME = "xwin-store"
FORMAT_VERSION = 1
INDEX_KEY = "xwin.json"  # store index: format + list of datasets (control object, not zarr)
HU_CHUNK_Z = 16
META_ARRAYS = ("index", "yaw_deg", "cone_vec", "world_from_camera", "intrinsics")


class SpecMismatchError(ValueError):
    """A dataset group exists whose stored render spec differs from the one given."""


class ChecksumMismatch(StorageError):
    """Data read back (or an existing commit) does not match the bytes being written."""


class NotCommitted(KeyError):
    """The volume/ring has no commit record in this store/dataset."""


def sha256_of(a: np.ndarray) -> str:
    """Checksum of an array's pixels: sha256 over little-endian, C-order bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return "sha256:" + hashlib.sha256(memoryview(a).cast("B")).hexdigest()


def meta_checksum(meta: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in META_ARRAYS:
        a = np.ascontiguousarray(meta[name])
        h.update(name.encode())
        h.update(memoryview(a).cast("B"))
    return "sha256:" + h.hexdigest()


def library_versions() -> dict[str, str]:
    import numcodecs

    return {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__}


def views_compressors(dtype: str):
    """Codec of projection chunks, chosen by bench/bench_store.py on the bundled CT ring (docs/benchmarks.md, Store):
    Blosc-LZ4 + byte shuffle writes 3x faster and reads 2x faster than zstd-3 / Blosc-zstd-3 at a ratio within
    5-10% of the best (float line integrals compress only 1.1-1.8x whatever the codec)."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


def hu_compressors():
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)


def meta_compressors():
    return ZstdCodec(level=3)


def _write_whole(group, name: str, data: np.ndarray, chunks: tuple[int, ...], compressors) -> None:
    """Create ``name`` in a zarr ``group`` as a single-shard array and write it through zarr-python (the reference
    path: benchmarks and tests compare :func:`_write_entry` against it)."""
    shards = tuple(-(-s // c) * c for s, c in zip(data.shape, chunks))
    arr = group.create_array(
        name=name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        fill_value=0,
        overwrite=False,
        config={"write_empty_chunks": True},
    )
    arr[...] = data


def _finite_check(dt: np.dtype, what: str) -> Callable[[np.ndarray, tuple[int, ...]], None]:
    """Per-chunk validation run inside the encode tasks: refuse NaN/inf and values beyond ``dt``'s range.
    Reductions only (a NaN/inf makes the sum non-finite; an overflowing sum of finite values takes the exact test)."""
    lim = float(np.finfo(dt).max) if dt.kind == "f" else None

    def check(part: np.ndarray, ix: tuple[int, ...]) -> None:
        if not np.isfinite(part.sum()) and not np.isfinite(part).all():
            raise ValueError(f"{what}: view {ix[0]} contains NaN/inf")
        if lim is not None and (part.max() > lim or part.min() < -lim):
            raise ValueError(f"{what}: view {ix[0]} exceeds the range of {dt.name} (|x| <= {lim:g})")

    return check


class ArrayWrite(NamedTuple):
    """One array of an entry: ``data`` stored as ``dtype`` (default: its own) in one shard of ``chunks``."""

    name: str
    data: np.ndarray
    chunks: tuple[int, ...]
    codec: Any
    dtype: np.dtype | None = None
    on_chunk: Callable[[np.ndarray], None] | None = None  # see shardwrite.encode_shard
    check: Callable[[np.ndarray, tuple[int, ...]], None] | None = None


def _group_doc(attributes: dict) -> bytes:
    """The group ``zarr.json`` document zarr-python writes for ``attributes``."""
    ms = MemoryStore()
    zarr.create_group(ms, attributes=attributes, zarr_format=3)
    return ms._store_dict["zarr.json"].to_bytes()


def _write_entry(backend: Backend, path: str, attributes: dict | Callable[[], dict], arrays: list[ArrayWrite]) -> None:
    """Write a group of single-shard arrays under ``path`` and verify every object it wrote.

    ``arrays``: :class:`ArrayWrite` (or plain (name, data, chunks, codec) tuples). Metadata documents come from
    zarr-python, shards from :mod:`storage.shardwrite` (byte-identical to zarr's). Verification reads every object back as raw bytes and
    compares it (metadata: equality; shards: size + crc32c of the bytes streamed out), without decoding. Objects
    under ``path`` that are not part of the entry (a crashed earlier attempt's leftovers) are deleted."""
    docs: dict[str, bytes] = {}
    layouts = []
    for a in (ArrayWrite(*a) for a in arrays):
        lay = shard_layout(a.data.shape, a.dtype or a.data.dtype, a.chunks, a.codec)
        docs[f"{path}/{a.name}/zarr.json"] = lay.zarr_json
        layouts.append((f"{path}/{a.name}/{lay.shard_key}", lay, a))
    stale = set(backend.list(path, include_partial=True))
    for key, doc in docs.items():
        backend.put(key, doc)
    written: dict[str, tuple[int, int]] = {}
    for key, lay, a in layouts:
        tee = Crc32cTee(encode_shard(a.data, lay, a.codec, on_chunk=a.on_chunk, check=a.check))
        backend.put_pieces(key, tee)
        written[key] = (tee.crc, tee.nbytes)
    # the group document last: its attributes may hold the content checksum, hashed while the shards were encoded
    docs[f"{path}/zarr.json"] = _group_doc(attributes() if callable(attributes) else attributes)
    backend.put(f"{path}/zarr.json", docs[f"{path}/zarr.json"])
    for key in sorted(stale - set(docs) - set(written)):
        backend.delete(key)
    for key, doc in docs.items():
        got = backend.get(key)
        if got is None or got[0] != doc:
            raise ChecksumMismatch(f"{key}: metadata read back differs from what was written")
    for key, (crc, n) in written.items():
        back = backend.read_all(key)
        if len(back) != n or google_crc32c.value(back) != crc:
            raise ChecksumMismatch(f"{key}: read back {len(back)} bytes, crc32c differs from the {n} bytes written")


def _shard_keys(arr) -> list[str]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
    enc = arr.metadata.chunk_key_encoding
    return [f"{arr.path}/{enc.encode_chunk_key(tuple(ix))}" for ix in np.ndindex(*grid)]


class Store:
    """Handle on one store root (local path or ``s3://bucket/prefix``). Cheap to create; picklable (reopens)."""

    def __init__(self, url: str, storage_options: dict | None = None, *, create: bool = True) -> None:
        self._url_arg, self._opts = str(url), storage_options
        self.backend: Backend = make_backend(url, storage_options)
        self.url = self.backend.url
        self._zstore = None
        self._lock = threading.Lock()
        self.bucket_hex = self._check_or_init(create)
        self.volumes = Scope(self.backend, "volumes", self.bucket_hex)

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
        zarr.open_group(self.zstore, mode="a", attributes={"xwin": {"format": FORMAT_NAME, "version": FORMAT_VERSION}})
        zarr.open_group(self.zstore, path="volumes", mode="a")
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

    def write_volume(self, record: VolumeRecord, hu: np.ndarray, *, owner: str | None = None) -> bool:
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
        path = f"volumes/{vid}"
        record_json = json.loads(record.model_dump_json())

        def write() -> CommitRecord:
            chunks = (hu.shape[0], hu.shape[1], min(HU_CHUNK_Z, hu.shape[2]))
            _write_entry(self.backend, path, {"record": record_json}, [("hu", hu, chunks, hu_compressors())])
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

        return _commit_entry(self.volumes, vid, checksum, write, owner)

    def _volume_commit(self, volume_id: str) -> CommitRecord:
        c = self.volumes.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(f"volume {volume_id!r} is not committed in {self.url}")
        return c

    def volume_record(self, volume_id: str) -> VolumeRecord:
        return VolumeRecord.model_validate(self._volume_commit(volume_id).record)

    def read_volume(self, volume_id: str) -> tuple[VolumeRecord, np.ndarray]:
        """(record, int16 HU array (X, Y, Z) in canonical RAS voxel order)."""
        c = self._volume_commit(volume_id)
        hu = zarr.open_array(self.zstore, path=f"{c.path}/{c.array}", mode="r", zarr_format=3)[...]
        return VolumeRecord.model_validate(c.record), hu

    def list_volumes(self, cohort: str | None = None) -> list[VolumeRecord]:
        """Records of committed volumes (optionally of one cohort), from the catalog (no store listing)."""
        rows = [r for r in self.volumes.catalog() if cohort is None or r.cohort == cohort]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as ex:
            return list(ex.map(lambda r: self.volume_record(r.volume_id), rows))

    def volume_catalog(self) -> list[CatalogRow]:
        return self.volumes.catalog()

    def volume_claim(self, volume_id: str, owner: str | None = None, ttl_s: float = 600.0):
        return self.volumes.claim(check_id("volume_id", volume_id), owner, ttl_s)

    # ---- projection datasets ------------------------------------------------------------------------------------
    def dataset(self, cohort: str, spec: RenderSpec, create: bool = True) -> ProjectionDataset:
        """The dataset of ``cohort`` rendered with ``spec``. Refuses a group whose stored spec differs."""
        return ProjectionDataset(self, check_id("cohort", cohort), spec, create=create)

    def open_dataset(self, cohort: str, spec_hash: str) -> ProjectionDataset:
        """Open an existing dataset by hash, taking the spec from the store (readers without the spec)."""
        got = self.backend.get(f"datasets/{check_id('cohort', cohort)}/{check_id('spec_hash', spec_hash)}/_spec.json")
        if got is None:
            raise FileNotFoundError(f"no dataset {cohort}/{spec_hash} in {self.url}")
        return ProjectionDataset(self, cohort, RenderSpec.model_validate_json(got[0]), create=False)

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

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Recompute every committed checksum (volumes and all datasets)."""
        rep = _verify_scope(self, self.volumes, deep=deep)
        for d in self.datasets():
            rep = rep.merge(_verify_scope(self, self.open_dataset(d.cohort, d.spec_hash).scope, deep=deep))
        return rep

    def rebuild_catalogs(self) -> dict[str, int]:
        out = {"volumes": self.volumes.rebuild_catalog()}
        for d in self.datasets():
            s = self.open_dataset(d.cohort, d.spec_hash).scope
            out[s.prefix] = s.rebuild_catalog()
        return out


def _commit_entry(scope: Scope, vid: str, checksum: Callable[[], str], write, owner: str | None) -> bool:
    """Steps 1-6 of the module docstring around ``write() -> CommitRecord`` (which writes + verifies data).

    ``checksum()``: the pixel checksum, computed only when needed (beside the encoding for a new entry; by itself
    only when an existing commit has to be compared)."""
    existing = scope.get_commit(vid)
    if existing is None:
        with scope.claim(vid, owner):
            existing = scope.get_commit(vid)  # someone may have committed while we waited
            if existing is None:
                rec = write()
                committed = scope.put_commit(rec)
                scope.catalog_add(row_of(committed))
                if committed.checksum != checksum():  # pragma: no cover - lost a race to different bytes
                    raise ChecksumMismatch(f"{scope.prefix}/{vid}: committed by another writer with other content")
                return committed is rec
    if existing.checksum != checksum():
        raise ChecksumMismatch(
            f"{scope.prefix}/{vid}: already committed with checksum {existing.checksum}, new data has {checksum()}"
        )
    if scope.catalog_row(vid) is None:  # writer died between commit and catalog update
        scope.catalog_add(row_of(existing))
    return False


# ---------------------------------------------------------------------------------------------------------------
class ProjectionDataset:
    """Rings of one cohort rendered with one spec: ``datasets/<cohort>/<spec_hash>/`` (docs/format.md)."""

    def __init__(self, store: Store, cohort: str, spec: RenderSpec, *, create: bool = True, cache: int = 64) -> None:
        self.store, self.cohort, self.spec = store, cohort, spec
        self.spec_hash = spec.spec_hash
        self.path = f"datasets/{cohort}/{self.spec_hash}"
        self.scope = Scope(store.backend, self.path, store.bucket_hex)
        self._cache: OrderedDict[str, tuple[Any, dict[str, np.ndarray]]] = OrderedDict()
        self._cache_size = cache
        self._open(create)

    def __repr__(self) -> str:
        return f"ProjectionDataset({self.store.url!r}, cohort={self.cohort!r}, spec_hash={self.spec_hash!r})"

    def _open(self, create: bool) -> None:
        b = self.store.backend
        key = f"{self.path}/_spec.json"
        want = self.spec.canonical_json()
        got = b.get(key)
        if got is None:
            if not create:
                raise FileNotFoundError(f"no dataset {self.cohort}/{self.spec_hash} in {self.store.url}")
            attrs = {"xwin": {"cohort": self.cohort, "spec_hash": self.spec_hash, "spec": json.loads(want)}}
            zarr.open_group(self.store.zstore, path=self.path, mode="a", attributes=attrs)
            zarr.open_group(self.store.zstore, path=f"{self.path}/rings", mode="a")
            try:
                b.put(key, want.encode(), if_none_match=True)
            except ConflictError:
                got = b.get(key)
            self.store._register_dataset(DatasetInfo(cohort=self.cohort, spec_hash=self.spec_hash, path=self.path))
        if got is not None:
            stored = RenderSpec.model_validate_json(got[0])
            if stored.canonical_json() != want:
                raise SpecMismatchError(
                    f"dataset {self.path} was made with a different render spec:\n stored {stored.canonical_json()}\n"
                    f" given  {want}\nA changed spec needs its own dataset (its own spec hash)."
                )

    # ---- catalog ------------------------------------------------------------------------------------------------
    def has_ring(self, volume_id: str) -> bool:
        return self.scope.has_commit(check_id("volume_id", volume_id))

    def volume_ids(self) -> list[str]:
        return [r.volume_id for r in self.scope.catalog()]

    def catalog(self) -> list[CatalogRow]:
        return self.scope.catalog()

    def claim(self, volume_id: str, owner: str | None = None, ttl_s: float = 600.0):
        """Context manager: the single-writer lease on one ring (raises ClaimHeld if a live writer holds it)."""
        return self.scope.claim(check_id("volume_id", volume_id), owner, ttl_s)

    def rebuild_catalog(self) -> int:
        return self.scope.rebuild_catalog()

    def verify(self, *, deep: bool = True) -> VerifyReport:
        return _verify_scope(self.store, self.scope, deep=deep)

    # ---- write --------------------------------------------------------------------------------------------------
    def write_ring(
        self,
        volume_id: str,
        views: np.ndarray,
        geometry: ConeBeamViews,
        provenance: dict | None = None,
        *,
        owner: str | None = None,
    ) -> bool:
        """Store the ring of ``volume_id``: views (V, H, W) float line integrals + their geometry. Atomic, idempotent.

        Pixels are stored as ``spec.store_dtype`` (the checksum is over the stored bytes). Returns True when written,
        False when this ring was already committed with identical pixels.
        """
        vid = check_id("volume_id", volume_id)
        views = np.asarray(views)
        V, H, W = self.spec.n_views, self.spec.height, self.spec.width
        if views.shape != (V, H, W):
            raise ValueError(f"ring {vid}: views shape {views.shape} != spec (n_views, height, width) {(V, H, W)}")
        if len(geometry) != V or (geometry.height, geometry.width) != (H, W):
            raise ValueError(f"ring {vid}: geometry has {len(geometry)} views of {geometry.height}x{geometry.width}")
        dt = np.dtype(self.spec.store_dtype)
        if views.dtype.kind != "f":
            raise ValueError(f"ring {vid}: views must be floating point line integrals, got {views.dtype}")
        # The stored values' sha256 is taken from the cast chunks as they are encoded (no extra pass); only a rerun
        # against an existing commit hashes the array by itself.
        hasher, done = hashlib.sha256(), {}

        def checksum() -> str:
            if "sha" not in done:
                done["sha"] = sha256_of(cast(views, dt))
            return done["sha"]

        meta = _meta_arrays(geometry)
        mcs = meta_checksum(meta)
        path = f"{self.path}/rings/{vid}"
        prov = dict(provenance or {})
        prov.setdefault("canonical_volume_id", vid)
        prov = json.loads(json.dumps(prov, default=str))

        def write() -> CommitRecord:
            def attrs() -> dict:  # called once the views shard is written: the hasher has seen every chunk
                done["sha"] = "sha256:" + hasher.hexdigest()
                return {"provenance": prov, "spec_hash": self.spec_hash, "checksum": done["sha"]}

            arrays = [
                ArrayWrite(
                    "views",
                    views,
                    (1, H, W),
                    views_compressors(dt.name),
                    dt,
                    hasher.update,
                    _finite_check(dt, f"ring {vid}"),
                )
            ]
            arrays += [(name, meta[name], meta[name].shape, meta_compressors()) for name in META_ARRAYS]
            _write_entry(self.store.backend, path, attrs, arrays)
            return CommitRecord(
                volume_id=vid,
                kind=EntryKind.ring,
                cohort=self.cohort,
                spec_hash=self.spec_hash,
                path=path,
                array="views",
                shape=views.shape,
                dtype=dt.name,
                nbytes=int(views.size * dt.itemsize),
                checksum=done["sha"],
                meta_checksum=mcs,
                writer=owner or default_owner(),
                versions=library_versions(),
                provenance=prov,
            )

        return _commit_entry(self.scope, vid, checksum, write, owner)

    # ---- read ---------------------------------------------------------------------------------------------------
    def _handle(self, volume_id: str) -> _RingHandle:
        """Open one committed ring: its commit record, per-view metadata and the views' shard index (cached, LRU).

        In the X-WIN regime (one sample per volume per epoch over 10^4 volumes) nearly every sample opens a ring,
        so this path reads the metadata arrays directly (storage/fastread.py) instead of through zarr-python."""
        vid = check_id("volume_id", volume_id)
        h = self._cache.get(vid)
        if h is not None:
            self._cache.move_to_end(vid)
            return h
        c = self.scope.get_commit(vid)
        if c is None:
            raise NotCommitted(f"ring {vid!r} is not committed in {self.path} of {self.store.url}")
        from xwin.storage.fastread import read_small_array, shard_reader

        b = self.store.backend
        if isinstance(b, LocalBackend):
            meta = {n: read_small_array(b, f"{c.path}/{n}") for n in META_ARRAYS}
        else:  # object stores: the 10 small GETs in parallel (latency-bound)
            got = _io_pool().map(lambda n: read_small_array(b, f"{c.path}/{n}"), META_ARRAYS)
            meta = dict(zip(META_ARRAYS, got))
        for n in [n for n, a in meta.items() if a is None]:  # not our layout: zarr reads it
            meta[n] = zarr.open_array(self.store.zstore, path=f"{c.path}/{n}", mode="r", zarr_format=3)[...]
        zmeta = json.loads(b.get(f"{c.path}/{c.array}/zarr.json")[0])
        h = _RingHandle(
            self.store,
            f"{c.path}/{c.array}",
            tuple(zmeta["shape"]),
            meta,
            shard_reader(b, f"{c.path}/{c.array}", zmeta),
        )
        self._cache[vid] = h
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return h

    def read_views(
        self, volume_id: str, indices: Iterable[int] | np.ndarray, dtype: np.typing.DTypeLike | None = np.float32
    ) -> tuple[np.ndarray, ViewMeta]:
        """Views ``indices`` (any order, repeats allowed) of one ring: ((n, H, W) ``dtype``, ViewMeta).

        Reads only the requested chunks of the shard (plus the shard index, once per handle), never the whole shard.
        ``dtype=None`` returns the stored dtype (``spec.store_dtype``) without a conversion.
        """
        h = self._handle(volume_id)
        meta = h.meta
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64).reshape(-1)
        V = h.shape[0]
        if idx.size == 0:
            raise ValueError("read_views: no indices given")
        if idx.min() < -V or idx.max() >= V:
            raise IndexError(f"ring {volume_id}: view indices must lie in [0, {V}), got {idx.tolist()}")
        idx = idx % V
        data = h.fast.read(idx) if h.fast is not None else h.array.oindex[idx]
        vm = ViewMeta(
            index=meta["index"][idx],
            yaw_deg=meta["yaw_deg"][idx],
            cone_vec=meta["cone_vec"][idx],
            world_from_camera=meta["world_from_camera"][idx],
            intrinsics=meta["intrinsics"][idx],
            height=int(h.shape[1]),
            width=int(h.shape[2]),
        )
        return (data if dtype is None else cast(data, np.dtype(dtype), import_torch=False)), vm

    def read_ring(self, volume_id: str) -> np.ndarray:
        """All views (V, H, W) float32."""
        return cast(self._handle(volume_id).array[...], np.dtype(np.float32), import_torch=False)

    def read_geometry(self, volume_id: str) -> ConeBeamViews:
        """All views' geometry, rebuilt only from the stored cone_vecs (and yaws)."""
        from xwin.pipeline.geometry import ConeBeamViews

        h = self._handle(volume_id)
        return ConeBeamViews.from_cone_vecs(h.meta["cone_vec"], h.shape[1], h.shape[2], h.meta["yaw_deg"])

    def provenance(self, volume_id: str) -> dict:
        c = self.scope.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(volume_id)
        return dict(c.provenance or {}, versions=c.versions, spec_hash=c.spec_hash, checksum=c.checksum)


_IO_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    """Threads for latency-bound small reads on object stores (recreated after a fork)."""
    global _IO_POOL
    from concurrent.futures import ThreadPoolExecutor

    if _IO_POOL is None or getattr(_IO_POOL, "_pid", None) != os.getpid():
        _IO_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="xwin-io")
        _IO_POOL._pid = os.getpid()
    return _IO_POOL


class _RingHandle:
    """An opened ring: views shape, per-view metadata, the direct shard reader (None: not our layout) and the zarr
    array (opened only when needed: whole-ring reads, the fallback selection path)."""

    def __init__(self, store: Store, array_path: str, shape: tuple[int, ...], meta: dict, fast) -> None:
        self.store, self.array_path, self.shape, self.meta, self.fast = store, array_path, shape, meta, fast
        self._array = None

    @property
    def array(self):
        if self._array is None:
            self._array = zarr.open_array(self.store.zstore, path=self.array_path, mode="r", zarr_format=3)
        return self._array


def _meta_arrays(g: ConeBeamViews) -> dict[str, np.ndarray]:
    V = len(g)
    T = np.empty((V, 4, 4))
    K = np.empty((V, 3, 3))
    for k in range(V):
        T[k], K[k] = g.camera(k)
    return {
        "index": np.arange(V, dtype=np.int32),
        "yaw_deg": np.asarray(g.yaw_deg, dtype=np.float64),
        "cone_vec": np.ascontiguousarray(g.cone_vecs, dtype=np.float64),
        "world_from_camera": T,
        "intrinsics": K,
    }


# ---------------------------------------------------------------------------------------------------------------
def _verify_scope(store: Store, scope: Scope, *, deep: bool = True) -> VerifyReport:
    """Check every catalog row and commit record of ``scope``: data present, checksums recomputed."""
    rep = VerifyReport()
    rows = {r.volume_id: r for r in scope.catalog()}
    commits = set(scope.list_commits())
    for vid in sorted(set(rows) | commits):
        rep.volumes += 1
        if vid not in rows:
            rep.uncataloged.append(
                VerifyIssue(volume_id=vid, scope=scope.prefix, reason="commit record not in catalog")
            )
        c = scope.get_commit(vid) if vid in commits else None
        if c is None:
            rep.missing.append(
                VerifyIssue(volume_id=vid, scope=scope.prefix, reason="catalog row without commit record")
            )
            continue
        issue = _verify_entry(store, scope, c, deep)
        if issue is None:
            rep.ok += 1
        elif issue[0] == "missing":
            rep.missing.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=issue[1]))
        else:
            rep.corrupt.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=issue[1]))
    return rep


def _verify_entry(store: Store, scope: Scope, c: CommitRecord, deep: bool) -> tuple[str, str] | None:
    b = store.backend
    names = [c.array] + (list(META_ARRAYS) if c.kind == EntryKind.ring else [])
    arrays = {}
    for name in names:
        if not b.exists(f"{c.path}/{name}/zarr.json"):
            return "missing", f"array {c.path}/{name} has no metadata"
        try:
            arrays[name] = zarr.open_array(store.zstore, path=f"{c.path}/{name}", mode="r", zarr_format=3)
        except Exception as e:  # noqa: BLE001
            return "corrupt", f"array {c.path}/{name} metadata unreadable: {e}"
        absent = [k for k in _shard_keys(arrays[name]) if not b.exists(k)]
        if absent:
            return "missing", f"chunk objects absent: {absent}"
    a = arrays[c.array]
    if tuple(a.shape) != tuple(c.shape) or a.dtype != np.dtype(c.dtype):
        return "corrupt", f"array {a.path} is {a.shape} {a.dtype}, commit says {tuple(c.shape)} {c.dtype}"
    if not deep:
        return None
    try:
        got = sha256_of(a[...])
    except Exception as e:  # noqa: BLE001 - a decode error is corruption
        return "corrupt", f"pixels undecodable: {type(e).__name__}: {e}"
    if got != c.checksum:
        return "corrupt", f"pixel checksum {got} != committed {c.checksum}"
    if c.kind == EntryKind.ring:
        try:
            mcs = meta_checksum({n: arrays[n][...] for n in META_ARRAYS})
        except Exception as e:  # noqa: BLE001
            return "corrupt", f"view metadata undecodable: {e}"
        if mcs != c.meta_checksum:
            return "corrupt", "view metadata checksum differs from the commit"
    return None


def open_store(url: str, storage_options: dict | None = None, *, create: bool = True) -> Store:
    """Open (or initialise) the store at a local path, ``file://`` URL or ``s3://bucket/prefix``.

    S3 endpoint/credentials come from ``storage_options`` or the environment (XWIN_S3_ENDPOINT / AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); they are never stored or logged.
    """
    return Store(url, storage_options, create=create)


__all__ = [
    "ChecksumMismatch",
    "ClaimHeld",
    "NotCommitted",
    "ProjectionDataset",
    "SpecMismatchError",
    "Store",
    "open_store",
    "sha256_of",
]
