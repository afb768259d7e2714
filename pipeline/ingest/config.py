"""Ingest settings. Frozen and picklable: a Candidate carries the config it was planned with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

# Bump when the canonical output of the same input changes (part of every volume_id).
INGEST_VERSION = "1"


@dataclass(frozen=True)
class IngestConfig:
    """How inputs are validated and canonicalised (docs/ingest.md).

    spacing_mm: resample the canonical volume to this (x, y, z) spacing (None = keep the native grid).
    tilt: "resample" gantry-tilted series onto an orthogonal grid, or "reject" them (reason gantry_tilt).
    """

    spacing_mm: tuple[float, float, float] | None = None
    tilt: Literal["resample", "reject"] = "resample"
    min_slices: int = 10  # fewer slices: too_few_slices (and such series are not candidates for a study)
    thin_slice_mm: float = 2.5  # slices at most this thick are preferred
    step_tolerance: float = 0.01  # relative tolerance on slice steps along the normal
    min_axial_cos: float = 0.7  # |normal . z| at least this: axial (allows ~45 deg of gantry tilt)
    tilt_tolerance_deg: float = 0.05  # shear of the slice stack below this is not a tilt
    padding_hu_at_or_below: float = -2000.0  # HU at or below this is a padding sentinel (-2048, -3024, ...)
    min_hu: float = -1200.0  # non-padding HU below this: hu_out_of_range
    air_hu: float = -900.0  # some voxel must be at or below this (air); otherwise not HU (missing rescale?)
    # quality checks (xwin.pipeline.ingest.qc) run on every volume and are recorded in its record; the checks named
    # here reject a volume they flag (reason qc_<check>). Empty = the "flag" policy (default): record, never reject.
    qc: bool = True
    qc_reject: tuple[str, ...] = ()
    # de-identification (docs/ingest.md): with a salt, subject ids are stored as "s-" + sha256(salt:id)[:16] and
    # study dates shifted by a per-subject number of days (intervals kept); None keeps them as the source has them
    deid_salt: str | None = None

    def __post_init__(self) -> None:
        from xwin.pipeline.ingest.qc import QC_CHECKS

        unknown = sorted(set(self.qc_reject) - set(QC_CHECKS))
        if unknown:
            raise ValueError(f"unknown quality check(s) {unknown}: the checks are {list(QC_CHECKS)}")

    def output_key(self) -> str:
        """Digest of the settings that change the canonical output (enters volume_id)."""
        keys: dict = {
            "v": INGEST_VERSION,
            "spacing_mm": self.spacing_mm,
            "tilt": self.tilt,
            "padding": self.padding_hu_at_or_below,
        }
        if self.deid_salt:  # de-identified records are another output: never mixed with raw ones under one id
            keys["deid"] = hashlib.sha256(("xwin-deid:" + self.deid_salt).encode()).hexdigest()[:16]
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)
