"""Loading: a planned Candidate -> (VolumeRecord, int16 HU array in canonical RAS voxel order).

DICOM: every file is read once (bytes -> checksum -> dataset -> pixels), the geometry is re-validated from the
full headers, stored values -> HU per slice (RescaleSlope/Intercept), padding -> air, optional gantry-tilt
resample, LPS -> RAS, canonical axis order, optional resampling, HU statistics.
NIfTI: the same from the image's affine (already RAS world).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
from typing import Any

import numpy as np
import pydicom
from nibabel.orientations import inv_ornt_aff
from numba import get_num_threads as nb_threads
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from xwin.pipeline.ingest import fastdicom
from xwin.pipeline.ingest.config import INGEST_VERSION
from xwin.pipeline.ingest.deid import deidentify
from xwin.pipeline.ingest.dicom_headers import SliceHeader, fast_header, header_from_dataset
from xwin.pipeline.ingest.errors import IngestError, is_read_failure
from xwin.pipeline.ingest.fingerprint import content_fingerprint
from xwin.pipeline.ingest.kernels import KERNEL_LOCK, assemble_hu
from xwin.pipeline.ingest.plan import Candidate
from xwin.pipeline.ingest.qc import quality_checks
from xwin.pipeline.ingest.series_geometry import series_geometry
from xwin.pipeline.ingest.volume import (
    AIR_HU,
    canonical_ras,
    check_hu_range,
    hu_stats,
    orientation,
    resample_to_spacing,
    to_ras,
)
from xwin.schemas.ingest import InputKind, Provenance, RejectReason, VolumeRecord

R = RejectReason
_NATIVE_LE = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), None}


def _versions() -> dict[str, str]:
    import nibabel
    import scipy

    return {
        "xwin-ingest": INGEST_VERSION,
        "pydicom": pydicom.__version__,
        "nibabel": nibabel.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def load_candidate(c: Candidate) -> tuple[VolumeRecord, np.ndarray]:
    """Decode and validate one planned input.

    Returns (record, hu) with hu int16 (X, Y, Z) C-contiguous in canonical RAS voxel order and
    ``record.affine`` voxel -> RAS mm. Raises IngestError for any bad input (never another exception type,
    except MemoryError/KeyboardInterrupt).

    When the chosen series fails to load (IngestError) and the study has other valid series
    (``c.fallbacks``), they are loaded in rank order: the record is then the first one that loads, under its own
    ``volume_id``/``series_uid``, with each series that failed before it named in ``series_choices`` and the
    notes. When every series fails, the IngestError has the first series' reason and names every series tried.
    An error caused by a read failure (``errors.is_read_failure``: the file system, not the content) is raised at
    once, without a fallback.
    """
    if not c.fallbacks:
        return _load_one(c)
    tried: list[tuple[Candidate, IngestError]] = []
    for x in (c, *c.fallbacks):
        try:
            rec, hu = _load_one(x)
        except IngestError as e:
            if e.__cause__ is not None and is_read_failure(e.__cause__):
                raise  # the file system failed, not the series' content: no verdict on it, no fallback
            tried.append((x, e))
            continue
        if tried:
            failed = {t.series_uid: f"failed to load {e.reason.value}: {e.detail}" for t, e in tried}
            rec.series_choices = [
                s.model_copy(update={"reason": failed[s.series_uid]}) if s.series_uid in failed else s
                for s in rec.series_choices
            ]
            rec.provenance.notes.append(
                f"the higher-ranked series {', '.join(str(t.series_uid) for t, _ in tried)} failed to load; "
                f"ingested the next-ranked series {x.series_uid}"
            )
        return rec, hu
    first = tried[0][1]
    every = "; ".join(f"series {t.series_uid}: {e.reason.value}: {e.detail}" for t, e in tried)
    raise IngestError(
        first.reason, f"{c.input}: every valid series failed to load ({len(tried)} tried): {every}", c.series_uid
    )


def _load_one(c: Candidate) -> tuple[VolumeRecord, np.ndarray]:
    """One candidate's series (or NIfTI file), no fallback."""
    try:
        if c.kind in (InputKind.nifti, InputKind.example):
            return _load_nifti(c)
        return _load_dicom(c)
    except (IngestError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise IngestError(
            R.unreadable_file, f"{c.input}: unexpected {type(e).__name__} while loading: {e}", series_uid=c.series_uid
        ) from e


# ---------------------------------------------------------------- DICOM
def _stored_pixels(ds: pydicom.Dataset, h: SliceHeader) -> np.ndarray:
    """(rows, cols) stored values of one single-frame image. Native little endian 16-bit is read directly."""
    rows, cols = int(h.rows or 0), int(h.cols or 0)
    if "PixelData" not in ds:
        raise IngestError(R.unreadable_file, f"{h.path}: no PixelData", series_uid=h.series_uid)
    if h.transfer_syntax in _NATIVE_LE and h.bits_allocated == 16:
        raw = ds.PixelData
        need = rows * cols * 2
        if len(raw) < need:
            raise IngestError(
                R.unreadable_file,
                f"{h.path}: pixel data truncated ({len(raw)} of {need} bytes)",
                series_uid=h.series_uid,
            )
        signed = h.pixel_representation == 1
        arr = np.frombuffer(raw, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
        bs = h.bits_stored or 16
        if bs < 16:  # bits above BitsStored are not pixel data: mask / sign-extend
            if signed:
                arr = (arr << (16 - bs)) >> (16 - bs)
            else:
                arr = arr & np.uint16((1 << bs) - 1)
        return arr
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = h.transfer_syntax
        name = UID(ts).name if ts else "implicit VR little endian"
        raise IngestError(
            R.undecodable_pixels, f"{h.path}: cannot decode {name}: {type(e).__name__}: {e}", series_uid=h.series_uid
        ) from e
    if arr.shape != (rows, cols):
        raise IngestError(
            R.bad_shape, f"{h.path}: pixel array {arr.shape} != Rows x Columns {(rows, cols)}", series_uid=h.series_uid
        )
    return arr


def _native_offset(buf, h: SliceHeader, parsed: fastdicom.Parsed) -> int | None:
    """Byte offset of native little-endian 16-bit pixel data of one single-frame image in ``buf``,
    or None when the fast path does not apply (compressed, other bit depths, multi-frame, BitsStored < 16)."""
    if (
        h.transfer_syntax not in _NATIVE_LE
        or h.bits_allocated != 16
        or (h.bits_stored or 16) != 16
        or parsed.pixel_offset is None
        or parsed.pixel_length in (None, fastdicom.UNDEFINED)
        or h.n_frames != 1
        or h.samples_per_pixel != 1
        or h.pixel_representation not in (0, 1)
    ):
        return None
    need = int(h.rows or 0) * int(h.cols or 0) * 2
    if parsed.pixel_length is None or parsed.pixel_offset is None:
        return None
    have = min(int(parsed.pixel_length), len(buf) - parsed.pixel_offset)
    if have < need:
        raise IngestError(
            R.unreadable_file,
            f"{h.path}: pixel data truncated ({max(have, 0)} of {need} bytes)",
            series_uid=h.series_uid,
        )
    return parsed.pixel_offset


def _parse_one(path: str, view: memoryview) -> tuple[SliceHeader, int | None, np.ndarray | None]:
    """Parse one file's bytes: (header, offset of native pixels in ``view`` | None, decoded stored values | None).

    The fast walker handles Part 10 little-endian files; anything else goes through pydicom."""
    try:
        h, parsed = fast_header(view, path, False)
        off = _native_offset(view, h, parsed)
        if off is not None:
            return h, off, None
    except (fastdicom.Unsupported, fastdicom.NeedMore, struct.error, KeyError, UnicodeDecodeError, ValueError):
        pass
    try:
        ds = pydicom.dcmread(io.BytesIO(view))
        h = header_from_dataset(ds, path)
    except Exception as e:
        raise IngestError(R.unreadable_file, f"{path}: does not parse ({type(e).__name__}: {e})") from e
    return h, None, _stored_pixels(ds, h)


def _read_all(paths: list[str]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Read every file once into one buffer (each file at an even offset): (uint8 buffer, [(start, size)])."""
    spans = []
    pos = 0
    for p in paths:
        try:
            n = os.stat(p).st_size
        except OSError as e:
            raise IngestError(R.unreadable_file, f"{p}: {e}") from e
        spans.append((pos, n))
        pos += n + (n & 1)
    buf = np.empty(pos + 1, np.uint8)
    mv = buf.data  # the array's own memoryview
    for p, (s, n) in zip(paths, spans):
        try:
            with open(p, "rb") as f:
                got = f.readinto(mv[s : s + n])
        except OSError as e:
            raise IngestError(R.unreadable_file, f"{p}: {e}") from e
        if got != n:
            raise IngestError(R.unreadable_file, f"{p}: read {got} of {n} bytes (file changed?)")
    return buf, spans


def _sha256_sorted(buf: np.ndarray, items: list[tuple[str, int, int]], out: list[str]) -> None:
    h = hashlib.sha256()
    mv = buf.data
    for _, s, n in sorted(items, key=lambda t: (os.path.basename(t[0]), t[0])):
        h.update(mv[s : s + n])  # releases the GIL: runs beside the pixel work
    out.append(h.hexdigest())


def _untilt_slice(plane: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Shift one (rows, cols) slice in-plane by ``shift`` pixels: out[x] = in[x - shift], linear, air outside."""
    from scipy import ndimage

    if abs(shift[0]) < 1e-9 and abs(shift[1]) < 1e-9:
        return plane
    out = ndimage.shift(plane.astype(np.float32), shift, order=1, mode="constant", cval=float(AIR_HU), prefilter=False)
    return np.rint(out).astype(np.int16)


def _pad_range(h: SliceHeader) -> tuple[float, float]:
    """PixelPaddingValue (..PixelPaddingRangeLimit) in stored units; (1, 0) = empty range when absent."""
    if h.padding_value is None:
        return 1.0, 0.0
    if h.padding_range_limit is None:
        return float(h.padding_value), float(h.padding_value)
    a, b = sorted((h.padding_value, h.padding_range_limit))
    return float(a), float(b)


def _pixel_source(
    hs: list[SliceHeader], parsed: dict[str, tuple[int, int | None, np.ndarray | None]], buf: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(flat 1D stored values, per-slice start index) for the kernel: a zero-copy int16/uint16 view of the read
    buffer when every slice is native with one signedness, else a stacked copy of the decoded slices."""
    R_, C_ = int(hs[0].rows or 0), int(hs[0].cols or 0)  # present: series_geometry checked every slice
    offs = [parsed[h.path][0] + (parsed[h.path][1] or 0) for h in hs]
    native = all(parsed[h.path][1] is not None for h in hs)
    signs = {h.pixel_representation for h in hs}
    if native and len(signs) == 1 and all(o % 2 == 0 for o in offs):
        flat = buf[: (buf.size // 2) * 2].view("<i2" if signs == {1} else "<u2")
        return flat, np.array(offs, np.int64) // 2
    arrs = []
    for h in hs:
        s, off, arr = parsed[h.path]
        if arr is None:  # native slice in a mixed series
            dt = "<i2" if h.pixel_representation == 1 else "<u2"
            arr = np.frombuffer(buf, dt, count=R_ * C_, offset=s + off).reshape(R_, C_)  # type: ignore[operator]
        if arr.shape != (R_, C_):
            raise IngestError(
                R.bad_shape, f"{h.path}: pixels {arr.shape} != Rows x Columns {(R_, C_)}", series_uid=h.series_uid
            )
        arrs.append(arr)
    kinds = {a.dtype for a in arrs}
    out_dt: np.dtype = (
        kinds.pop()
        if len(kinds) == 1 and next(iter(kinds)).kind in "iu" and arrs[0].dtype.itemsize <= 2
        else np.dtype(np.float64)
    )
    stack = np.empty((len(hs), R_, C_), out_dt)
    for k, a in enumerate(arrs):
        stack[k] = a
    return stack.reshape(-1), np.arange(len(hs), dtype=np.int64) * (R_ * C_)


def _load_dicom(c: Candidate) -> tuple[VolumeRecord, np.ndarray]:
    cfg = c.config
    paths = list(c.paths)
    if not paths:
        raise IngestError(R.empty_input, f"{c.input}: candidate without files")
    buf, spans = _read_all(paths)
    digest: list[str] = []
    hasher = threading.Thread(target=_sha256_sorted, args=(buf, [(p, s, n) for p, (s, n) in zip(paths, spans)], digest))
    hasher.start()
    try:
        mv = buf.data
        parsed: dict[str, tuple[int, int | None, np.ndarray | None]] = {}
        headers = []
        for p, (s, n) in zip(paths, spans):
            h, off, arr = _parse_one(p, mv[s : s + n])
            parsed[p] = (s, off, arr)
            headers.append(h)
        uids = {h.series_uid for h in headers}
        if c.series_uid and uids != {c.series_uid}:
            raise IngestError(
                R.inconsistent_geometry,
                f"{c.input}: files changed since planning (series {sorted(uids)})",
                series_uid=c.series_uid,
            )
        if c.sop_uids and sorted(h.sop_uid for h in headers) != sorted(c.sop_uids):
            raise IngestError(
                R.inconsistent_geometry, f"{c.input}: SOP instances changed since planning", series_uid=c.series_uid
            )
        geom = series_geometry(headers, cfg)  # the same checks as planning, from the full headers
        hs = geom.headers
        flat, starts = _pixel_source(hs, parsed, buf)
        reader = "xwin.fastdicom" if all(parsed[h.path][1] is not None for h in hs) else "pydicom"

        # canonical order decided from the geometry, applied while converting (one pass over the pixels)
        aff_in = to_ras(geom.affine_lps)
        in_shape = geom.shape  # (X = cols, Y = rows, Z = slices)
        ornt = orientation(aff_in)
        direct = int(ornt[2, 0]) == 2 and geom.tilt_shift_px is None
        Z = len(hs)
        if direct:
            src_of = [int(np.flatnonzero(ornt[:, 0] == a)[0]) for a in range(3)]
            out_shape = tuple(in_shape[i] for i in src_of)
            swap, flip0, flip1 = src_of[0] == 1, bool(ornt[src_of[0], 1] < 0), bool(ornt[src_of[1], 1] < 0)
            zflip = bool(ornt[2, 1] < 0)
        else:  # identity placement into (X, Y, Z); untilt and reorient afterwards
            out_shape, swap, flip0, flip1, zflip = in_shape, False, False, False, False
        vol = np.empty(out_shape, np.int16, order="F")
        pads = np.array([_pad_range(h) for h in hs], np.float64)
        lo = np.empty(Z)
        hi = np.empty(Z)
        bad = np.zeros(Z, np.int8)
        hist = np.zeros((max(1, min(nb_threads(), Z)), 65536), np.int64)
        with KERNEL_LOCK:
            assemble_hu(
                flat,
                starts,
                int(hs[0].rows or 0),
                int(hs[0].cols or 0),
                np.array([h.slope for h in hs], np.float64),
                np.array([h.intercept for h in hs], np.float64),
                pads[:, 0].copy(),
                pads[:, 1].copy(),
                float(cfg.padding_hu_at_or_below),
                float(AIR_HU),
                vol.T,
                swap,
                flip0,
                flip1,
                zflip,
                lo,
                hi,
                bad,
                hist,
            )
        del flat, parsed
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise IngestError(
                R.hu_out_of_range,
                f"{hs[k].path}: HU range [{lo[k]:g}, {hi[k]:g}] does not fit int16",
                series_uid=c.series_uid,
            )
        real = np.isfinite(lo)
        check_hu_range(
            float(lo[real].min()) if real.any() else None,
            float(hi[real].max()) if real.any() else float(AIR_HU),
            cfg,
            c.input,
        )
        counts = hist.sum(axis=0)
        if direct:
            aff = aff_in @ inv_ornt_aff(ornt, in_shape)
        else:
            if geom.tilt_shift_px is not None:
                sh = geom.tilt_shift_px
                for k in range(Z):  # vol[:, :, k] is slice k transposed: (cols, rows)
                    plane = np.ascontiguousarray(vol[:, :, k].T)
                    vol[:, :, k] = _untilt_slice(plane, (k * sh[0], k * sh[1])).T
                counts = None
            vol, aff = canonical_ras(vol, aff_in)
    finally:
        hasher.join()
    del buf
    notes = list(c.notes) + [n for n in geom.notes if n not in c.notes]
    return _finish(c, vol, aff, reader=reader, checksum=digest[0], n_files=len(paths), notes=notes, counts=counts)


# ---------------------------------------------------------------- NIfTI
def _load_nifti(c: Candidate) -> tuple[VolumeRecord, np.ndarray]:
    import nibabel as nib

    cfg = c.config
    path = c.paths[0]
    try:
        img: Any = nib.load(path)  # a NIfTI image (nibabel types it as the file-based base class)
    except Exception as e:
        raise IngestError(R.unreadable_file, f"{c.input}: NIfTI does not parse ({type(e).__name__}: {e})") from e
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise IngestError(R.bad_shape, f"{c.input}: shape {tuple(img.shape)} is not a 3D scalar volume")
    dtype = img.get_data_dtype()
    # the array proxy's scaling is what nibabel applies (it can differ from the raw scl_* header fields)
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    integral = np.issubdtype(dtype, np.integer) and slope == 1.0 and inter == round(inter)
    try:
        if integral:
            data = np.asarray(img.dataobj.get_unscaled())
            if inter != 0.0:
                info = np.iinfo(data.dtype)
                fits = info.min <= int(data.min()) + int(inter) and int(data.max()) + int(inter) <= info.max
                if fits and data.flags.writeable:
                    data += data.dtype.type(int(inter))  # in place, no widening copy
                else:
                    data = data.astype(np.int32) + int(inter)
        else:
            data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise IngestError(R.unreadable_file, f"{c.input}: NIfTI data unreadable ({type(e).__name__}: {e})") from e
    data = data.reshape(shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise IngestError(R.inconsistent_geometry, f"{c.input}: singular or non-finite affine {affine.tolist()}")
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise IngestError(R.non_finite_values, f"{c.input}: {bad} NaN/inf voxel(s) (first at {first})")
        hu = np.round(data)
        if hu.min() < -32768 or hu.max() > 32767:
            raise IngestError(R.hu_out_of_range, f"{c.input}: values [{hu.min():g}, {hu.max():g}] do not fit int16")
    else:
        hu = data.astype(np.int32) if data.dtype.itemsize > 2 or data.dtype == np.uint16 else data
        if (data.dtype.itemsize > 2 or data.dtype == np.uint16) and (hu.min() < -32768 or hu.max() > 32767):
            raise IngestError(R.hu_out_of_range, f"{c.input}: values [{hu.min()}, {hu.max()}] do not fit int16")
    pad = hu <= cfg.padding_hu_at_or_below
    lo: float | None
    if not hu.flags.writeable:
        hu = hu.copy()
    if pad.any():
        hu[pad] = AIR_HU
        lo = float(hu.min())
        if lo >= AIR_HU:  # the minimum may be padding turned air: look at real voxels only
            real = ~pad
            lo = float(hu[real].min()) if real.any() else None
    else:
        lo = float(hu.min())
    check_hu_range(lo, float(hu.max()), cfg, c.input)
    vol = hu.astype(np.int16, copy=False)
    return _finish(
        c, vol, affine, reader="nibabel", checksum=c.checksum or "", n_files=1, notes=list(c.notes), canonical=True
    )


# ---------------------------------------------------------------- common tail
def _finish(
    c: Candidate,
    vol: np.ndarray,
    affine_ras: np.ndarray,
    *,
    reader: str,
    checksum: str,
    n_files: int,
    notes: list[str],
    canonical: bool = False,
    counts: np.ndarray | None = None,
) -> tuple[VolumeRecord, np.ndarray]:
    cfg = c.config
    if canonical:
        vol, aff = canonical_ras(vol, affine_ras)
    else:
        aff = affine_ras
    if cfg.spacing_mm is not None:
        vol, aff = resample_to_spacing(vol, aff, cfg.spacing_mm)
        counts = None
        notes.append(f"resampled (linear) to spacing {tuple(cfg.spacing_mm)} mm")
    spacing = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    acq = c.acquisition
    checks = []
    if cfg.qc:
        agent = acq.contrast_agent if acq is not None else None
        checks = quality_checks(vol, spacing, contrast_agent=agent, has_header=acq is not None)  # type: ignore[arg-type]
        for q in checks:
            if q.flagged and q.name in cfg.qc_reject:
                raise IngestError(
                    RejectReason(f"qc_{q.name}"), f"{c.input}: quality check {q.name}: value {q.value} ({q.rule})"
                )
    subject, acq = deidentify(c.subject_id, acq, cfg.deid_salt)
    rec = VolumeRecord(
        volume_id=c.volume_id,
        cohort=c.cohort,
        source=c.input,
        kind=c.kind,
        subject_id=subject,
        study_uid=c.study_uid,
        series_uid=c.series_uid,
        shape=tuple(int(s) for s in vol.shape),
        spacing_mm=spacing,
        affine=[[float(x) for x in row] for row in aff],
        hu=hu_stats(vol, counts),
        provenance=Provenance(
            reader=reader, versions=_versions(), input_checksum=checksum, input_files=n_files, notes=notes
        ),
        series_choices=list(c.series_choices),
        excluded_images=list(c.excluded_images),
        acquisition=acq,
        qc=checks,
        fingerprint=content_fingerprint(vol, aff),
    )
    return rec, vol
