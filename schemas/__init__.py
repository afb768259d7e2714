"""Pydantic v2 contracts shared by every stage. No I/O lives here."""

from schemas.ingest import (
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
from schemas.render import RenderSpec, ViewGeometry, VolumeGeometry

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
