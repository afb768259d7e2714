"""Write realistic CT DICOM series (CT Image Storage, LPS geometry) from a HU volume, for tests.

    files = write_ct_series(out_dir, hu, affine_ras)              # hu: (X, Y, Z) HU, affine voxel -> RAS mm
    files = series_from_nifti(nifti_path, out_dir, shuffle=True)  # same, from a NIfTI (e.g. the bundled CT)
    write_localizer(out_dir, study_uid=..., patient_id=...)      # a 1-image coronal scout in the same study
    write_stray(series_dir, "localizer", like=slice_path)         # a stray image inside the series (same UIDs)

Each slice is a real file (preamble, file meta, Explicit VR Little Endian unless ``transfer_syntax`` says
otherwise) with ImagePositionPatient/ImageOrientationPatient in LPS, PixelSpacing, RescaleSlope/Intercept,
PixelPaddingValue, SliceThickness, ConvolutionKernel, ImageType, Study/Series/SOP UIDs, PatientID, StudyDate.
Other test modules may import these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def standard_orientation(hu: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip voxel axes so columns run to patient left (+x LPS), rows to posterior (+y LPS), slices to superior,
    as most CT scanners write axial series. Returns (hu view, affine_ras)."""
    a = np.asarray(affine_ras, float).copy()
    lps = LPS @ a
    for ax, world in ((0, 0), (1, 1), (2, 2)):
        if lps[world, ax] < 0:
            hu = np.flip(hu, axis=ax)
            a[:3, 3] = a[:3, 3] + a[:3, ax] * (hu.shape[ax] - 1)
            a[:3, ax] = -a[:3, ax]
            lps = LPS @ a
    return hu, a


