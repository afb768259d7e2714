"""The only code that knows the on-disk / object-store layout (docs/format.md).

>>> from storage import open_store
>>> store = open_store("/data/xwin")            # or "s3://bucket/prefix"
>>> store.write_volume(record, hu)              # atomic, idempotent
>>> ds = store.dataset("nlst", spec)            # refuses a different spec
>>> ds.write_ring(volume_id, views, geometry, provenance)
>>> views, meta = ds.read_views(volume_id, [0, 3, 5])
"""

from xwin.storage.backend import ConflictError, StorageError
from xwin.storage.scope import ClaimHeld
from xwin.storage.store import (
    ChecksumMismatch,
    NotCommitted,
    ProjectionDataset,
    SpecMismatchError,
    Store,
    open_store,
    sha256_of,
)

__all__ = [
    "ChecksumMismatch",
    "ClaimHeld",
    "ConflictError",
    "NotCommitted",
    "ProjectionDataset",
    "SpecMismatchError",
    "StorageError",
    "Store",
    "open_store",
    "sha256_of",
]
