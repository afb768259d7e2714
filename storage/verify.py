"""``verify``: every catalog row and commit record of a scope checked against the objects it names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import zarr

from xwin.schemas.store import CommitRecord, EntryKind, VerifyIssue, VerifyReport
from xwin.storage.entry import meta_checksum, sha256_of
from xwin.storage.errors import ClaimHeld
from xwin.storage.layout import META_ARRAYS
from xwin.storage.scope import Scope

if TYPE_CHECKING:
    from xwin.storage.store import Store


def shard_keys(arr) -> list[str]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
    enc = arr.metadata.chunk_key_encoding
    return [f"{arr.path}/{enc.encode_chunk_key(tuple(ix))}" for ix in np.ndindex(*grid)]


def verify_scope(
    store: Store, scope: Scope, *, deep: bool = True, remove_orphans: bool = False, repair: bool = False
) -> VerifyReport:
    """Check every catalog row and commit record of ``scope``: data present, checksums recomputed, catalog = commit
    records (a commit missing from the catalog, or a row without a commit, is damage). ``deep`` also lists the
    attempt folders no commit names (``orphans``: garbage, not damage) of every entry whose claim is absent or
    stale; ``remove_orphans`` deletes them (fenced: :meth:`Scope.remove_orphans`). ``repair`` first runs
    :func:`repair_scope` (what it did: ``repaired``), then checks."""
    rep = VerifyReport()
    if repair:
        rep.repaired = repair_scope(scope)
    rows = {r.volume_id: r for r in scope.catalog()}
    commits = set(scope.list_commits())
    paths: dict[str, str] = {}
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
        paths[vid] = c.path
        if vid in rows and rows[vid].path != c.path:
            rep.uncataloged.append(
                VerifyIssue(
                    volume_id=vid, scope=scope.prefix, reason=f"catalog row names {rows[vid].path}, not {c.path}"
                )
            )
        issue = _verify_entry(store, scope, c, deep)
        if issue is None:
            rep.ok += 1
        elif issue[0] == "missing":
            rep.missing.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=issue[1]))
        else:
            rep.corrupt.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=issue[1]))
    if deep or remove_orphans:
        rep.orphans = _orphans(scope, paths, remove_orphans)
    return rep


def _orphans(scope: Scope, committed: dict[str, str], remove: bool) -> list[VerifyIssue]:
    """The attempt folders no commit names, of every entry (committed or not) whose claim is absent or stale; a
    live writer's folders are its own business until it ends. ``remove``: deleted, fenced by the entry's claim."""
    out = []
    for vid, folders in sorted(scope.attempt_folders().items()):
        extra = {f: n for f, n in folders.items() if f != committed.get(vid)}
        if not extra:
            continue
        held = scope.get_claim(vid)
        if held is not None and not scope.claim_is_stale(held[0]):
            continue
        if remove:
            try:
                gone = set(scope.remove_orphans(vid))
            except ClaimHeld:  # a writer took the entry meanwhile
                continue
            extra = {f: n for f, n in extra.items() if f in gone}
        for f, n in sorted(extra.items()):
            what = "removed" if remove else "leftover"
            out.append(
                VerifyIssue(
                    volume_id=vid,
                    scope=scope.prefix,
                    reason=f"{what} attempt folder {f.rsplit('/', 1)[1]} ({n} objects)",
                )
            )
    return out


def repair_scope(scope: Scope) -> list[VerifyIssue]:
    """Make ``scope`` say what it holds; idempotent and safe while writers run (every step is a roll-forward, a
    compare-and-swap or fenced by the entry's claim). In order: decided commits whose writer died are completed
    (``committing`` claims rolled forward); the catalog is made equal to the commit records (missing rows added,
    rows without a commit dropped); the attempt folders no commit names are removed from every entry whose claim is
    absent or stale, and stale claims with them (entries a live writer holds are left alone). Returns what it did."""
    done: list[VerifyIssue] = []

    def note(vid: str, reason: str) -> None:
        done.append(VerifyIssue(volume_id=vid, scope=scope.prefix, reason=reason))

    for claim in scope.list_claims():
        got = scope.get_claim(claim.volume_id)
        if got is not None and got[0].state == "committing" and scope.get_commit(claim.volume_id) is None:
            scope.roll_forward(claim.volume_id, *got)
            note(claim.volume_id, "decided commit completed (rolled forward)")
    added, dropped = scope.repair_catalog()
    for vid in added:
        note(vid, "catalog row added for its commit record")
    for vid in dropped:
        note(vid, "catalog row without a commit record dropped")
    folders = scope.attempt_folders()
    stale = {c.volume_id for c in scope.list_claims() if scope.claim_is_stale(c)}
    for vid in sorted(set(folders) | stale):
        c = scope.get_commit(vid)
        if vid not in stale and not set(folders.get(vid, {})) - {c.path if c is not None else None}:
            continue
        try:
            gone = scope.remove_orphans(vid)
        except ClaimHeld:  # a live writer holds it: its folders are its own business
            continue
        for f in gone:
            note(vid, f"removed attempt folder {f.rsplit('/', 1)[1]} ({folders.get(vid, {}).get(f, 0)} objects)")
        if vid in stale:
            note(vid, "stale claim removed")
    return done


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
    for name, channels, committed in (
        ("labels", c.label_channels, c.labels_checksum),
        ("materials", c.material_channels, c.materials_checksum),
    ):  # the arrays projected beside the views, each checksummed in the same commit
        if not channels:
            continue
        try:
            got = sha256_of(np.asarray(arrays[name][...]))
        except Exception as e:  # noqa: BLE001 - a decode error is corruption
            return "corrupt", f"{name} undecodable: {type(e).__name__}: {e}"
        if got != committed:
            return "corrupt", f"{name} checksum {got} != committed {committed}"
    return None
