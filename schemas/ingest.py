"""Contracts of CT ingest: manifest rows, series, canonical volumes, rejections, run summaries."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class InputKind(str, Enum):
    nifti = "nifti"
    dicom = "dicom"
    example = "example"


class RejectReason(str, Enum):
    """Closed set of reasons an input can be rejected. Each has one meaning; `detail` says the specifics."""

    not_found = "not_found"  # path does not exist
    empty_input = "empty_input"  # directory without any DICOM/NIfTI file
    unreadable_file = "unreadable_file"  # truncated/corrupt file, not parseable
    no_usable_series = "no_usable_series"  # DICOM folder whose every series was excluded (localizers only, ...)
    wrong_modality = "wrong_modality"  # Modality != CT, or no CT image in the series (secondary captures, SR)
    localizer = "localizer"  # scout/localizer series
    not_axial = "not_axial"  # orientation is not axial
    inconsistent_geometry = "inconsistent_geometry"  # orientation/rows/columns/pixel spacing differ between slices
    missing_slices = "missing_slices"  # gap in slice positions
    nonuniform_spacing = "nonuniform_spacing"  # slice steps vary beyond tolerance
    gantry_tilt = "gantry_tilt"  # tilted acquisition and resampling disabled
    too_few_slices = "too_few_slices"  # below the minimum slice count
    undecodable_pixels = "undecodable_pixels"  # transfer syntax without an installed decoder / decode failure
    non_finite_values = "non_finite_values"  # NaN / inf voxels
    hu_out_of_range = "hu_out_of_range"  # values that cannot be HU (e.g. air not near -1000)
    bad_shape = "bad_shape"  # not a 3D scalar volume
    manifest_error = "manifest_error"  # manifest row that cannot be resolved
    render_failed = "render_failed"  # rendering raised on a valid volume
    # a quality check the ingest policy rejects on (IngestConfig.qc_reject; docs/ingest.md "Quality checks")
    qc_truncated = "qc_truncated"
    qc_table = "qc_table"
    qc_hu_air = "qc_hu_air"
    qc_hu_tissue = "qc_hu_tissue"
    qc_metal = "qc_metal"
    qc_contrast = "qc_contrast"


class ManifestRow(_Model):
    """One row of an NBIA ``metadata.csv`` (names as in the CSV header)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    series_uid: str = Field(alias="Series UID")
    collection: str | None = Field(default=None, alias="Collection")
    subject_id: str | None = Field(default=None, alias="Subject ID")
    study_uid: str | None = Field(default=None, alias="Study UID")
    study_description: str | None = Field(default=None, alias="Study Description")
    study_date: str | None = Field(default=None, alias="Study Date")
    series_description: str | None = Field(default=None, alias="Series Description")
    manufacturer: str | None = Field(default=None, alias="Manufacturer")
    modality: str | None = Field(default=None, alias="Modality")
    sop_class_uid: str | None = Field(default=None, alias="SOP Class UID")
    number_of_images: int | None = Field(default=None, alias="Number of Images")
    file_location: str = Field(alias="File Location")

    @field_validator("number_of_images", mode="before")
    @classmethod
    def _int_or_none(cls, v: object) -> object:
        if v in ("", None):
            return None
        return int(str(v).replace(",", ""))


class SeriesChoice(_Model):
    """Why a candidate series was or was not chosen for its study."""

    series_uid: str
    chosen: bool
    reason: str
    n_slices: int
    slice_thickness_mm: float | None = None
    kernel: str | None = None


class StrayReason(str, Enum):
    """Why one image of a series was left out of the series' axial stack (the stack itself is still ingested)."""

    not_ct_image = "not_ct_image"  # SOPClassUID is not a CT image (secondary capture, dose SR, ...)
    wrong_modality = "wrong_modality"  # the image's Modality is not CT
    localizer = "localizer"  # ImageType or SeriesDescription says localizer/scout/topogram
    no_position = "no_position"  # no ImageOrientationPatient/ImagePositionPatient while the stack has them
    orientation = "orientation"  # ImageOrientationPatient differs from the stack's (the most common one)
    size = "size"  # Rows/Columns differ from the stack's (the most common size)


class ExcludedImage(_Model):
    """An image of the chosen series that is not part of its axial stack, and why."""

    sop_uid: str
    file: str  # the file's path as planned
    reason: StrayReason
    detail: str


