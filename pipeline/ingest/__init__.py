"""CT ingest: NIfTI files, DICOM folders and NBIA manifests -> validated canonical HU volumes.

    cands, rejected = plan_inputs(["scan.nii.gz", "dicom_dir/", "metadata.csv"], cohort="nlst")
    record, hu = load_candidate(cands[0])          # hu: int16 (X, Y, Z), canonical RAS; or IngestError
    summary = ingest_sources(sources, "nlst", xwin.storage.open_store(url))

Rules (series choice, checks, reason codes, canonical frame): docs/ingest.md.
"""

from xwin.pipeline.ingest.config import INGEST_VERSION, IngestConfig
from xwin.pipeline.ingest.errors import IngestError
from xwin.pipeline.ingest.load import load_candidate
from xwin.pipeline.ingest.plan import (
    Candidate,
    make_volume_id,
    plan_dicom_files,
    plan_inputs,
    plan_manifest,
    plan_nifti,
)
from xwin.pipeline.ingest.run import VolumeStore, ingest_sources
from xwin.pipeline.ingest.selection import kernel_class
from xwin.pipeline.ingest.volume import canonical_ras, hu_stats

__all__ = [
    "INGEST_VERSION",
    "Candidate",
    "IngestConfig",
    "IngestError",
    "VolumeStore",
    "canonical_ras",
    "hu_stats",
    "ingest_sources",
    "kernel_class",
    "load_candidate",
    "make_volume_id",
    "plan_dicom_files",
    "plan_inputs",
    "plan_manifest",
    "plan_nifti",
]
