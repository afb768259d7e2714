"""A projection dataset: the rings of one cohort rendered with one spec (``datasets/<cohort>/<spec_hash>/``).

Writes go through the commit protocol of :mod:`xwin.storage.entry`; reads open a ring once (commit record,
per-view metadata, the views' shard index; cached) and then fetch only the chunks of the views asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from jaxtyping import Float, Float32, Int

from xwin.schemas.render import RenderSpec, ViewMeta
from xwin.schemas.store import CatalogRow, CommitRecord, DatasetInfo, EntryKind, VerifyReport
from xwin.storage.entry import (
    ArrayWrite,
    commit_entry,
    ensure_group,
    finite_check,
    library_versions,
    meta_checksum,
    sha256_of,
    write_entry,
)
from xwin.storage.errors import ConflictError, NotCommitted, SpecMismatchError
from xwin.storage.fastread import ShardReader, channel_shard_reader, read_small_array, shard_reader
from xwin.storage.layout import (
    DEFAULT_VIEW_CODEC,
    META_ARRAYS,
    check_id,
    dataset_path,
    make_views_codec,
    meta_codec,
    ring_path,
    rings_path,
    spec_key,
)
from xwin.storage.local import LocalBackend
from xwin.storage.pools import process_pool
from xwin.storage.scope import DEFAULT_CLAIM_TTL_S, Scope, default_owner
from xwin.storage.shardwrite import cast
from xwin.storage.verify import verify_scope

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from xwin.storage.store import Store


class ProjectionDataset:
    """Rings of one cohort rendered with one spec: ``datasets/<cohort>/<spec_hash>/`` (docs/format.md)."""

    def __init__(
        self,
        store: Store,
        cohort: str,
        spec: RenderSpec,
        *,
        create: bool = True,
        cache: int = 64,
        views_codec: str = DEFAULT_VIEW_CODEC,
    ) -> None:
        self.store, self.cohort, self.spec = store, cohort, spec
        self.spec_hash = spec.spec_hash
        self.path = dataset_path(cohort, self.spec_hash)
        make_views_codec(spec.store_dtype, views_codec)  # an unknown codec name fails here, not at the first write
        self.views_codec = views_codec
        self.scope = Scope(store.backend, self.path, store.bucket_hex, entries=rings_path(self.path))
        self._cache: OrderedDict[str, _RingHandle] = OrderedDict()
        self._cache_lock = threading.Lock()  # reader threads (the training stream's read-ahead) share the cache
        self._cache_size = cache
        self._open(create)

    def __getstate__(self) -> dict:  # opened rings and the lock never cross a process boundary
        d = dict(self.__dict__)
        d["_cache"], d["_cache_lock"] = OrderedDict(), None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProjectionDataset({self.store.url!r}, cohort={self.cohort!r}, spec_hash={self.spec_hash!r})"

    def _open(self, create: bool) -> None:
        b = self.store.backend
        key = spec_key(self.path)
        want = self.spec.canonical_json()
        got = b.get(key)
        if got is None:
            if not create:
                raise FileNotFoundError(f"no dataset {self.cohort}/{self.spec_hash} in {self.store.url}")
            attrs: dict[str, Any] = {
                "xwin": {"cohort": self.cohort, "spec_hash": self.spec_hash, "spec": json.loads(want)}
            }
            ensure_group(b, self.path, attrs)
            ensure_group(b, rings_path(self.path))
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

    def settled(self, volume_id: str) -> bool:
        """Whether a rerun may skip this ring: it is committed, and its catalog row is written now if it was missing
        (a writer that died between its commit record and its catalog row; :meth:`Scope.settled`)."""
        return self.scope.settled(check_id("volume_id", volume_id)) is not None

    def settled_ids(self) -> set[str]:
        """Ids of the rings that are committed and catalogued (the catalog, checked against one listing of the commit
        records): what a run may report as skipped without looking further."""
        return set(self.volume_ids()) & set(self.scope.list_commits())

    def volume_ids(self) -> list[str]:
        return [r.volume_id for r in self.scope.catalog()]

    def catalog(self) -> list[CatalogRow]:
        return self.scope.catalog()

    def claim(self, volume_id: str, owner: str | None = None, ttl_s: float = DEFAULT_CLAIM_TTL_S):
        """Context manager: the single-writer lease on one ring (raises ClaimHeld if a live writer holds it)."""
        return self.scope.claim(check_id("volume_id", volume_id), owner, ttl_s)

    def rebuild_catalog(self) -> int:
        return self.scope.rebuild_catalog()

    def verify(self, *, deep: bool = True, repair: bool = False) -> VerifyReport:
        return verify_scope(self.store, self.scope, deep=deep, repair=repair)

    # ---- write --------------------------------------------------------------------------------------------------
    def write_ring(
        self,
        volume_id: str,
        views: Float[np.ndarray, "V H W"],
        geometry: ViewMeta,
        provenance: dict | None = None,
        *,
        owner: str | None = None,
        labels: Float[np.ndarray, "C V H W"] | None = None,
        label_channels: Sequence[str] | None = None,
        label_spec: dict | None = None,
        materials: Float[np.ndarray, "2 V H W"] | None = None,
        material_channels: Sequence[str] = ("soft", "bone"),
        material_model: dict | None = None,
    ) -> bool:
        """Store the ring of ``volume_id``: views (V, H, W) float line integrals + their geometry (every view's
        :class:`ViewMeta`, ``ConeBeamViews.view_meta()``). Atomic, idempotent.

        ``labels``: optional per-structure thickness maps (C, V, H, W) in mm, same views and rays, stored as float16
        array ``labels`` (one chunk per view, all channels) in the same commit, with ``label_channels`` (C names)
        and ``label_spec`` (how the channels were grouped) in the commit record. A ring committed without labels is
        not changed by a later call with labels (returns False and logs it).

        ``materials``: the material bases (2, V, H, W), areal densities [g/cm^2] of ``material_channels`` along the
        same rays (``xwin.pipeline.materials``), stored as float16 array ``materials`` (one chunk per view) in the
        same commit, checksummed and verified like the views, with ``material_model`` in the commit record. Given
        exactly when the spec has ``materials: true``.

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
        if not np.array_equal(geometry.index, np.arange(V)):
            raise ValueError(f"ring {vid}: geometry must describe views 0..{V - 1} in order (a whole ring's ViewMeta)")
        dt = np.dtype(self.spec.store_dtype)
        if labels is not None:
            labels = np.asarray(labels)
            names = list(label_channels or [])
            if labels.ndim != 4 or labels.shape[1:] != (V, H, W) or len(names) != labels.shape[0]:
                raise ValueError(
                    f"ring {vid}: labels {labels.shape} must be (C, {V}, {H}, {W}) with C = {len(names)} channel names"
                )
            if labels.dtype.kind != "f":
                raise ValueError(f"ring {vid}: labels must be floating point thickness in mm, got {labels.dtype}")
        if views.dtype.kind != "f":
            raise ValueError(f"ring {vid}: views must be floating point line integrals, got {views.dtype}")
        if (materials is not None) != self.spec.materials:
            raise ValueError(
                f"ring {vid}: the spec has materials={self.spec.materials} but material bases were "
                f"{'given' if materials is not None else 'not given'}"
            )
        if materials is not None:
            materials = np.asarray(materials)
            mnames = list(material_channels)
            if materials.shape != (len(mnames), V, H, W) or materials.dtype.kind != "f":
                raise ValueError(
                    f"ring {vid}: materials {materials.shape} {materials.dtype} must be floating point "
                    f"({len(mnames)}, {V}, {H}, {W}) areal densities"
                )
        # The stored values' sha256 is taken from the cast chunks as they are encoded (no extra pass); only a rerun
        # against an existing commit hashes the array by itself.
        hasher, done = hashlib.sha256(), {}

        def checksum() -> str:
            if "sha" not in done:
                done["sha"] = sha256_of(cast(views, dt))
            return done["sha"]

        meta = _meta_arrays(geometry)
        mcs = meta_checksum(meta)
        base = ring_path(self.path, vid)
        prov = dict(provenance or {})
        prov.setdefault("canonical_volume_id", vid)
        prov = json.loads(json.dumps(prov, default=str))

        def write(path: str) -> CommitRecord:
            def attrs() -> dict:  # called once the views shard is written: the hasher has seen every chunk
                done["sha"] = "sha256:" + hasher.hexdigest()
                return {"provenance": prov, "spec_hash": self.spec_hash, "checksum": done["sha"]}

            arrays = [
                ArrayWrite(
                    "views",
                    views,
                    (1, H, W),
                    make_views_codec(dt, self.views_codec),
                    dt,
                    lambda raw: hasher.update(raw.data),
                    finite_check(dt, f"ring {vid}"),
                )
            ]
            arrays += [ArrayWrite(name, meta[name], meta[name].shape, meta_codec()) for name in META_ARRAYS]
            if labels is not None:
                ldt = np.dtype(np.float16)
                arrays.append(
                    ArrayWrite(
                        "labels",
                        labels,
                        (labels.shape[0], 1, H, W),
                        make_views_codec(ldt, self.views_codec),
                        ldt,
                        None,
                        finite_check(ldt, f"ring {vid} labels"),
                    )
                )
            if materials is not None:
                mdt = np.dtype(np.float16)
                arrays.append(
                    ArrayWrite(
                        "materials",
                        materials,
                        (materials.shape[0], 1, H, W),
                        make_views_codec(mdt, self.views_codec),
                        mdt,
                        None,
                        finite_check(mdt, f"ring {vid} materials"),
                    )
                )
            write_entry(self.store.backend, path, attrs, arrays)
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
                label_channels=list(label_channels or []) if labels is not None else None,
                labels_checksum=sha256_of(cast(labels, np.dtype(np.float16))) if labels is not None else None,
                label_spec=label_spec if labels is not None else None,
                material_channels=list(material_channels) if materials is not None else None,
                materials_checksum=sha256_of(cast(materials, np.dtype(np.float16))) if materials is not None else None,
                material_model=material_model if materials is not None else None,
                writer=owner or default_owner(),
                versions=library_versions(),
                provenance=prov,
            )

        written = commit_entry(self.scope, vid, base, checksum, write, owner)
        if not written and labels is not None and self.scope.get_commit(vid).label_channels is None:  # type: ignore[union-attr]
            log.warning("ring %s is committed without labels: labels are not added to an existing ring", vid)
        return written

    # ---- read ---------------------------------------------------------------------------------------------------
    def _handle(self, volume_id: str) -> _RingHandle:
        """Open one committed ring: its commit record, per-view metadata and the views' shard index (cached, LRU).

        In the X-WIN regime (one sample per volume per epoch over 10^4 volumes) nearly every sample opens a ring,
        so this path reads the metadata arrays directly (storage/fastread.py) instead of through zarr-python."""
        vid = check_id("volume_id", volume_id)
        with self._cache_lock:
            h = self._cache.get(vid)
            if h is not None:
                self._cache.move_to_end(vid)
                return h
        c = self.scope.get_commit(vid)
        if c is None:
            raise NotCommitted(f"ring {vid!r} is not committed in {self.path} of {self.store.url}")
        b = self.store.backend
        if isinstance(b, LocalBackend):
            small = [read_small_array(b, f"{c.path}/{n}") for n in META_ARRAYS]
        else:  # object stores: the 10 small GETs in parallel (latency-bound)
            small = list(process_pool("io", 8).map(lambda n: read_small_array(b, f"{c.path}/{n}"), META_ARRAYS))
        meta: dict[str, np.ndarray] = {}
        for n, a in zip(META_ARRAYS, small):
            if a is None:  # not our layout: zarr reads it
                a = np.asarray(zarr.open_array(self.store.zstore, path=f"{c.path}/{n}", mode="r", zarr_format=3)[...])
            meta[n] = a
        zmeta = json.loads(b.read_all(f"{c.path}/{c.array}/zarr.json"))
        h = _RingHandle(
            self.store,
            f"{c.path}/{c.array}",
            tuple(zmeta["shape"]),
            meta,
            shard_reader(b, f"{c.path}/{c.array}", zmeta),
        )
        h.commit = c
        with self._cache_lock:  # two threads may have opened the same ring: the later handle replaces the earlier
            self._cache[vid] = h
            self._cache.move_to_end(vid)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return h

    def read_views(
        self,
        volume_id: str,
        indices: Iterable[int] | Int[np.ndarray, " n"],
        dtype: np.typing.DTypeLike | None = np.float32,
    ) -> tuple[Float[np.ndarray, "n H W"], ViewMeta]:
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
        data = h.fast.read(idx) if h.fast is not None else np.asarray(h.array.oindex[idx])
        vm = _view_meta(meta, idx, h.shape)
        return (data if dtype is None else cast(data, np.dtype(dtype), import_torch=False)), vm

    def label_channels(self, volume_id: str) -> list[str]:
        """The names of the ring's label channels, in order ([] when it has no labels)."""
        c = self.scope.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(f"ring {volume_id!r} is not committed in {self.path} of {self.store.url}")
        return list(c.label_channels or [])

    def read_labels(
        self, volume_id: str, indices: Iterable[int] | Int[np.ndarray, " n"] | None = None
    ) -> Float32[np.ndarray, "C n H W"]:
        """Label thickness maps (C, n, H, W) float32 in mm of views ``indices`` (all views when None). Raises
        KeyError when the ring has no labels. Binary masks: ``read_labels(...) > 0`` (or a thickness threshold)."""
        c = self.scope.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(f"ring {volume_id!r} is not committed in {self.path} of {self.store.url}")
        if not c.label_channels:
            raise KeyError(f"ring {volume_id!r} has no labels")
        a = zarr.open_array(self.store.zstore, path=f"{c.path}/labels", mode="r", zarr_format=3)
        if indices is None:
            return np.asarray(a[...], dtype=np.float32)
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64) % a.shape[1]
        return np.asarray(a.oindex[:, idx], dtype=np.float32)

    def material_channels(self, volume_id: str) -> list[str]:
        """The names of the ring's material bases, in order ([] when it has none)."""
        c = self.scope.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(f"ring {volume_id!r} is not committed in {self.path} of {self.store.url}")
        return list(c.material_channels or [])

    def read_materials(
        self, volume_id: str, indices: Iterable[int] | Int[np.ndarray, " n"] | None = None
    ) -> Float32[np.ndarray, "M n H W"]:
        """Material bases (M, n, H, W) float32, areal densities [g/cm^2] (``material_channels`` order, soft and
        bone) of views ``indices`` (all views when None). Raises KeyError when the ring has none."""
        h = self._handle(volume_id)  # the opened ring (cached): its commit record and, once read, the bases' index
        c = h.commit
        if c is None or not c.material_channels:
            raise KeyError(f"ring {volume_id!r} has no material bases (a spec with materials: true renders them)")
        V = h.shape[0]
        if indices is None:
            idx = np.arange(V, dtype=np.int64)
        else:
            idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64) % V
        if h.materials is None:  # our layout: direct chunk reads; anything else: zarr
            path = f"{c.path}/materials"
            zmeta = json.loads(self.store.backend.read_all(f"{path}/zarr.json"))
            h.materials = channel_shard_reader(self.store.backend, path, zmeta) or zarr.open_array(
                self.store.zstore, path=path, mode="r", zarr_format=3
            )
        m = h.materials
        if isinstance(m, ShardReader):
            n, C = len(idx), len(c.material_channels)
            data = m.read(idx).reshape(n, C, m.shape[1] // C, m.shape[2]).transpose(1, 0, 2, 3)
        else:
            data = np.asarray(m.oindex[:, idx])
        return cast(np.ascontiguousarray(data), np.dtype(np.float32), import_torch=False)

    def read_ring(self, volume_id: str) -> Float32[np.ndarray, "V H W"]:
        """All views (V, H, W) float32."""
        return cast(np.asarray(self._handle(volume_id).array[...]), np.dtype(np.float32), import_torch=False)

    def read_geometry(self, volume_id: str) -> ViewMeta:
        """Every view's stored geometry (``ConeBeamViews.from_view_meta`` rebuilds the rays from its cone_vecs)."""
        h = self._handle(volume_id)
        return _view_meta(h.meta, np.arange(h.shape[0]), h.shape)

    def stored_nbytes(self, volume_id: str) -> int:
        """Bytes the ring's views occupy in the store (their shard objects, compressed, with the shard index)."""
        c = self.scope.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(f"ring {volume_id!r} is not committed in {self.path} of {self.store.url}")
        b = self.store.backend
        keys = [k for k in b.list(f"{c.path}/{c.array}") if not k.endswith("zarr.json")]
        return sum(b.size(k) for k in keys)

    def provenance(self, volume_id: str) -> dict:
        c = self.scope.get_commit(check_id("volume_id", volume_id))
        if c is None:
            raise NotCommitted(volume_id)
        return dict(c.provenance or {}, versions=c.versions, spec_hash=c.spec_hash, checksum=c.checksum)


class _RingHandle:
    """An opened ring: views shape, per-view metadata, the direct shard reader (None: not our layout) and the zarr
    array (opened only when needed: whole-ring reads, the fallback selection path)."""

    def __init__(
        self,
        store: Store,
        array_path: str,
        shape: tuple[int, ...],
        meta: dict[str, np.ndarray],
        fast: ShardReader | None,
    ) -> None:
        self.store, self.array_path, self.shape, self.meta, self.fast = store, array_path, shape, meta, fast
        self._array: zarr.Array | None = None
        self.commit: CommitRecord | None = None  # the ring's commit record (set by ProjectionDataset._handle)
        self.materials: ShardReader | zarr.Array | None = None  # the material bases' reader, opened on first use

    @property
    def array(self) -> zarr.Array:
        if self._array is None:
            self._array = zarr.open_array(self.store.zstore, path=self.array_path, mode="r", zarr_format=3)
        return self._array


def _meta_arrays(meta: ViewMeta) -> dict[str, np.ndarray]:
    """The stored arrays of a ring's view metadata, in their stored dtypes (int32 index, float64 the rest)."""
    return {
        "index": np.arange(len(meta), dtype=np.int32),  # write_ring checked meta.index is exactly this
        "yaw_deg": np.asarray(meta.yaw_deg, dtype=np.float64),
        "cone_vec": np.ascontiguousarray(meta.cone_vec, dtype=np.float64),
        "world_from_camera": np.ascontiguousarray(meta.world_from_camera, dtype=np.float64),
        "intrinsics": np.ascontiguousarray(meta.intrinsics, dtype=np.float64),
    }


def _view_meta(meta: dict[str, np.ndarray], idx: np.ndarray, shape: tuple[int, ...]) -> ViewMeta:
    """Views ``idx`` of a ring's stored metadata arrays."""
    return ViewMeta(
        index=meta["index"][idx],
        yaw_deg=meta["yaw_deg"][idx],
        cone_vec=meta["cone_vec"][idx],
        world_from_camera=meta["world_from_camera"][idx],
        intrinsics=meta["intrinsics"][idx],
        height=int(shape[1]),
        width=int(shape[2]),
    )