class SeriesRecord(_Model):
    """A DICOM series found in an input (header facts only)."""

    series_uid: str
    study_uid: str | None = None
    subject_id: str | None = None
    study_date: str | None = None
    modality: str | None = None
    description: str | None = None
    kernel: str | None = None
    n_files: int
    slice_thickness_mm: float | None = None
    image_type: list[str] = Field(default_factory=list)
    transfer_syntax: str | None = None


class HUStats(_Model):
    min: float
    max: float
    mean: float
    std: float
    p01: float
    p99: float
    air_fraction: float  # fraction of voxels <= -950 HU


class Provenance(_Model):
    reader: str  # e.g. "pydicom", "nibabel"
    versions: dict[str, str]
    input_checksum: str  # sha256 over the input files' bytes (sorted by name)
    input_files: int
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    notes: list[str] = Field(default_factory=list)


Affine = Annotated[list[list[float]], Field(min_length=4, max_length=4)]


class Acquisition(_Model):
    """Acquisition facts of the series a volume was made from (DICOM headers; a NIfTI input has none).

    ``study_date`` is as stored after the cohort's de-identification (docs/ingest.md, "De-identification"): by
    default shifted by a per-subject number of days, which keeps the intervals between a subject's exams (and so
    timepoints and offsets from the first exam) and hides the calendar date."""

    study_date: str | None = None  # YYYYMMDD
    manufacturer: str | None = None
    model: str | None = None  # ManufacturerModelName
    site: str | None = None  # InstitutionName
    kvp: float | None = None
    kernel: str | None = None  # ConvolutionKernel
    slice_thickness_mm: float | None = None
    series_description: str | None = None
    contrast_agent: str | None = None  # ContrastBolusAgent (None: not given)


class QCCheck(_Model):
    """One quality check of a canonical volume: its measured value, the rule, and whether it flags the volume."""

    name: str
    value: float | None
    flagged: bool
    rule: str
    detail: str = ""


class ContentFingerprint(_Model):
    """What a volume holds, independent of the ids it arrived with (``xwin.pipeline.ingest.fingerprint``; the split
    assignment binds copies into one split, docs/training-data.md "Splits").

    ``exact``: ``"sha256:" + sha256(JSON [shape, spacing rounded to 1e-4 mm] + int16 little-endian voxels in C
    order)`` of the canonical volume: equal for the same voxels on the same grid, whatever the subject id or salt.
    ``near``: a near-duplicate descriptor, base64 of ``near_cells``^3 int8 values: the volume smoothed to and sampled
    on a cube of ``near_cells`` points ``near_step_mm`` apart (world axes) centred on the volume's box, band-passed
    (the body outline removed) and scaled to unit variance x 32; 0 outside the volume. None when fewer than an
    eighth of the points fall inside the volume, or it is uniform there. Two reconstructions of one acquisition
    (another kernel or slice thickness) correlate above 0.99; different people, or one person's other exams, lower."""

    exact: str
    near: str | None = None
    near_cells: int = 12
    near_step_mm: float = 20.0


class VolumeRecord(_Model):
    """A validated canonical HU volume.

    Canonical form: int16 HU, voxel axes ordered and signed so the affine is closest to RAS+
    (axis 0 -> patient Right... see docs/geometry.md), padding mapped to -1000 HU.
    ``affine`` maps (i, j, k, 1) voxel indices to world RAS millimetres.
    """

    volume_id: str
    cohort: str
    source: str  # the input path/URL as given
    kind: InputKind
    subject_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: Affine
    frame: Literal["RAS"] = "RAS"
    dtype: Literal["int16"] = "int16"
    hu: HUStats
    provenance: Provenance
    series_choices: list[SeriesChoice] = Field(default_factory=list)
    excluded_images: list[ExcludedImage] = Field(default_factory=list)  # stray images of the chosen series
    acquisition: Acquisition | None = None
    qc: list[QCCheck] = Field(default_factory=list)  # quality checks at ingest (docs/ingest.md, "Quality checks")
    fingerprint: ContentFingerprint | None = None  # None: ingested before fingerprints (computed when needed)

    @field_validator("affine")
    @classmethod
    def _affine_4x4(cls, v: list[list[float]]) -> list[list[float]]:
        if any(len(r) != 4 for r in v):
            raise ValueError("affine must be 4x4")
        if [round(x, 12) for x in v[3]] != [0.0, 0.0, 0.0, 1.0]:
            raise ValueError("affine last row must be [0, 0, 0, 1]")
        return v


