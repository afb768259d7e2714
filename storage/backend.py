"""The object-backend contract of a store root, and the factory that picks an implementation from a URL.

Two implementations with one contract: the local filesystem (:mod:`xwin.storage.local`) and S3-compatible object
storage (:mod:`xwin.storage.s3`). Each offers compare-and-swap puts keyed by an ETag:

* ``put(key, data, if_none_match=True)`` creates only if absent (S3 ``If-None-Match: *``; locally under a lock).
* ``put(key, data, if_match=etag)`` replaces only if unchanged (S3 ``If-Match``; locally under a lock).
* ``delete(key, if_match=etag)`` removes only if unchanged (S3 ``If-Match`` on DELETE; locally under a lock).

ETags are the server's: what a GET or PUT response carries, never recomputed by the client (under SSE-KMS, SSE-C
or multipart uploads an S3 ETag is not the md5 of the bytes). The local backend's ETag is the md5 of the bytes.

Credentials for S3 come from the environment or ``storage_options``; nothing here logs them.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterable

from zarr.abc.store import Store as ZarrStore


def etag_of(data: bytes) -> str:
    """The local backend's ETag of ``data``: the hex md5 of the bytes (what S3 reports for a plain single-part PUT,
    which is not what it reports under SSE-KMS, SSE-C or multipart: S3 callers use the server's ETag)."""
    return hashlib.md5(data).hexdigest()


class Backend(abc.ABC):
    """Small-object operations on the store root. Keys are '/'-separated paths relative to the root.
    Implementations: LocalBackend, S3Backend (an incomplete one fails when constructed, not at first use)."""

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, etag) or None when absent; the etag is the one the server gave with these bytes."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write ``data``; returns the etag the server gave it. Raises ConflictError when a condition fails."""

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        """Write one object from ``pieces`` (unconditional). Readers see the old object or the whole new one."""
        self.put(key, b"".join(pieces))

    def read_all(self, key: str) -> bytes:
        """The whole object's bytes (no etag computed). FileNotFoundError if absent."""
        return self.get_range(key, 0, None)

    @abc.abstractmethod
    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove an object (absent is fine). ``if_match``: only if its etag is still this one, else ConflictError
        (absent then counts as changed)."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (its temporaries too); returns how many. Not atomic: for garbage."""
        keys = self.list(prefix.rstrip("/") + "/", include_partial=True)
        for k in keys:
            self.delete(k)
        return len(keys)

    @abc.abstractmethod
    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        """Bytes [start, end) of an object; negative ``start`` with end None = suffix. FileNotFoundError if absent."""

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [self.get_range(key, a, b) for a, b in ranges]

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes. FileNotFoundError if absent."""

    @abc.abstractmethod
    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        """All keys under ``prefix`` (recursive), relative to the root. ``include_partial``: also the temporary
        objects of writes that never finished (local stores; S3 has none: a PUT is atomic)."""

    @abc.abstractmethod
    def zarr_store(self, sub: str = "") -> ZarrStore:
        """A zarr store rooted at the store root, or at ``sub`` below it."""


def make_backend(url: str | os.PathLike[str], storage_options: dict | None = None) -> Backend:
    """The backend of a local path, ``file://`` URL or ``s3://bucket/prefix``."""
    s = str(url)
    if s.startswith("s3://"):
        from xwin.storage.s3 import S3Backend

        return S3Backend(s, storage_options)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if "://" in s:
        raise ValueError(f"unsupported store url {s!r}: use a local path, file:// or s3://bucket/prefix")
    from xwin.storage.local import LocalBackend

    return LocalBackend(s)
