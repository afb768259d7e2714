"""The one exception type of ingest: a rejection reason code plus a human detail."""

from __future__ import annotations

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
