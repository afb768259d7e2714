"""How one entry (a volume or a ring) is written and committed: the write protocol of docs/format.md.

1. a commit record already exists -> nothing is rewritten (idempotent); the catalog row is re-added if missing;
2. take the single-writer claim (lease with expiry, dead local holders detected by pid);
3. write the zarr group + arrays, each data array as ONE whole shard (never a partial shard write), with
   :mod:`xwin.storage.shardwrite` (zarr-python's metadata documents and byte-identical shards, encoded in parallel
   and streamed out) while the sha256 of the pixels (the content checksum of the commit) is computed beside it;
4. read every written object back as raw bytes and compare it with what was written (size + crc32c);
5. create the commit record with create-if-absent (one atomic PUT / os.replace): the entry is now visible;
6. add the catalog row (compare-and-swap on the catalog bucket).

A writer killed anywhere before 5 leaves only invisible garbage that the next run overwrites; killed between 5 and
6 leaves a committed entry that the next ``write_*`` call (or ``rebuild_catalog``) puts into the catalog.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import google_crc32c
import numpy as np
import zarr
from jaxtyping import Shaped
from zarr.storage import MemoryStore

from xwin.storage.backend import Backend
from xwin.storage.errors import ChecksumMismatch
from xwin.storage.layout import META_ARRAYS
from xwin.storage.scope import Scope, row_of
from xwin.storage.shardwrite import Crc32cTee, encode_shard, shard_layout


def sha256_of(a: Shaped[np.ndarray, "..."]) -> str:
    """Checksum of an array's pixels: sha256 over little-endian, C-order bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return "sha256:" + hashlib.sha256(a.data.cast("B")).hexdigest()


def meta_checksum(meta: dict[str, Shaped[np.ndarray, "..."]]) -> str:
    h = hashlib.sha256()
    for name in META_ARRAYS:
        a = np.ascontiguousarray(meta[name])
        h.update(name.encode())
        h.update(a.data.cast("B"))
    return "sha256:" + h.hexdigest()


def library_versions() -> dict[str, str]:
    import numcodecs

    return {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__}


def finite_check(dt: np.dtype, what: str) -> Callable[[np.ndarray, tuple[int, ...]], None]:
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


def group_doc(attributes: dict) -> bytes:
    """The group ``zarr.json`` document zarr-python writes for ``attributes``."""
    ms = MemoryStore()
    zarr.create_group(ms, attributes=attributes, zarr_format=3)
    return ms._store_dict["zarr.json"].to_bytes()


def write_entry(
    backend: Backend,
    path: str,
    attributes: dict | Callable[[], dict],
    arrays: Sequence[ArrayWrite | tuple[Any, ...]],
) -> None:
    """Write a group of single-shard arrays under ``path`` and verify every object it wrote.

    ``arrays``: :class:`ArrayWrite` (or plain (name, data, chunks, codec) tuples). Metadata documents come from
    zarr-python, shards from :mod:`xwin.storage.shardwrite` (byte-identical to zarr's). Verification reads every
    object back as raw bytes and compares it (metadata: equality; shards: size + crc32c of the bytes streamed out),
    without decoding. Objects under ``path`` that are not part of the entry (a crashed earlier attempt's leftovers)
    are deleted."""
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
    docs[f"{path}/zarr.json"] = group_doc(attributes() if callable(attributes) else attributes)
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


def commit_entry(scope: Scope, vid: str, checksum: Callable[[], str], write, owner: str | None) -> bool:
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
