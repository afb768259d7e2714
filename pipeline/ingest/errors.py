"""The one exception type of ingest (a rejection reason code plus a human detail), and which errors are no verdict
on an input (the file system failing to read it: never a rejection)."""

from __future__ import annotations

from collections.abc import Callable

from xwin.schemas.ingest import RejectReason


class IngestError(Exception):
    """An input that cannot become a canonical volume.

    ``reason`` is a closed :class:`RejectReason` code, ``detail`` names the specifics (file, slice, values).
    Picklable (Prefect/dask move it between processes).
    """

    def __init__(self, reason: RejectReason | str, detail: str, series_uid: str | None = None) -> None:
        self.reason = RejectReason(reason)
        self.detail = detail
        self.series_uid = series_uid
        super().__init__(f"{self.reason.value}: {detail}")

    def __reduce__(self):  # keep all fields across pickling
        return (IngestError, (self.reason, self.detail, self.series_uid))


def is_read_failure(exc: BaseException) -> bool:
    """Did the operating system (or the network under it) fail to deliver the input's bytes?

    True for an ``OSError`` that carries an errno (EIO, ETIMEDOUT, ESTALE, ENOSPC, EACCES, ...) other than a file
    that is not there, and for connection errors and timeouts. Such an error says nothing about the input's content,
    so ingest never turns it into a rejection: it propagates to the caller, which retries it when it can pass
    (``xwin.storage.is_transient``) and otherwise reports the input failed. Errors of the content itself (a corrupt
    gzip stream, a truncated file, an undecodable image: ``OSError``s without an errno, ``EOFError``, ...) stay
    rejections.
    """
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, OSError) or exc.errno is None:
        return False
    return not isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError))


def no_verdict(exc: BaseException, transient: Callable[[BaseException], bool] | None = None) -> BaseException | None:
    """The error in ``exc``'s chain (``exc`` itself or its ``__cause__``s: ingest wraps reader errors in
    IngestError ``from`` them) that is no verdict on the input -- a read failure of the file system
    (:func:`is_read_failure`) or an error ``transient`` says can pass -- or None. The deepest such cause is
    returned: it names the file and the errno."""

    def free(x: BaseException) -> bool:
        return is_read_failure(x) or (transient is not None and transient(x))

    chain: list[BaseException] = []
    x: BaseException | None = exc
    while x is not None and len(chain) < 16 and all(x is not y for y in chain):
        chain.append(x)
        x = x.__cause__
    hits = [y for y in chain if free(y)]
    return hits[-1] if hits else None