class Rejection(_Model):
    input: str
    reason: RejectReason
    detail: str
    series_uid: str | None = None


class RunEntry(_Model):
    """A done or skipped input and the canonical volume it produced."""

    input: str
    volume_id: str
    series_uid: str | None = None
    stage: str = "ingest"  # last stage reached: ingest | render | ...
    # the quality checks that flagged the volume this run made (QCCheck.flagged; docs/ingest.md, "Quality checks")
    qc_flags: list[str] = Field(default_factory=list)
    reason: str | None = None  # why a skipped input was skipped, when not simply "already in the store"


class Failure(_Model):
    """A planned input that neither finished nor was rejected: the run met an error that says nothing about the
    input itself (an I/O error, a timeout, a full disk, out of memory, a bug), after the retries it was allowed.

    Nothing records a failed input as finished, so the next run (or landing scan) attempts it again.
    ``retryable``: True when the error can pass by itself (``xwin.storage.is_transient``): rerunning later is the
    remedy. False: a persistent error (permission denied, a bug) that fails again until its cause is fixed.
    """

    input: str
    stage: str  # where it failed: plan | ingest | render | ...
    error: str  # "<exception type>: <message>"
    retryable: bool
    volume_id: str | None = None
    series_uid: str | None = None


class CancelledEntry(_Model):
    """A planned input the run did not finish because it was asked to stop (Ctrl-C, SIGTERM, a cancelled flow run).

    ``started`` False: no work had begun on it (or only work that is committed, such as its volume); True: its work
    was stopped part-way (``stage``) and what it held (its claim) was released. Nothing of it is recorded as
    finished, so running the same command again continues with it."""

    input: str
    stage: str  # the stage it was stopped in, or would have started: ingest | render | ...
    started: bool
    volume_id: str | None = None
    series_uid: str | None = None


class RunSummary(_Model):
    """What one run did. Every planned input ends in exactly one of done, skipped, rejected, failed or cancelled,
    and ``planned`` counts them: ``len(done) + len(skipped) + len(rejected) + len(failed) + len(cancelled) ==
    planned``.

    ``planned`` left out is the sum of the five lists; given, it must equal that sum (a run that lost track of an
    input is an error, never a silently short summary).
    """

    done: list[RunEntry] = Field(default_factory=list)
    skipped: list[RunEntry] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)
    failed: list[Failure] = Field(default_factory=list)
    cancelled: list[CancelledEntry] = Field(default_factory=list)
    planned: int | None = None

    @model_validator(mode="after")
    def _accounted(self) -> RunSummary:
        n = len(self.done) + len(self.skipped) + len(self.rejected) + len(self.failed) + len(self.cancelled)
        if self.planned is None:
            self.planned = n
        elif self.planned != n:
            raise ValueError(
                f"RunSummary: {self.planned} planned but {n} accounted for (done {len(self.done)}, skipped "
                f"{len(self.skipped)}, rejected {len(self.rejected)}, failed {len(self.failed)}, cancelled "
                f"{len(self.cancelled)})"
            )
        return self

    def merge(self, other: RunSummary) -> RunSummary:
        return RunSummary(
            done=self.done + other.done,
            skipped=self.skipped + other.skipped,
            rejected=self.rejected + other.rejected,
            failed=self.failed + other.failed,
            cancelled=self.cancelled + other.cancelled,
        )

    def counts(self) -> dict[str, int]:
        """Counts per outcome; ``cancelled`` only when the run was stopped (then it is in the summary)."""
        c = {
            "done": len(self.done),
            "skipped": len(self.skipped),
            "rejected": len(self.rejected),
            "failed": len(self.failed),
        }
        if self.cancelled:
            c["cancelled"] = len(self.cancelled)
        return c

    def cancel_line(self) -> str:
        """The one line a stopped run ends with."""
        stopped = sum(1 for c in self.cancelled if c.started)
        return (
            f"cancelled: {len(self.cancelled) - stopped} series not started, {stopped} stopped; "
            "run the same command again to continue"
        )
