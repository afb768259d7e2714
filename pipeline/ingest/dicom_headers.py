"""Read DICOM headers once (no pixels) and group files into series.

A :class:`SliceHeader` holds every header fact ingest needs from one file; it is a plain picklable dataclass,
built either from a header-only read (planning) or from the full dataset (loading), by the same function.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xwin.pipeline.ingest import fastdicom
from xwin.pipeline.ingest.errors import is_read_failure

# Tags read while planning (header-only): enough to group, select and validate geometry.
HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "StudyDate",
    "Modality",
    "ImageType",
    "ConvolutionKernel",
    "SeriesDescription",
    "Manufacturer",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "InstanceNumber",
    "GantryDetectorTilt",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "SeriesNumber",
    # acquisition facts kept with the volume (schemas.ingest.Acquisition)
    "ManufacturerModelName",
    "InstitutionName",
    "KVP",
    "ContrastBolusAgent",
]

LOCALIZER_WORDS = ("LOCALIZER", "TOPOGRAM", "SCOUT", "SCANOGRAM", "SURVIEW", "SURVEY")
NON_DICOM_SUFFIXES = {
    ".txt",
    ".csv",
    ".json",
    ".xml",
    ".md",
    ".html",
    ".pdf",
    ".png",
    ".jpg",
    ".jpeg",
    ".zip",
    ".gz",
    ".nii",
    ".py",
    ".log",
    ".ini",
    ".yaml",
    ".yml",
}


@dataclass
class SliceHeader:
    """Header facts of one DICOM file (one image)."""

    path: str
    sop_uid: str
    series_uid: str
    study_uid: str | None
    patient_id: str | None
    study_date: str | None
    modality: str | None
    sop_class_uid: str | None
    image_type: tuple[str, ...]
    kernel: str | None
    description: str | None
    manufacturer: str | None
    rows: int | None
    cols: int | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    iop: tuple[float, ...] | None  # 6 direction cosines, LPS
    ipp: tuple[float, float, float] | None  # LPS mm
    slice_thickness: float | None
    instance_number: int | None
    gantry_tilt: float | None
    transfer_syntax: str | None
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    slope: float
    intercept: float
    padding_value: int | None
    padding_range_limit: int | None
    samples_per_pixel: int
    n_frames: int
    photometric: str | None
    series_number: int | None = None
    model: str | None = None
    site: str | None = None
    kvp: float | None = None
    contrast_agent: str | None = None

    @property
    def is_localizer(self) -> bool:
        words = " ".join(self.image_type).upper() + " " + (self.description or "").upper()
        return any(w in words for w in LOCALIZER_WORDS)


@dataclass
class ScanResult:
    """What a directory scan found: readable DICOM headers, files that look like DICOM but do not parse,
    and the count of other (junk) files."""

    headers: list[SliceHeader] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    junk: int = 0
    nifti: list[str] = field(default_factory=list)


def _float(v) -> float | None:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _int(v) -> int | None:
    try:
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError):
        return None


def _floats(v, n: int) -> tuple[float, ...] | None:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return t if len(t) == n else None


def _multi_str(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, bytes)):
        s = v.decode(errors="replace") if isinstance(v, bytes) else v
        return tuple(x.strip() for x in s.split("\\") if x.strip())
    return tuple(str(x).strip() for x in v)


def header_from_dataset(ds: Dataset, path: str) -> SliceHeader:
    """Extract a :class:`SliceHeader` from a (header-only or full) pydicom dataset."""
    ts = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        ts = str(meta.TransferSyntaxUID)
    return build_header(ds.get, path, ts)


def build_header(g, path: str, ts: str | None) -> SliceHeader:
    """Build a :class:`SliceHeader` from ``g(keyword) -> value`` (pydicom values or fastdicom strings/ints).

    Raises KeyError without SeriesInstanceUID/SOPInstanceUID."""
    series_uid = g("SeriesInstanceUID")
    sop_uid = g("SOPInstanceUID")
    if not series_uid or not sop_uid:
        raise KeyError("no SeriesInstanceUID/SOPInstanceUID")
    kernel = _multi_str(g("ConvolutionKernel"))

    def s(key: str) -> str | None:
        v = g(key)
        if v is None or v == "":
            return None
        return "\\".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    return SliceHeader(
        path=path,
        sop_uid=str(sop_uid),
        series_uid=str(series_uid),
        study_uid=s("StudyInstanceUID"),
        patient_id=s("PatientID"),
        study_date=s("StudyDate"),
        modality=(s("Modality") or "").upper() or None,
        sop_class_uid=s("SOPClassUID"),
        image_type=tuple(x.upper() for x in _multi_str(g("ImageType"))),
        kernel="\\".join(kernel) if kernel else None,
        description=s("SeriesDescription"),
        manufacturer=s("Manufacturer"),
        rows=_int(g("Rows")),
        cols=_int(g("Columns")),
        pixel_spacing=_floats(g("PixelSpacing"), 2),  # type: ignore[arg-type]
        iop=_floats(g("ImageOrientationPatient"), 6),
        ipp=_floats(g("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        slice_thickness=_float(g("SliceThickness")),
        instance_number=_int(g("InstanceNumber")),
        gantry_tilt=_float(g("GantryDetectorTilt")),
        transfer_syntax=ts,
        bits_allocated=_int(g("BitsAllocated")),
        bits_stored=_int(g("BitsStored")),
        pixel_representation=_int(g("PixelRepresentation")),
        slope=_float(g("RescaleSlope")) or 1.0,
        intercept=_float(g("RescaleIntercept")) or 0.0,
        padding_value=_int(g("PixelPaddingValue")),
        padding_range_limit=_int(g("PixelPaddingRangeLimit")),
        samples_per_pixel=_int(g("SamplesPerPixel")) or 1,
        n_frames=_int(g("NumberOfFrames")) or 1,
        photometric=s("PhotometricInterpretation"),
        series_number=_int(g("SeriesNumber")),
        model=s("ManufacturerModelName"),
        site=s("InstitutionName"),
        kvp=_float(g("KVP")),
        contrast_agent=s("ContrastBolusAgent"),
    )


def _has_dicom_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        if is_read_failure(e):  # the file system failed: no verdict on the file (errors.is_read_failure)
            raise
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def fast_header(buf, path: str, header_only: bool) -> tuple[SliceHeader, fastdicom.Parsed]:
    """Header via the fast walker. Raises fastdicom.Unsupported / NeedMore / KeyError."""
    parsed = fastdicom.walk(buf, header_only)
    return build_header(parsed.get, path, parsed.transfer_syntax), parsed


def read_header(path: str, prefix: int = 16384) -> SliceHeader:
    """Header-only read of one file: the fast walker on the file's first bytes (all of it if needed), else
    pydicom. Raises InvalidDicomError/KeyError/OSError/... on failure."""
    try:
        with open(path, "rb") as f:
            buf = f.read(prefix)
            try:
                return fast_header(buf, path, True)[0]
            except fastdicom.NeedMore:
                buf += f.read()
                return fast_header(buf, path, False)[0]
    except (fastdicom.Unsupported, fastdicom.NeedMore, struct.error, UnicodeDecodeError):
        pass
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    return header_from_dataset(ds, path)


def is_nifti_name(name: str) -> bool:
    n = name.lower()
    return n.endswith((".nii", ".nii.gz"))


def _walk_error(e: OSError) -> None:
    if is_read_failure(e):  # a folder that cannot be listed is not an empty folder
        raise e


def iter_files(root: Path) -> Iterable[str]:
    """Every file under ``root`` in a stable order. A folder the file system fails to list raises its OSError."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames.sort()
        for fn in sorted(filenames):
            yield os.path.join(dirpath, fn)


