"""Object backends for the small control objects (commit records, catalogs, claims) + the matching zarr store.

Two backends with one contract: local filesystem and S3-compatible object storage (s3fs). Each offers
compare-and-swap puts keyed by an ETag (md5 of the object bytes, as S3 reports for single-part PUTs):

* ``put(key, data, if_none_match=True)`` creates only if absent (S3 ``If-None-Match: *``; locally under a lock).
* ``put(key, data, if_match=etag)`` replaces only if unchanged (S3 ``If-Match``; locally under a lock).

Local replacements are write-temp + ``os.replace`` (atomic for readers); the compare step holds an ``fcntl``
lock that the kernel releases when a holder dies, so a SIGKILLed writer never leaves a lock behind.
Credentials for S3 come from the environment or ``storage_options``; nothing here logs them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from zarr.abc.store import ByteRequest
from zarr.abc.store import Store as ZarrStore
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class ConflictError(Exception):
    """A conditional put lost the race (the object changed or already exists)."""


class StorageError(Exception):
    """A storage operation failed for a reason that retrying does not fix."""


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "503",
    "500",
    "502",
    "504",
}


_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}
_TRANSIENT_MESSAGES = (
    "slowdown",
    "slow down",
    "reduce your request rate",
    "service unavailable",
    "serviceunavailable",
    "internal error",
    "internalerror",
    "bad gateway",
    "gateway timeout",
    "timeout",
    "timed out",
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection problems, timeouts, 5xx and throttling responses."""
    if isinstance(exc, (ConflictError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:  # botocore is only present with the s3 extra
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnErr

        if isinstance(exc, (BotoConnErr, HTTPClientError)):
            return True
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return code in _TRANSIENT_CODES or status.startswith("5")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError):  # s3fs translates botocore errors to OSError (503 -> errno EBUSY)
        if exc.errno in _TRANSIENT_ERRNOS:
            return True
        msg = str(exc).lower()
        if any(c in msg for c in _TRANSIENT_MESSAGES):
            return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def retry(fn: Callable[[], T], *, what: str, attempts: int = 6, base_s: float = 0.05) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors with jittered exponential backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # filtered by is_transient
            if i == attempts - 1 or not is_transient(e):
                raise
            wait = min(2.0, base_s * 2**i) * (0.5 + random.random())
            log.warning("transient error on %s (attempt %d/%d): %s; retrying in %.2fs", what, i + 1, attempts, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


async def aretry(fn: Callable[[], Any], *, what: str, attempts: int = 6, base_s: float = 0.05) -> Any:
    for i in range(attempts):
        try:
            return await fn()
        except Exception as e:
            if i == attempts - 1 or not is_transient(e):
                raise
            wait = min(2.0, base_s * 2**i) * (0.5 + random.random())
            log.warning("transient error on %s (attempt %d/%d): %s; retrying in %.2fs", what, i + 1, attempts, e, wait)
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


class RetryingStore(WrapperStore[ZarrStore]):
    """A zarr store wrapper that retries transient errors of reads, writes and deletes."""

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        return await aretry(lambda: self._store.get(key, prototype, byte_range), what=f"get {key}")

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return await aretry(lambda: self._store.get_partial_values(prototype, key_ranges), what="get_partial_values")

    async def set(self, key: str, value: Buffer) -> None:
        return await aretry(lambda: self._store.set(key, value), what=f"set {key}")

    async def exists(self, key: str) -> bool:
        return await aretry(lambda: self._store.exists(key), what=f"exists {key}")

    async def delete(self, key: str) -> None:
        return await aretry(lambda: self._store.delete(key), what=f"delete {key}")

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        return await aretry(lambda: self._store.set_if_not_exists(key, value), what=f"set_if_not_exists {key}")

    async def delete_dir(self, prefix: str) -> None:
        # One retried listing, then one retried delete per key: a whole-prefix delete makes many requests, so
        # retrying it as a unit can fail on every attempt under a steady rate of transient errors.
        if prefix and not prefix.endswith("/"):
            prefix += "/"

        async def _keys() -> list[str]:
            return [k async for k in self._store.list_prefix(prefix)]

        for key in await aretry(_keys, what=f"list {prefix}"):
            await self.delete(key)

    async def is_empty(self, prefix: str) -> bool:
        return await aretry(lambda: self._store.is_empty(prefix), what=f"is_empty {prefix}")


# ---------------------------------------------------------------------------------------------------------------
class Backend(abc.ABC):
    """Small-object operations on the store root. Keys are '/'-separated paths relative to the root.
    Implementations: LocalBackend, S3Backend (an incomplete one fails when constructed, not at first use)."""

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, etag) or None when absent."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write ``data``; returns its etag. Raises ConflictError when a condition fails."""

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        """Write one object from ``pieces`` (unconditional). Readers see the old object or the whole new one."""
        self.put(key, b"".join(pieces))

    def read_all(self, key: str) -> bytes:
        """The whole object's bytes (no etag computed). FileNotFoundError if absent."""
        return self.get_range(key, 0, None)

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (absent is fine)."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        """Bytes [start, end) of an object; negative ``start`` with end None = suffix. FileNotFoundError if absent."""

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [self.get_range(key, a, b) for a, b in ranges]

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abc.abstractmethod
    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        """All keys under ``prefix`` (recursive), relative to the root. ``include_partial``: also the temporary
        objects of writes that never finished (local stores; S3 has none: a PUT is atomic)."""

    @abc.abstractmethod
    def zarr_store(self, sub: str = "") -> ZarrStore:
        """A zarr store rooted at the store root, or at ``sub`` below it."""


class LocalBackend(Backend):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive lock serialising conditional puts on ``key`` (released by the kernel if we die)."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        # 64 striped lock files: bounded clutter; unrelated keys rarely share a stripe and then only wait briefly
        name = f"{int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 64:02d}.lock"
        fd = os.open(lock_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._p(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, etag_of(data)

    def _write_atomic(self, key: str, data: bytes) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        """Stream ``pieces`` into a temporary file (so writing overlaps the producer), fsync, then rename."""
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def read_all(self, key: str) -> bytes:
        with open(self._p(key), "rb", buffering=0) as f:
            return f.read(os.fstat(f.fileno()).st_size)  # one allocation of the known size, no growing buffer

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        if if_match is None and not if_none_match:
            self._write_atomic(key, data)
            return etag_of(data)
        with self._locked(key):
            cur = self.get(key)
            if if_none_match and cur is not None:
                raise ConflictError(f"{key} already exists")
            if if_match is not None and (cur is None or cur[1] != if_match):
                raise ConflictError(f"{key} changed (expected etag {if_match})")
            self._write_atomic(key, data)
        return etag_of(data)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._p(key).unlink()

    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        return self.get_ranges(key, [(start, end)])[0]

    def get_ranges(self, key: str, ranges) -> list[bytes]:
        out = []
        with open(self._p(key), "rb") as f:
            for a, b in ranges:
                if a < 0:
                    f.seek(a, os.SEEK_END)
                    out.append(f.read())
                else:
                    f.seek(a)
                    out.append(f.read(None if b is None else b - a))
        return out

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        base = self._p(prefix)
        if not base.exists():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".tmp") and not include_partial:
                    continue
                out.append(str(Path(dirpath, f).relative_to(self.root)).replace(os.sep, "/"))
        return sorted(out)

    def zarr_store(self, sub: str = "") -> ZarrStore:
        root = self.root / sub if sub else self.root
        root.mkdir(parents=True, exist_ok=True)
        return LocalStore(root)


def _s3_options(storage_options: dict | None) -> dict:
    """s3fs options: explicit ``storage_options`` first, else endpoint from XWIN_S3_ENDPOINT / AWS_ENDPOINT_URL.

    Credentials are never read here: botocore takes AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
    """
    opts = dict(storage_options or {})
    endpoint = os.environ.get("XWIN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    ck = dict(opts.get("client_kwargs") or {})
    if endpoint and "endpoint_url" not in ck and "endpoint_url" not in opts:
        ck["endpoint_url"] = endpoint
    if ck:
        opts["client_kwargs"] = ck
    return opts


class S3Backend(Backend):
    """``s3://bucket/prefix`` through s3fs (sync for control objects, async inside zarr)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        import s3fs

        if not url.startswith("s3://"):
            raise ValueError(f"not an s3 url: {url!r}")
        self.url = url.rstrip("/")
        self.path = self.url[len("s3://") :]
        if not self.path:
            raise ValueError(f"s3 url {url!r} names no bucket")
        self.bucket = self.path.split("/", 1)[0]
        self.opts = _s3_options(storage_options)
        self.fs = s3fs.S3FileSystem(**self.opts)
        self.fs.retries = 8

    def _k(self, key: str) -> str:
        return f"{self.path}/{key}"

    def _split(self, key: str) -> tuple[str, str]:
        full = self._k(key)
        b, k = full.split("/", 1)
        return b, k

    def get(self, key: str) -> tuple[bytes, str] | None:
        def go() -> bytes | None:
            try:
                return self.fs.cat_file(self._k(key))
            except FileNotFoundError:
                return None

        data = retry(go, what=f"get {key}")
        return None if data is None else (data, etag_of(data))

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        from botocore.exceptions import ClientError

        bucket, k = self._split(key)
        cond: dict[str, str] = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        if if_match is not None:
            cond["IfMatch"] = f'"{if_match}"'

        def go() -> None:
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data, **cond)
            except (ClientError, OSError, FileNotFoundError) as e:
                code = ""
                if isinstance(e, ClientError):
                    code = str(e.response.get("Error", {}).get("Code", ""))
                msg = f"{code} {e}"
                if cond and any(s in msg for s in ("PreconditionFailed", "412", "NoSuchKey", "ConditionalRequest")):
                    raise ConflictError(f"{key}: {msg.strip()}") from e
                if cond and isinstance(e, FileNotFoundError):
                    raise ConflictError(f"{key}: vanished") from e
                raise
            finally:
                self.fs.invalidate_cache(self._k(key))

        retry(go, what=f"put {key}")
        return etag_of(data)

    def put_pieces(self, key: str, pieces: Iterable[bytes]) -> None:
        bucket, k = self._split(key)
        data = b"".join(pieces)

        def go() -> None:
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=k, Body=data)
            finally:
                self.fs.invalidate_cache(self._k(key))

        retry(go, what=f"put {key}")

    def delete(self, key: str) -> None:
        def go() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._k(key))

        retry(go, what=f"delete {key}")

    def exists(self, key: str) -> bool:
        return retry(lambda: self.fs.exists(self._k(key)), what=f"exists {key}")

    def get_range(self, key: str, start: int, end: int | None) -> bytes:
        return retry(lambda: self.fs.cat_file(self._k(key), start=start, end=end), what=f"get_range {key}")

    def get_ranges(self, key: str, ranges) -> list[bytes]:
        if not ranges:
            return []
        p = self._k(key)
        return retry(
            lambda: self.fs.cat_ranges([p] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges]),
            what=f"get_ranges {key}",
        )

    def list(self, prefix: str, *, include_partial: bool = False) -> list[str]:
        base = self._k(prefix).rstrip("/")

        def go() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
            return found

        n = len(self.path) + 1
        return sorted(p[n:] for p in retry(go, what=f"list {prefix}"))

    def zarr_store(self, sub: str = "") -> ZarrStore:
        import s3fs
        from zarr.storage import FsspecStore

        fs = s3fs.S3FileSystem(asynchronous=True, **self.opts)
        fs.retries = 8
        return FsspecStore(fs=fs, path=f"{self.path}/{sub}" if sub else self.path)


def make_backend(url: str | os.PathLike, storage_options: dict | None = None) -> Backend:
    s = str(url)
    if s.startswith("s3://"):
        return S3Backend(s, storage_options)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if "://" in s:
        raise ValueError(f"unsupported store url {s!r}: use a local path, file:// or s3://bucket/prefix")
    return LocalBackend(s)
