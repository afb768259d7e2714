"""The one classification of failures that can pass (transient) and the retry loops built on it.

Transient: connection problems, timeouts, S3 5xx and throttling responses, ``OSError``s whose errno says the
condition can clear (EIO, EAGAIN, EBUSY, ETIMEDOUT, connection resets/refusals, unreachable or down networks,
stale NFS handles, a disconnected mount, a full disk: ENOSPC, which frees when space is made), and running out of
memory (``MemoryError``, a CUDA out-of-memory error: memory held by other work frees), and a Dask worker that died
(``KilledWorker``: most often the OS's out-of-memory killer). An exception is transient
also when its cause is (``raise ... from e``). Never transient: a lost compare-and-swap (:class:`ConflictError`),
missing or forbidden objects, and anything else (bad input is the caller's to reject). The flows' task retry
policy, their accounting of failed series (``Failure.retryable``) and ``xwin ingest`` use this one function.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from zarr.abc.store import ByteRequest
from zarr.abc.store import Store as ZarrStore
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from xwin.storage.errors import ConflictError

log = logging.getLogger(__name__)
T = TypeVar("T")

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


_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.ESTALE,
    errno.ENOSPC,
    errno.ENETDOWN,
    errno.ENETRESET,
    errno.ENOTCONN,
}
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
_OOM_MESSAGES = ("cuda out of memory", "cuda error: out of memory", "hip out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A ``MemoryError`` or a GPU out-of-memory error (``torch.cuda.OutOfMemoryError`` or the RuntimeError text
    older torch and other CUDA libraries raise), recognised without importing torch."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError (a RuntimeError)
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection problems, timeouts, 5xx and throttling responses, I/O errors that
    can clear (errno), a full disk, out of memory (module docstring). An exception that is neither is transient
    when its cause (``__cause__``, else ``__context__``) is; a cycle in that chain ends the walk."""
    seen: set[int] = set()
    x: BaseException | None = exc
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        verdict = _own_verdict(x)
        if verdict is not None:
            return verdict
        x = x.__cause__ or x.__context__
    return False


def _own_verdict(exc: BaseException) -> bool | None:
    """True / False when ``exc`` itself decides, None when its cause decides."""
    if isinstance(exc, (ConflictError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if type(exc).__name__ == "KilledWorker":  # dask: the worker process died (most often the OS's OOM killer)
        return True
    if is_out_of_memory(exc):
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
    return None


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
