"""Storage contracts: commit records, catalog rows, claims, verify reports. No I/O here.

The layout these records live in is documented in docs/format.md and implemented only in ``storage/``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryKind(str, Enum):
    volume = "volume"  # a canonical HU volume (volumes/<id>/hu)
    ring = "ring"  # a ring of projections in a dataset (datasets/<cohort>/<spec_hash>/rings/<id>)


class EntryStatus(str, Enum):
    committed = "committed"  # data written, read back and checksummed, commit record present
    in_progress = "in_progress"  # a live claim exists, no commit record yet
    stale_claim = "stale_claim"  # an expired claim (crashed writer) with no commit record


class CommitRecord(_Model):
    """The one object whose existence makes a volume/ring visible. Written once, atomically, after verification."""

    volume_id: str
    kind: EntryKind
    cohort: str
    spec_hash: str | None = None  # rings only
    path: str  # group path of the data, relative to the store root
    array: str  # data array name inside ``path`` ("hu" or "views")
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name of the stored pixels ("int16", "float16", "float32")
    nbytes: int  # uncompressed bytes of the pixel array
    checksum: str  # "sha256:<hex>" of the stored pixels, C order, little endian
    meta_checksum: str | None = None  # rings: sha256 over the per-view metadata arrays (see docs/format.md)
    # rings with projected labels: the channel names (in order) of the ``labels`` array (C, V, H, W), the sha256 of
    # its stored values (float16, like ``checksum``) and the label spec they were made with (docs/format.md)
    label_channels: list[str] | None = None
    labels_checksum: str | None = None
    label_spec: dict[str, Any] | None = None
    # rings of a spec with ``materials``: the basis names (in order) of the ``materials`` array (2, V, H, W) of areal
    # densities [g/cm^2], the sha256 of its stored float16 values and the HU -> material model they were made with
    material_channels: list[str] | None = None
    materials_checksum: str | None = None
    material_model: dict[str, Any] | None = None
    writer: str  # claim owner that committed it
    committed_at: datetime = Field(default_factory=_now)
    versions: dict[str, str] = Field(default_factory=dict)
    record: dict[str, Any] | None = None  # volumes: the VolumeRecord JSON
    provenance: dict[str, Any] | None = None  # rings: caller provenance (source ids, canonical volume id, ...)


class CatalogRow(_Model):
    """One row of a catalog: what a reader needs to find and trust a volume without listing the store."""

    volume_id: str
    kind: EntryKind
    cohort: str
    spec_hash: str | None = None
    status: EntryStatus = EntryStatus.committed
    path: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    checksum: str
    committed_at: datetime


class ClaimRecord(_Model):
    """A lease on one volume id within one scope: the fencing object of the commit protocol (docs/format.md).

    Every acquisition or takeover writes a new ``token`` (and ``generation`` + 1); the holder's data goes under
    ``<entry>/attempt-<token[:16]>`` and its commit is decided by one compare-and-swap of this object into
    ``state="committing"`` (carrying the commit record), conditional on the ETag of the claim it holds. A holder that
    lost the claim fails that swap, so it commits nothing.

    A claim is taken over only when its lease has expired, or when its holder is provably dead: same kernel boot and
    pid namespace as the checker, and that pid is gone or belongs to a process started at another time (containers
    and pods reuse hostnames and pids, so hostname + pid alone never decide)."""

    volume_id: str
    owner: str
    host: str
    pid: int
    acquired_at: datetime
    expires_at: datetime
    token: str = ""  # fencing token: unique per acquisition ("" in claims written before fencing existed)
    generation: int = 0  # 1 for the first holder, +1 per takeover
    state: Literal["held", "committing"] = "held"
    commit: CommitRecord | None = None  # state "committing": the decided commit (any party may roll it forward)
    boot_id: str | None = None  # the holder's kernel boot id (Linux), its pid namespace and process start time
    pid_ns: int | None = None
    start_ticks: int | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return (now or _now()) >= self.expires_at

    @property
    def attempt(self) -> str:
        """The path segment under the entry where this holder writes its data."""
        return f"attempt-{self.token[:16]}"


class DatasetInfo(_Model):
    cohort: str
    spec_hash: str
    path: str


class VerifyIssue(_Model):
    volume_id: str
    scope: str  # "volumes" or "datasets/<cohort>/<spec_hash>"
    reason: str


class VerifyReport(_Model):
    """Result of recomputing every committed checksum. ``ok`` + len(corrupt) + len(missing) == volumes."""

    volumes: int = 0
    ok: int = 0
    corrupt: list[VerifyIssue] = Field(default_factory=list)
    missing: list[VerifyIssue] = Field(default_factory=list)
    uncataloged: list[VerifyIssue] = Field(default_factory=list)  # commit records absent from the catalog
    # attempt folders of a committed entry that its commit does not name (writers killed or fenced off after another
    # writer committed): garbage, not damage; deep verify finds them, ``remove_orphans`` deletes them
    orphans: list[VerifyIssue] = Field(default_factory=list)
    # what a repair did before the checks (verify --repair): rows added or dropped, decided commits completed,
    # orphan attempt folders and stale claims removed
    repaired: list[VerifyIssue] = Field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No corrupt or missing data, no catalog row without a commit, no commit missing from the catalog."""
        return not self.corrupt and not self.missing and not self.uncataloged

    def merge(self, other: VerifyReport) -> VerifyReport:
        return VerifyReport(
            volumes=self.volumes + other.volumes,
            ok=self.ok + other.ok,
            corrupt=self.corrupt + other.corrupt,
            missing=self.missing + other.missing,
            uncataloged=self.uncataloged + other.uncataloged,
            orphans=self.orphans + other.orphans,
            repaired=self.repaired + other.repaired,
        )


class ScopeStatus(_Model):
    scope: str
    kind: EntryKind
    cohort: str | None = None
    spec_hash: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)  # EntryStatus value -> count
    per_cohort: dict[str, int] = Field(default_factory=dict)  # committed entries per cohort


class StoreStatus(_Model):
    url: str
    volumes: ScopeStatus
    datasets: list[ScopeStatus] = Field(default_factory=list)
