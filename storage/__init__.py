"""The only code that knows the on-disk / object-store layout (docs/format.md).

>>> from xwin.storage import open_store
>>> store = open_store("/data/xwin")            # or "s3://bucket/prefix"
>>> store.write_volume(record, hu)              # atomic, idempotent
>>> ds = store.dataset("nlst", spec)            # refuses a different spec
>>> ds.write_ring(volume_id, views, geometry.view_meta(), provenance)
>>> views, meta = ds.read_views(volume_id, [0, 3, 5])

Modules: ``store`` (the store root, volumes) and ``dataset`` (projection datasets) are the API; ``entry`` (the
commit protocol), ``scope`` (commit records, catalogs, claims), ``layout`` (paths and codecs), ``shardwrite`` /
``fastread`` (the shard format), ``verify``, ``retry`` (what is transient), ``backend`` / ``local`` / ``s3``.
"""

from xwin.storage.backend import Backend, make_backend
from xwin.storage.dataset import ProjectionDataset
from xwin.storage.entry import sha256_of
from xwin.storage.errors import (
    ChecksumMismatch,
    ClaimHeld,
    ClaimLost,
    ConflictError,
    DatasetLookupError,
    NotCommitted,
    SpecMismatchError,
    StorageError,
)
from xwin.storage.retry import is_transient
from xwin.storage.s3 import s3_filesystem, s3_options
from xwin.storage.scope import Scope
from xwin.storage.store import Store, open_store

__all__ = [
    "Backend",
    "ChecksumMismatch",
    "ClaimHeld",
    "ClaimLost",
    "ConflictError",
    "DatasetLookupError",
    "NotCommitted",
    "ProjectionDataset",
    "Scope",
    "SpecMismatchError",
    "StorageError",
    "Store",
    "is_transient",
    "make_backend",
    "open_store",
    "s3_filesystem",
    "s3_options",
    "sha256_of",
]
