"""Pydantic v2 contracts shared by every stage. No I/O lives here."""

from xwin.schemas.ingest import (
    CancelledEntry,
    ExcludedImage,
    Failure,
    HUStats,
    InputKind,
    ManifestRow,
    Provenance,
    Rejection,
    RejectReason,
    RunEntry,
    RunSummary,
    SeriesChoice,
    SeriesRecord,
    StrayReason,
    VolumeRecord,
)
from xwin.schemas.render import RenderSpec, ViewMeta

__all__ = [
    "CancelledEntry",
    "ExcludedImage",
    "Failure",
    "HUStats",
    "InputKind",
    "ManifestRow",
    "Provenance",
    "RejectReason",
    "Rejection",
    "RenderSpec",
    "RunEntry",
    "RunSummary",
    "SeriesChoice",
    "SeriesRecord",
    "StrayReason",
    "ViewMeta",
    "VolumeRecord",
]
