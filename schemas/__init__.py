"""Pydantic v2 contracts shared by every stage. No I/O lives here."""

from xwin.schemas.ingest import (
    InputKind,
    ManifestRow,
    RejectReason,
    Rejection,
    RunEntry,
    RunSummary,
    SeriesChoice,
    SeriesRecord,
    VolumeRecord,
    HUStats,
    Provenance,
)
from xwin.schemas.render import RenderSpec, ViewGeometry, VolumeGeometry

__all__ = [
    "InputKind",
    "ManifestRow",
    "RejectReason",
    "Rejection",
    "RunEntry",
    "RunSummary",
    "SeriesChoice",
    "SeriesRecord",
    "VolumeRecord",
    "HUStats",
    "Provenance",
    "RenderSpec",
    "ViewGeometry",
    "VolumeGeometry",
]