def write_ct_series(
    out_dir: str | Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "XWIN-0001",
    study_date: str = "19990102",
    series_number: int = 2,
    description: str = "1.25mm B30f",
    kernel: str | Sequence[str] = "B30f",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding_hu: float | None = -2048,
    slice_thickness: float | None = None,
    standard: bool = True,
    positions_lps: np.ndarray | None = None,
    gantry_tilt: float | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    garbage_pixels: bool = False,
    shuffle: bool = True,
    prefix: str = "IM",
    seed: int = 0,
    extra: dict | None = None,
) -> list[Path]:
    """Write ``hu`` (X, Y, Z) with voxel->RAS ``affine_ras`` as one axial CT series, one file per slice.

    stored = round((HU - intercept) / slope); voxels equal to ``padding_hu`` are written as PixelPaddingValue.
    ``positions_lps`` (Z, 3) overrides ImagePositionPatient per slice (gaps, tilt, irregular steps).
    ``transfer_syntax``: native, or JPEG 2000 (real lossless encoding via pylibjpeg-openjpeg); with
    ``garbage_pixels`` the declared (compressed) syntax encapsulates bytes that are not a valid codestream.
    Files are named ``{prefix}{n:04d}.dcm`` with n shuffled (``shuffle``) so order must come from positions.
    ``extra``: more attributes by keyword (``{"Manufacturer": "GE MEDICAL SYSTEMS", "ContrastBolusAgent": ...}``),
    set last. Returns the paths in slice order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu)
    a = np.asarray(affine_ras, float)
    if standard:
        hu, a = standard_orientation(hu, a)
    lps = LPS @ a
    dc = float(np.linalg.norm(lps[:3, 0]))
    dr = float(np.linalg.norm(lps[:3, 1]))
    r = lps[:3, 0] / dc
    c = lps[:3, 1] / dr
    X, Y, Z = hu.shape
    if positions_lps is None:
        positions_lps = np.array([lps[:3, 3] + k * lps[:3, 2] for k in range(Z)])
    step = float(np.linalg.norm(lps[:3, 2]))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    if slope == 1.0 and intercept == round(intercept):
        stored_all = hu.astype(np.int32) - int(intercept)
    else:
        stored_all = np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.int32)
    pad_stored = None if padding_hu is None else round((padding_hu - intercept) / slope)
    if padding_hu is not None:
        stored_all[hu == padding_hu] = pad_stored
    signed = stored_all.min() < 0 or (pad_stored is not None and pad_stored < 0)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    assert stored_all.min() >= info.min and stored_all.max() <= info.max, "stored values do not fit 16 bits"
    names = np.arange(1, Z + 1)
    if shuffle:
        np.random.default_rng(seed).shuffle(names)
    paths = []
    for k in range(Z):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = f"XWIN^{patient_id}"
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.Modality = modality
        ds.Manufacturer = "SIEMENS"
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = int(k + 1)
        ds.ImageType = list(image_type)
        ds.ConvolutionKernel = list(kernel) if not isinstance(kernel, str) else kernel
        ds.SliceThickness = f"{slice_thickness if slice_thickness is not None else step:.6g}"
        ds.KVP = "120"
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = f"{gantry_tilt:.6g}"
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions_lps[k]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.SliceLocation = f"{positions_lps[k][2]:.6f}"
        ds.PixelSpacing = [f"{dr:.8g}", f"{dc:.8g}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = Y
        ds.Columns = X
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = f"{intercept:.6g}"
        ds.RescaleSlope = f"{slope:.6g}"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        for kw, val in (extra or {}).items():
            setattr(ds, kw, val)
        if pad_stored is not None:
            ds.add_new(0x00280120, "SS" if signed else "US", pad_stored)  # PixelPaddingValue
        plane = np.ascontiguousarray(stored_all[:, :, k].T.astype(dtype))  # (rows, cols)
        ts = UID(transfer_syntax)
        if garbage_pixels:
            meta.TransferSyntaxUID = ts
            rng = np.random.default_rng(seed + k)
            ds.PixelData = encapsulate([rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()])
            ds["PixelData"].VR = "OB"
        elif ts == ExplicitVRLittleEndian:
            ds.PixelData = plane.tobytes()
        elif ts == JPEG2000Lossless:
            ds.compress(JPEG2000Lossless, plane, encoding_plugin="pylibjpeg")
        else:
            ds.PixelData = plane.tobytes()
            ds.compress(ts)
        p = out / f"{prefix}{names[k]:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def series_from_nifti(nifti_path: str | Path, out_dir: str | Path, **kw) -> list[Path]:
    """Write a NIfTI HU volume as a DICOM series (see :func:`write_ct_series` for keywords)."""
    img = nib.load(str(nifti_path))
    raw = np.asarray(img.dataobj.get_unscaled())
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if np.issubdtype(raw.dtype, np.integer) and slope == 1.0 and inter == round(inter):
        hu = raw.astype(np.int32) + int(inter)
    else:
        hu = np.rint(np.asarray(img.dataobj, dtype=np.float64)).astype(np.int32)
    return write_ct_series(out_dir, hu, img.affine, **kw)


def write_localizer(
    out_dir: str | Path, *, study_uid: str, patient_id: str = "XWIN-0001", n: int = 1, prefix: str = "LOC"
) -> list[Path]:
    """A coronal topogram series (ImageType ORIGINAL/PRIMARY/LOCALIZER, IOP 1,0,0/0,0,-1) of ``n`` images
    of 96 x 64 pixels in study ``study_uid``."""
    hu = np.full((64, 96, n), -1000, np.int16)
    hu[16:48, 10:90] = 40
    aff = np.array([[-1.5, 0, 0, 48.0], [0, 0, 1.0, 0.0], [0, -1.5, 0, 100.0], [0, 0, 0, 1]])  # RAS
    return write_ct_series(
        out_dir,
        hu,
        aff,
        study_uid=study_uid,
        patient_id=patient_id,
        series_number=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        description="Topogram 0.6 T20s",
        kernel="T20s",
        standard=False,
        padding_hu=None,
        shuffle=False,
        prefix=prefix,
    )


def rewrite_coronal(paths: Sequence[Path]) -> None:
    """Make files coronal (ImageOrientationPatient 1,0,0 / 0,0,-1): a reformat, not an axial series."""
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.save_as(p, enforce_file_format=True)


STRAY_KINDS = ("localizer", "secondary_capture", "dose_sr", "coronal", "size")


def write_stray(series_dir: str | Path, kind: str, *, like: str | Path, name: str | None = None) -> Path:
    """Write one image that shares the Study/SeriesInstanceUID of the slice ``like`` but is not part of its axial
    stack, as scanners leave them in series folders. Returns its path (default name ``A_{kind}.dcm``: it sorts
    before the ``IM*.dcm`` slices, so it is the series' first file).

    kind: ``localizer`` (ImageType ORIGINAL/PRIMARY/LOCALIZER, a coronal 96 x 64 topogram), ``secondary_capture``
    (Secondary Capture Image Storage, Modality CT, an RGB screen capture without position/orientation),
    ``dose_sr`` (X-Ray Radiation Dose SR, Modality SR, no pixels), ``coronal`` (the slice as a coronal image,
    ImageOrientationPatient 1,0,0/0,0,-1) or ``size`` (the slice at half the rows and columns, twice the spacing)."""
    import pydicom
    from pydicom.uid import SecondaryCaptureImageStorage, XRayRadiationDoseSRStorage

    ds = pydicom.dcmread(like)
    sop = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = 1000
    if kind == "localizer":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = ["-72", "0", "150"]
        ds.Rows, ds.Columns = 64, 96
        ds.PixelSpacing = ["1.5", "1.5"]
        plane = np.full((64, 96), 1024 - 1000, np.int16)
        plane[16:48, 10:90] = 1024 + 40
        ds.PixelData = plane.astype(np.int16 if ds.PixelRepresentation == 1 else np.uint16).tobytes()
    elif kind == "secondary_capture":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceLocation"):
            delattr(ds, kw)
        for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType", "PixelPaddingValue"):
            if kw in ds:
                delattr(ds, kw)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        rgb = np.zeros((int(ds.Rows), int(ds.Columns), 3), np.uint8)
        rgb[4:12, 4:60] = 255  # "CTDIvol 3.2 mGy" as a white bar
        ds.PixelData = rgb.tobytes()
    elif kind == "dose_sr":
        sr = Dataset()
        sr.file_meta = ds.file_meta
        sr.file_meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
        sr.SOPClassUID = XRayRadiationDoseSRStorage
        for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "StudyDate"):
            setattr(sr, kw, getattr(ds, kw))
        sr.Modality = "SR"
        sr.SeriesNumber = ds.SeriesNumber
        sr.InstanceNumber = 1000
        sr.ValueType = "CONTAINER"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "113701", "DCM", "X-Ray Dose Report"
        sr.ConceptNameCodeSequence = [concept]
        sr.ContinuityOfContent = "SEPARATE"
        ds = sr
    elif kind == "coronal":
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    elif kind == "size":
        plane = ds.pixel_array[::2, ::2].copy()
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [f"{float(x) * 2:.8g}" for x in ds.PixelSpacing]
        ds.PixelData = plane.tobytes()
    else:
        raise ValueError(f"stray kind {kind!r}: one of {STRAY_KINDS}")
    p = Path(series_dir) / (name or f"A_{kind}.dcm")
    ds.save_as(p, enforce_file_format=True)
    return p
