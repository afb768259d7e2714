"""Every exception the storage layer raises on purpose (callers catch these, never backend-specific ones)."""

from __future__ import annotations

from xwin.schemas.store import ClaimRecord


class StorageError(Exception):
    """A storage operation failed for a reason that retrying does not fix."""


class ConflictError(Exception):
    """A conditional put lost the race (the object changed or already exists)."""


class ChecksumMismatch(StorageError):
    """Data read back (or an existing commit) does not match the bytes being written."""


class NotCommitted(KeyError):
    """The volume/ring has no commit record in this store/dataset."""


class DatasetLookupError(LookupError, ValueError):
    """No dataset (or ring), or several, match a lookup (``Store.find_dataset`` / ``find_ring``). A ValueError too:
    callers that caught the ValueError of the lookups it replaced still catch it."""


class SpecMismatchError(ValueError):
    """A dataset group exists whose stored render spec differs from the one given."""


class ClaimHeld(RuntimeError):
    """Another live writer holds the claim on this volume."""

    def __init__(self, volume_id: str, holder: ClaimRecord) -> None:
        super().__init__(f"volume {volume_id!r} is claimed by {holder.owner!r} until {holder.expires_at.isoformat()}")
        self.volume_id = volume_id
        self.holder = holder


class ClaimLost(ClaimHeld):
    """This writer's claim was taken over by another writer (its lease lapsed, e.g. during a long stall): it did
    not commit, and it removed only its own attempt's objects. The other writer carries on; a rerun skips or redoes
    the entry."""
