"""``reconstruct``: FDK of line integrals taken with any ``ConeBeamViews`` on a circular orbit, by one of three
backends, onto a grid in the world frame.

Shapes in signatures (jaxtyping): ``V H W`` views, detector rows and columns; ``nx ny nz`` the grid's voxels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from jaxtyping import Float, Float32

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct.grid import ReconGrid
from xwin.pipeline.reconstruct.orbit import Orbit, fit_orbit

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

    mu: Float32[np.ndarray, "nx ny nz"]
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
    projections: Float[np.ndarray, "V H W"], views: ConeBeamViews, orbit: Orbit, edge: int = 2, threshold: float = 0.05
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
    projections: Float[np.ndarray, "V H W"],
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
