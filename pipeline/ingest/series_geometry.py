"""Validate one DICOM series' geometry from its headers and derive its voxel->LPS affine.

Voxel axes of the assembled stack (before canonicalisation): (column j, row i, slice k), i.e. an array
``stack[k, i, j]`` transposed to (j, i, k). Pixel (i, j) of slice k lies at
``IPP_k + j*dc*r + i*dr*c`` (LPS mm), with ``r, c`` the row/column direction cosines of
ImageOrientationPatient and ``PixelSpacing = (dr, dc)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.dicom_headers import SliceHeader
from xwin.pipeline.ingest.errors import IngestError
from xwin.schemas.ingest import RejectReason

R = RejectReason


@dataclass
class SeriesGeometry:
    """Validated slice order and geometry of a series.

    headers: one per slice, sorted along the slice normal (duplicates removed).
    affine_lps: (4, 4) voxel (j, i, k) -> LPS mm of the output grid (orthogonal after a tilt resample).
    tilt_shift_px: (rows, cols) in-plane shift per slice index to undo a gantry tilt, or None.
    """

    headers: list[SliceHeader]
    affine_lps: np.ndarray
    slice_step_mm: float
    tilt_deg: float = 0.0
    tilt_shift_px: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        h = self.headers[0]
        return (int(h.cols), int(h.rows), len(self.headers))  # type: ignore[arg-type]


def series_geometry(headers: list[SliceHeader], cfg: IngestConfig) -> SeriesGeometry:
    """Check consistency, order slices, drop exact duplicates, check uniform steps and tilt.

    Raises IngestError with inconsistent_geometry, too_few_slices, not_axial, missing_slices,
    nonuniform_spacing, gantry_tilt or bad_shape.
    """
    if not headers:
        raise IngestError(R.empty_input, "series without files")
    uid = headers[0].series_uid
    notes: list[str] = []

    def fail(reason: RejectReason, detail: str) -> IngestError:
        return IngestError(reason, detail, series_uid=uid)

    # -- one image per file, scalar
    for h in headers:
        if h.n_frames != 1 or h.samples_per_pixel != 1:
            raise fail(
                R.bad_shape,
                f"{h.path}: {h.n_frames} frames x {h.samples_per_pixel} samples per pixel "
                "(only single-frame greyscale CT images are supported)",
            )
    # -- same SOP instance twice (copied file): keep one
    seen: dict[str, SliceHeader] = {}
    for h in headers:
        seen.setdefault(h.sop_uid, h)
    if len(seen) < len(headers):
        notes.append(f"dropped {len(headers) - len(seen)} duplicate file(s) of the same SOPInstanceUID")
    headers = list(seen.values())

    # -- consistent in-plane geometry
    h0 = headers[0]
    for name in ("iop", "ipp", "pixel_spacing", "rows", "cols"):
        lacking = [h.path for h in headers if getattr(h, name) is None]
        if lacking:
            raise fail(R.inconsistent_geometry, f"{len(lacking)} slice(s) lack {name} (e.g. {lacking[0]})")
    iop0 = np.asarray(h0.iop, float)
    ps0 = np.asarray(h0.pixel_spacing, float)
    for h in headers[1:]:
        if np.max(np.abs(np.asarray(h.iop) - iop0)) > 1e-4:
            raise fail(R.inconsistent_geometry, f"ImageOrientationPatient differs: {h.iop} vs {h0.iop} ({h.path})")
        if (h.rows, h.cols) != (h0.rows, h0.cols):
            raise fail(
                R.inconsistent_geometry, f"Rows/Columns differ: {h.rows}x{h.cols} vs {h0.rows}x{h0.cols} ({h.path})"
            )
        if np.max(np.abs(np.asarray(h.pixel_spacing) - ps0)) > 1e-4 * max(1.0, ps0.max()):
            raise fail(
                R.inconsistent_geometry, f"PixelSpacing differs: {h.pixel_spacing} vs {h0.pixel_spacing} ({h.path})"
            )
    r, c = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise fail(R.inconsistent_geometry, f"ImageOrientationPatient {h0.iop} is not two orthonormal vectors")
    r = r / np.linalg.norm(r)
    c = c / np.linalg.norm(c)
    n = np.cross(r, c)
    if abs(n[2]) < cfg.min_axial_cos:
        raise fail(R.not_axial, f"slice normal {np.round(n, 3).tolist()} (LPS) is not axial")
    dr, dc = float(ps0[0]), float(ps0[1])
    if dr <= 0 or dc <= 0:
        raise fail(R.inconsistent_geometry, f"PixelSpacing {h0.pixel_spacing} must be positive")

    # -- order along the normal, drop exact duplicate positions
    pos = np.array([h.ipp for h in headers], float)  # (N, 3)
    d = pos @ n
    order = np.lexsort((np.array([h.instance_number or 0 for h in headers]), d))
    headers = [headers[i] for i in order]
    pos, d = pos[order], d[order]
    keep = [0]
    for k in range(1, len(headers)):
        if abs(d[k] - d[keep[-1]]) < 1e-3:
            if np.linalg.norm(pos[k] - pos[keep[-1]]) > 1e-3:
                raise fail(
                    R.inconsistent_geometry,
                    f"two slices at the same depth {d[k]:.3f} mm but different in-plane positions ({headers[k].path})",
                )
            continue
        keep.append(k)
    if len(keep) < len(headers):
        notes.append(f"dropped {len(headers) - len(keep)} slice(s) duplicating a position")
    headers = [headers[i] for i in keep]
    pos, d = pos[keep], d[keep]
    if len(headers) < cfg.min_slices:
        raise fail(R.too_few_slices, f"{len(headers)} slice(s) < minimum {cfg.min_slices}")

    # -- uniform steps along the normal: gaps (integer multiples) vs irregular spacing
    steps = np.diff(d)
    med = float(np.median(steps))
    tol = max(cfg.step_tolerance * med, 1e-3)
    bad = np.flatnonzero(np.abs(steps - med) > tol)
    if bad.size:
        ratios = steps[bad] / med
        k = int(bad[0])
        if np.all(np.abs(ratios - np.round(ratios)) * med <= tol) and np.all(np.round(ratios) >= 2):
            missing = int(np.sum(np.round(ratios) - 1))
            raise fail(
                R.missing_slices,
                f"{missing} slice(s) missing: gap of {steps[k]:.3f} mm after the slice at "
                f"{d[k]:.3f} mm (step {med:.3f} mm)",
            )
        raise fail(
            R.nonuniform_spacing,
            f"slice steps vary: {steps[k]:.3f} mm after the slice at {d[k]:.3f} mm vs "
            f"median {med:.3f} mm (tolerance {tol:.3f})",
        )

    # -- positions on one line; shear of that line against the normal = gantry tilt
    N = len(headers)
    step_vec = (pos[-1] - pos[0]) / (N - 1)
    resid = pos - (pos[0] + np.arange(N)[:, None] * step_vec)
    if np.abs(resid).max() > tol:
        raise fail(
            R.inconsistent_geometry, f"slice positions are not on one line (off by {np.abs(resid).max():.3f} mm)"
        )
    step_n = float(step_vec @ n)
    shear = step_vec - step_n * n
    tilt_deg = math.degrees(math.atan2(float(np.linalg.norm(shear)), abs(step_n)))
    A = np.eye(4)
    A[:3, 0] = r * dc
    A[:3, 1] = c * dr
    A[:3, 3] = pos[0]
    tilt_shift = None
    if h0.gantry_tilt and abs(h0.gantry_tilt) > cfg.tilt_tolerance_deg and tilt_deg <= cfg.tilt_tolerance_deg:
        notes.append(
            f"GantryDetectorTilt {h0.gantry_tilt} deg but slice positions are not sheared: "
            "geometry taken from positions"
        )
    if tilt_deg > cfg.tilt_tolerance_deg:
        if cfg.tilt == "reject":
            raise fail(
                R.gantry_tilt,
                f"slice stack sheared by {tilt_deg:.2f} deg (GantryDetectorTilt {h0.gantry_tilt}); resampling disabled",
            )
        tilt_shift = (float(step_vec @ c) / dr, float(step_vec @ r) / dc)  # pixels per slice (rows, cols)
        A[:3, 2] = step_n * n
        notes.append(
            f"gantry tilt {tilt_deg:.2f} deg resampled onto an orthogonal grid (linear, in-plane shift "
            f"{tilt_shift[0]:.3f} rows, {tilt_shift[1]:.3f} cols per slice)"
        )
    else:
        A[:3, 2] = step_vec
    return SeriesGeometry(
        headers=headers,
        affine_lps=A,
        slice_step_mm=abs(step_n),
        tilt_deg=tilt_deg,
        tilt_shift_px=tilt_shift,
        notes=notes,
    )