def scan_paths(files: Iterable[str]) -> ScanResult:
    """Classify files: DICOM headers, corrupt DICOM (has the DICM magic or a .dcm name but does not parse),
    NIfTI files and junk (anything else, silently ignored). A file the file system fails to read raises its
    OSError (``errors.is_read_failure``): it is neither corrupt nor junk."""
    out = ScanResult()
    for p in files:
        name = os.path.basename(p)
        if is_nifti_name(name):
            out.nifti.append(p)
            continue
        suffix = os.path.splitext(name)[1].lower()
        magic = _has_dicom_magic(p)
        if not magic and (suffix in NON_DICOM_SUFFIXES or name.startswith(".") or name.upper() == "DICOMDIR"):
            out.junk += 1
            continue
        if not magic and suffix != ".dcm":
            # files without a preamble: accept only if they parse as DICOM with UIDs (old implicit-VR files)
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, force=True, specific_tags=HEADER_TAGS)
                out.headers.append(header_from_dataset(ds, p))
            except Exception as e:  # no preamble and not parseable: not a DICOM file (unless the read failed)
                if is_read_failure(e):
                    raise
                out.junk += 1
            continue
        try:
            out.headers.append(read_header(p))
        except (InvalidDicomError, KeyError) as e:
            if magic:
                out.corrupt.append((p, f"{type(e).__name__}: {e}"))
            else:
                out.junk += 1
        except Exception as e:  # truncated/corrupt headers raise many types (EOFError, ...)
            if is_read_failure(e):
                raise
            out.corrupt.append((p, f"{type(e).__name__}: {e}"))
    return out


def group_series(headers: list[SliceHeader]) -> dict[str, dict[str, list[SliceHeader]]]:
    """study_uid -> series_uid -> headers (file order). Files without a StudyInstanceUID share study ''."""
    studies: dict[str, dict[str, list[SliceHeader]]] = {}
    for h in headers:
        studies.setdefault(h.study_uid or "", {}).setdefault(h.series_uid, []).append(h)
    return studies
