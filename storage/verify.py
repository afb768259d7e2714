"""``verify``: every catalog row and commit record of a scope checked against the objects it names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import zarr

from xwin.schemas.store import CommitRecord, EntryKind, VerifyIssue, VerifyReport
from xwin.storage.entry import meta_checksum, sha256_of
from xwin.storage.layout import META_ARRAYS
from xwin.storage.scope import Scope

if TYPE_CHECKING:
    from xwin.storage.store import Store


def shard_keys(arr) -> list[str]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
    enc = arr.metadata.chunk_key_encoding
    return [f"{arr.path}/{enc.encode_chunk_key(tuple(ix))}" for ix in np.ndindex(*grid)]


def verify_scope(store: Store, scope: Scope, *, deep: bool = True, remove_orphans: bool = False) -> VerifyReport:
    """Check every catalog row and commit record of ``scope``: data present, checksums recomputed. ``deep`` also
    lists each committed entry's folder for attempt folders its commit does not name (``orphans``);
    ``remove_orphans`` deletes them (never while a live claim on the entry exists)."""
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
        if deep or remove_orphans:
            for folder, n in _orphans(store, scope, c, remove_orphans):
                rep.orphans.append(
                    VerifyIssue(
                        volume_id=vid,
                        scope=scope.prefix,
                        reason=f"{'removed' if remove_orphans else 'leftover'} attempt folder {folder} ({n} objects)",
                    )
                )
        if issue is None:
            rep.ok += 1
        elif issue[0] == "missing":
            rep.missing.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=issue[1]))
        else:
            rep.corrupt.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=issue[1]))
    return rep


def _orphans(store: Store, scope: Scope, c: CommitRecord, remove: bool) -> list[tuple[str, int]]:
    """(folder, object count) of the attempt folders of committed entry ``c`` other than the one it names."""
    base, _, committed = c.path.rpartition("/")
    if not committed.startswith("attempt-"):  # a store written before attempt folders: nothing to look for
        return []
    held = scope.get_claim(c.volume_id)
    if held is not None and not scope.claim_is_stale(held[0]):
        return []  # a live writer: its folder is its own business until it ends
    b = store.backend
    folders: dict[str, int] = {}
    for key in b.list(base + "/", include_partial=True):
        part = key[len(base) + 1 :].split("/", 1)[0]
        if part.startswith("attempt-") and part != committed:
            folders[part] = folders.get(part, 0) + 1
    if remove:
        for part in folders:
            b.delete_prefix(f"{base}/{part}")
    return sorted(folders.items())


def _verify_entry(store: Store, scope: Scope, c: CommitRecord, deep: bool) -> tuple[str, str] | None:
    b = store.backend
    names = [c.array] + (list(META_ARRAYS) if c.kind == EntryKind.ring else [])
    if c.label_channels:
        names.append("labels")
    if c.material_channels:
        names.append("materials")
    arrays = {}
    for name in names:
        if not b.exists(f"{c.path}/{name}/zarr.json"):
            return "missing", f"array {c.path}/{name} has no metadata"
        try:
            arrays[name] = zarr.open_array(store.zstore, path=f"{c.path}/{name}", mode="r", zarr_format=3)
        except Exception as e:  # noqa: BLE001
            return "corrupt", f"array {c.path}/{name} metadata unreadable: {e}"
        absent = [k for k in shard_keys(arrays[name]) if not b.exists(k)]
        if absent:
            return "missing", f"chunk objects absent: {absent}"
    a = arrays[c.array]
    if tuple(a.shape) != tuple(c.shape) or a.dtype != np.dtype(c.dtype):
        return "corrupt", f"array {a.path} is {a.shape} {a.dtype}, commit says {tuple(c.shape)} {c.dtype}"
    if not deep:
        return None
    try:
        got = sha256_of(np.asarray(a[...]))
    except Exception as e:  # noqa: BLE001 - a decode error is corruption
        return "corrupt", f"pixels undecodable: {type(e).__name__}: {e}"
    if got != c.checksum:
        return "corrupt", f"pixel checksum {got} != committed {c.checksum}"
    if c.kind == EntryKind.ring:
        try:
            mcs = meta_checksum({n: np.asarray(arrays[n][...]) for n in META_ARRAYS})
        except Exception as e:  # noqa: BLE001
            return "corrupt", f"view metadata undecodable: {e}"
        if mcs != c.meta_checksum:
            return "corrupt", "view metadata checksum differs from the commit"
    if c.label_channels:
        try:
            lcs = sha256_of(np.asarray(arrays["labels"][...]))
        except Exception as e:  # noqa: BLE001 - a decode error is corruption
            return "corrupt", f"labels undecodable: {type(e).__name__}: {e}"
        if lcs != c.labels_checksum:
            return "corrupt", f"labels checksum {lcs} != committed {c.labels_checksum}"
    if c.material_channels:
        try:
            mts = sha256_of(np.asarray(arrays["materials"][...]))
        except Exception as e:  # noqa: BLE001 - a decode error is corruption
            return "corrupt", f"materials undecodable: {type(e).__name__}: {e}"
        if mts != c.materials_checksum:
            return "corrupt", f"materials checksum {mts} != committed {c.materials_checksum}"
    return None
