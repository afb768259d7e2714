"""How one entry (a volume or a ring) is written and committed: the write protocol of docs/format.md.

1. a commit record already exists -> nothing is rewritten (idempotent); the catalog row is re-added if missing;
2. take the single-writer claim (:mod:`xwin.storage.scope`): a lease with a fresh fencing token, taken over from
   another writer only once that writer's lease expired (or it is provably dead);
3. write the zarr group + arrays under the attempt's own folder ``<entry>/attempt-<token>/``, each data array as
   ONE whole shard (never a partial shard write), with :mod:`xwin.storage.shardwrite` (zarr-python's metadata
   documents and byte-identical shards, encoded in parallel and streamed out) while the sha256 of the pixels (the
   content checksum of the commit) is computed beside it;
4. read every written object back as raw bytes and compare it with what was written (size + crc32c);
5. decide: one compare-and-swap of the claim object into ``state="committing"`` carrying the commit record,
   conditional on the claim's server ETag. A writer whose claim was taken over fails here and commits nothing;
6. create the commit record with create-if-absent (one atomic PUT / os.replace): the entry is now visible;
7. add the catalog row (compare-and-swap on the catalog bucket), remove other attempts' leftovers under the entry,
   delete the claim if unchanged.

Steps 6-7 are idempotent consequences of the decision in 5: any writer that finds a ``committing`` claim completes
them (``Scope.roll_forward``). A writer that fails or loses its claim before 5 deletes its own attempt folder and
nothing else; a writer killed before 5 leaves only an unreferenced attempt folder that the next commit of that
entry removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import google_crc32c
import numpy as np
import zarr
from jaxtyping import Shaped
from zarr.storage import MemoryStore

from xwin.schemas.store import CommitRecord
from xwin.storage.backend import Backend
from xwin.storage.errors import ChecksumMismatch, ClaimHeld, ClaimLost, ConflictError
from xwin.storage.layout import META_ARRAYS
from xwin.storage.scope import Claim, Scope, row_of
from xwin.storage.shardwrite import Crc32cTee, encode_shard, shard_layout

log = logging.getLogger(__name__)


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


def ensure_group(backend: Backend, path: str, attributes: dict | None = None) -> None:
    """Create the zarr group document at ``path`` unless one exists: one create-if-absent PUT, so concurrent
    creators never fail (zarr's ``open_group(mode="a")`` checks, then creates: two at once raise
    ContainsGroupError)."""
    parts = [p for p in path.split("/") if p]
    for i in range(1, len(parts)):  # the parents, as zarr-python creates them
        with contextlib.suppress(ConflictError):
            backend.put("/".join(parts[:i]) + "/zarr.json", group_doc({}), if_none_match=True)
    key = f"{path}/zarr.json" if path else "zarr.json"
    with contextlib.suppress(ConflictError):
        backend.put(key, group_doc(attributes or {}), if_none_match=True)


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
    without decoding. ``path`` is the attempt's own folder: nobody else writes there."""
    docs: dict[str, bytes] = {}
    layouts = []
    for a in (ArrayWrite(*a) for a in arrays):
        lay = shard_layout(a.data.shape, a.dtype or a.data.dtype, a.chunks, a.codec)
        docs[f"{path}/{a.name}/zarr.json"] = lay.zarr_json
        layouts.append((f"{path}/{a.name}/{lay.shard_key}", lay, a))
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
    for key, doc in docs.items():
        got = backend.get(key)
        if got is None or got[0] != doc:
            raise ChecksumMismatch(f"{key}: metadata read back differs from what was written")
    for key, (crc, n) in written.items():
        back = backend.read_all(key)
        if len(back) != n or google_crc32c.value(back) != crc:
            raise ChecksumMismatch(f"{key}: read back {len(back)} bytes, crc32c differs from the {n} bytes written")


def attempt_of(base: str, path: str) -> str | None:
    """The attempt folder name of data ``path`` under entry ``base`` (None: the entry's data sits at ``base`` itself,
    as in stores written before attempt folders existed)."""
    rest = path[len(base) :].strip("/") if path.startswith(base) else ""
    return rest.split("/", 1)[0] if rest.startswith("attempt-") else None


