"""FDK reconstruction of stored DRR rings and the 3-D validation loop (docs/reconstruction.md).

    reconstruct(projections (V,H,W) [mu*mm], views: ConeBeamViews, grid, backend) -> Reconstruction (mu [1/mm])
    validate_volume(projections, views, hu, affine, mu_water, ...) -> ValidationResult (metrics + arrays)

Geometry comes only from ``views`` (for stored rings: the stored ``cone_vec``s, ``flows.validate``), never from a
RenderSpec. Backends:
    "numba"  our CPU FDK (FFT ramp filter + numba voxel-driven backprojection) -- fdk_numba
    "rtk"    RTK's CPU FDK, the independent reference                           -- fdk_rtk
    "astra"  ASTRA FDK_CUDA (GPU; untested on a GPU so far)                     -- fdk_astra
    "auto"   "astra" where ASTRA's CUDA probe passes (in a subprocess), else "numba"
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct.grid import ReconGrid, default_grid
from xwin.pipeline.reconstruct.orbit import GeometryError, Orbit, fit_orbit

__all__ = [
    "BACKENDS",
    "GeometryError",
    "Orbit",
    "ReconGrid",
    "Reconstruction",
    "ValidationResult",
    "default_cutoff",
    "default_grid",
    "fit_orbit",
    "fov_grid",
    "reconstruct",
    "resolve_backend",
    "truncation_report",
    "validate_volume",
]

BACKENDS = ("numba", "rtk", "astra")


def resolve_backend(name: str = "auto") -> str:
    """'auto' -> 'astra' where ASTRA's CUDA works (probed in a subprocess), else 'numba'."""
    from xwin.pipeline.reconstruct.fdk_astra import cuda_available

    if name == "auto":
        return "astra" if cuda_available() else "numba"
    if name not in BACKENDS:
        raise ValueError(f"unknown reconstruction backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    if name == "astra" and not cuda_available():
        raise RuntimeError("backend 'astra' needs CUDA (ASTRA's FDK_CUDA); none found here")
    return name


@dataclass
class Reconstruction:
    """mu: (nx, ny, nz) float32 [1/mm] on ``grid``; info: backend details (short scan, truncation, filter...)."""

    mu: np.ndarray
    grid: ReconGrid
    backend: str
    seconds: float
    orbit: Orbit
    info: dict = field(default_factory=dict)


def default_cutoff(views: ConeBeamViews, orbit: Orbit, grid: ReconGrid) -> float:
    """Hann cut-off (fraction of the detector Nyquist) matched to the grid: the grid's in-plane Nyquist frequency
    at the isocentre, capped at 1. 1 mm pixels at magnification 1.457 on a 1.406 mm grid -> 0.49."""
    pitch_iso = float(np.mean(np.linalg.norm(views.u, axis=1) * orbit.sid / orbit.sdd))
    return float(min(1.0, pitch_iso / float(np.min(grid.spacing[:2]))))


def fov_grid(views: ConeBeamViews, orbit: Orbit | None = None, inplane_mm: float = 1.4) -> ReconGrid:
    """An axis-aligned grid covering the scanned field of view (when no CT grid is given): the FOV cylinder
    in-plane at ~``inplane_mm`` and the detector's axial coverage at the axis at the detector row pitch there."""
    orbit = fit_orbit(views) if orbit is None else orbit
    from xwin.pipeline.reconstruct.frames import orbit_frame

    T = orbit_frame(orbit, views, "z")
    n = int(np.ceil(2 * orbit.fov_radius / inplane_mm))
    dz = float(np.mean(np.linalg.norm(views.v, axis=1) * orbit.sid / orbit.sdd))
    nz = max(1, int(views.height * np.mean(np.linalg.norm(views.v, axis=1)) * orbit.sid.mean() / orbit.sdd.mean() / dz))
    s = 2 * orbit.fov_radius / n
    zc = float((T[:3, :3] @ views.det.mean(0) + T[:3, 3])[2])
    A = np.eye(4)
    A[:3, :3] = np.diag([s, s, dz])
    A[:3, 3] = [-(n - 1) / 2 * s, -(n - 1) / 2 * s, zc - (nz - 1) / 2 * dz]
    return ReconGrid((n, n, nz), np.linalg.inv(T) @ A)


def truncation_report(
    projections: np.ndarray, views: ConeBeamViews, orbit: Orbit, edge: int = 2, threshold: float = 0.05
) -> dict:
    """Lateral truncation: does the object reach the detector's edge columns?

    ``edge_fraction``: largest mean line integral of the ``edge`` outermost columns (over rows), relative to the
    largest line integral. ``truncated`` when it exceeds ``threshold``: the object extends beyond the field of
    view (radius ``fov_radius_mm``) and FDK values near the FOV edge are biased (cupping); the validation mask
    stays inside 95% of the FOV radius.
    """
    p = np.asarray(projections)
    peak = float(p.max()) if p.size else 0.0
    if peak <= 0:
        return {"truncated": False, "edge_fraction": 0.0, "truncated_views": 0, "fov_radius_mm": orbit.fov_radius}
    left = p[:, :, :edge].mean(axis=2).max(axis=1)
    right = p[:, :, -edge:].mean(axis=2).max(axis=1)
    e = np.maximum(left, right) / peak
    return {
        "truncated": bool(e.max() > threshold),
        "edge_fraction": float(e.max()),
        "truncated_views": int((e > threshold).sum()),
        "fov_radius_mm": float(orbit.fov_radius),
    }


def reconstruct(
    projections: np.ndarray,
    views: ConeBeamViews,
    grid: ReconGrid | None = None,
    backend: str = "auto",
    *,
    short_scan: bool | None = None,
    window: str = "hann",
    cutoff: float | None = None,
) -> Reconstruction:
    """FDK of ``projections`` (V, H, W) line integrals [mu*mm] taken with ``views`` onto ``grid`` (world frame).

    ``grid`` None: :func:`fov_grid`. ``short_scan`` None: Parker weights exactly when the views do not cover a
    full orbit. ``window``/``cutoff``: ramp apodisation (default Hann at :func:`default_cutoff`, i.e. matched
    to the grid's resolution; "ram-lak" for none). Raises GeometryError for non-circular or limited-angle data.
    """
    p = np.asarray(projections)
    if p.ndim != 3 or p.shape != (len(views), views.height, views.width):
        raise ValueError(f"projections must have shape {(len(views), views.height, views.width)}, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("projections contain NaN or inf")
    orbit = fit_orbit(views)
    grid = fov_grid(views, orbit) if grid is None else grid
    cut = default_cutoff(views, orbit, grid) if cutoff is None else float(cutoff)
    name = resolve_backend(backend)
    t0 = time.perf_counter()
    if name == "numba":
        from xwin.pipeline.reconstruct import fdk_numba

        mu, info = fdk_numba.fdk(p, views, grid, orbit, short_scan, window=window, cutoff=cut)
    elif name == "rtk":
        from xwin.pipeline.reconstruct import fdk_rtk

        mu, info = fdk_rtk.fdk(p, views, grid, orbit, short_scan, window=window, cutoff=cut)
    else:
        from xwin.pipeline.reconstruct import fdk_astra

        mu, info = fdk_astra.fdk(p, views, grid, orbit, short_scan, window=window, cutoff=cut)
    seconds = time.perf_counter() - t0
    info = {
        **info,
        "window": window,
        "cutoff": cut,
        "orbit": orbit.to_dict(),
        "truncation": truncation_report(p, views, orbit),
    }
    return Reconstruction(mu, grid, name, seconds, orbit, info)


@dataclass
class ValidationResult:
    """metrics: {"psnr_db", "ssim", "ssim_in_mask", "backend", "seconds", ...}; arrays on ``grid``."""

    metrics: dict
    reference: np.ndarray
    reconstruction: np.ndarray
    mask: np.ndarray
    grid: ReconGrid


def validate_volume(
    projections: np.ndarray,
    views: ConeBeamViews,
    hu: np.ndarray,
    affine: np.ndarray,
    mu_water: float,
    grid: ReconGrid | None = None,
    backend: str = "auto",
    **options,
) -> ValidationResult:
    """Reconstruct and score against the projected volume (HU (X,Y,Z) + affine) on ``grid`` (default: the
    CT's box at ~1.4 mm in-plane, native axial spacing). ``options`` go to :func:`reconstruct`."""
    from xwin.pipeline.reconstruct.metrics import reference_mu, score, validation_mask

    grid = default_grid(affine, np.shape(hu)) if grid is None else grid
    rec = reconstruct(projections, views, grid, backend, **options)
    ref = reference_mu(hu, affine, grid, mu_water)
    mask = validation_mask(grid, rec.orbit)
    if not mask.any():
        raise GeometryError("the validation mask is empty: the grid does not overlap the field of view")
    m = score(ref, rec.mu, mask)
    metrics = {
        "psnr_db": m["psnr_db"],
        "ssim": m["ssim"],
        "backend": rec.backend,
        "seconds": rec.seconds,
        **{k: v for k, v in m.items() if k not in ("psnr_db", "ssim")},
        "grid": grid.to_dict(),
        "mu_water_per_mm": float(mu_water),
        "n_views": len(views),
        "detector": [views.height, views.width],
        **dict(rec.info.items()),
    }
    return ValidationResult(metrics, ref, rec.mu, mask, grid)