def remove_other_attempts(backend: Backend, base: str, keep: str) -> int:
    """Delete every object under entry ``base`` that is not under ``keep`` (the committed data) and is not the
    entry's group document: the leftovers of attempts that failed, were killed or lost their claim."""
    keep = keep.rstrip("/") + "/"
    n = 0
    for key in backend.list(base.rstrip("/") + "/", include_partial=True):
        if key.startswith(keep) or key == f"{base}/zarr.json":
            continue
        backend.delete(key)
        n += 1
    return n


def commit_entry(
    scope: Scope,
    vid: str,
    base: str,
    checksum: Callable[[], str],
    write: Callable[[str], CommitRecord],
    owner: str | None,
) -> bool:
    """Steps 1-7 of the module docstring around ``write(path) -> CommitRecord`` (which writes + verifies the data
    under ``path``, the attempt's folder below the entry's ``base``).

    ``checksum()``: the pixel checksum, computed only when needed (beside the encoding for a new entry; by itself
    only when an existing commit has to be compared). Returns True when this call committed the entry.
    Raises ClaimHeld when another live writer holds the entry, ClaimLost when this writer's claim was taken over
    before it could commit (its own attempt is removed; the other writer's data is untouched)."""
    existing = scope.get_commit(vid)
    if existing is None:
        with scope.claim(vid, owner) as claim:
            existing = scope.get_commit(vid)  # someone may have committed while we waited
            if existing is None:
                path = f"{base}/{claim.attempt}"
                rec = None
                try:
                    claim.check()
                    rec = write(path)
                    claim.decide(rec)  # the fence: refused when the claim is no longer ours
                except BaseException as e:
                    # a decide whose answer was lost may have landed, and another writer may have rolled it forward
                    # and removed the claim since: the claim or the commit record on the server says. Only an attempt
                    # that is provably not the decided one is removed (I2, I5: a decided one is what the commit names)
                    if rec is None or not claim.decided_on_server(path):
                        backend_cleanup(scope.b, path)
                    elif isinstance(e, Exception):
                        log.warning("commit of %s/%s decided, finishing it after: %s", scope.prefix, vid, e)
                        claim.decided = True  # fall through to steps 6-7 below
                    if not claim.decided:
                        if isinstance(e, Exception) and not isinstance(e, ClaimHeld) and taken_over(claim):
                            # e.g. the new holder removed this attempt's objects while we were stalled
                            raise claim._lost_error() from e
                        raise
                    if not isinstance(e, Exception):
                        raise  # an interrupt after the decision: the claim stays for the next writer to roll forward
                assert rec is not None  # decided: write() returned it
                committed = scope.put_commit(rec)
                scope.catalog_add(row_of(committed))
                if committed.path != base:  # (a store written before attempt folders keeps its entry group as is)
                    ensure_group(scope.b, base)  # the entry's group: its attempts are its members
                    remove_other_attempts(scope.b, base, keep=committed.path)
                if committed.checksum != checksum():  # pragma: no cover - lost a race to different bytes
                    raise ChecksumMismatch(f"{scope.prefix}/{vid}: committed by another writer with other content")
                return committed.path == rec.path
    if existing.checksum != checksum():
        raise ChecksumMismatch(
            f"{scope.prefix}/{vid}: already committed with checksum {existing.checksum}, new data has {checksum()}"
        )
    scope.settled(vid)  # a writer that died between its commit record and its catalog row: the row is added
    return False


def taken_over(claim: Claim) -> bool:
    """Whether ``claim`` is no longer ours (probed by renewing it; a renewal that fails transiently says no)."""
    try:
        claim.renew()
    except ClaimLost:
        return True
    except Exception:  # noqa: BLE001 - unknown: the original error is reported
        return False
    return False


def backend_cleanup(backend: Backend, path: str) -> None:
    """Remove this attempt's own folder after a failure (best effort: leftovers are removed by the next commit)."""
    try:
        backend.delete_prefix(path)
    except Exception as e:  # noqa: BLE001 - the original error matters more than a failed cleanup
        log.warning("could not remove the failed attempt %s: %s", path, e)
