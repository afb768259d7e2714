"""ASTRA ``FDK_CUDA`` (GPU). UNTESTED ON A GPU in the session that wrote it (no CUDA there); the pure geometry
conversion (:func:`astra_setup`) is unit-tested against ``xwin.pipeline.geometry.project_points`` using ASTRA's own
projection convention, and the call sequence follows ASTRA 2.5's source (src/CudaFDKAlgorithm3D.cpp,
cuda/3d/fdk.cu, src/GeometryUtil3D.cpp, cuda/3d/cone_bp.cu):

* ``cone_vec`` row: (src, detector centre, u = pixel (0,0)->(0,1), v = (0,0)->(1,0)); projection data array
  (det_rows, n_views, det_cols); detector pixel (row r, col c) centre at d + (c - (W-1)/2) u + (r - (H-1)/2) v.
* Volume array (slices, rows, cols) = [z, y, x]; voxel [iz, iy, ix] centre at
  (MinX + (ix + 1/2) s, MinY + (iy + 1/2) s, MinZ + (iz + 1/2) s) (cone_bp.cu: fX = X - nX/2 + 1/2 after
  GeometryUtil3D translates by the window centre and scales by the voxel size). All axes increasing.
* FDK_CUDA: cubic voxels only (CudaFDKAlgorithm3D::_check); geometry read as a circular orbit about the volume
  window's z axis through its (x, y) centre, u in the xy plane, v parallel to z, sizes from view 0 (fdk.cu:
  "We don't support arbitrary cone_vec geometries"); ``ShortScan`` = Parker weights; FilterType 'hann' with
  FilterD = cut-off fraction of Nyquist is the same window as ours and RTK's ``HannCutFrequency``.

So the views are rigidly moved into the orbit frame (axis = +z through the origin, ``frames.orbit_frame``), rows
are flipped when v points to -z (a relabelling: same rays), the reconstruction runs on an axis-centred cubic grid
covering the requested one at its in-plane voxel size, and is trilinearly resampled onto the requested grid.
Without CUDA, FDK_CUDA aborts the whole process, so :func:`cuda_available` probes in a subprocess first.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float, Float32, Float64

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct.frames import orbit_frame, transform_views
from xwin.pipeline.reconstruct.grid import ReconGrid
from xwin.pipeline.reconstruct.orbit import GeometryError, Orbit, fit_orbit

_PROBE = "import astra, sys; sys.exit(0 if astra.use_cuda() else 3)"


@functools.lru_cache(maxsize=1)
def cuda_available(timeout_s: float = 60.0) -> bool:
    """True when ASTRA's CUDA path works, probed in a child process (a crash there cannot take us down)."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=timeout_s, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return r.returncode == 0


@dataclass(frozen=True)
class AstraSetup:
    """Everything FDK_CUDA needs, in ASTRA's conventions (see module doc).

    vectors: (V, 12) cone_vec rows in the orbit frame (rows flipped when ``flip_rows``)
    det_rows, det_cols: detector size
    vol_shape: (nz, ny, nx) ASTRA volume array shape; voxel size ``voxel_mm`` (cubic)
    window: (min_x, max_x, min_y, max_y, min_z, max_z) in the orbit frame, mm
    flip_rows: projections must be passed as proj[:, ::-1, :]
    world_affine: (4, 4) index (ix, iy, iz) of the transposed (x, y, z) ASTRA volume -> world mm
    """

    vectors: Float64[np.ndarray, "V 12"]
    det_rows: int
    det_cols: int
    vol_shape: tuple[int, int, int]
    voxel_mm: float
    window: tuple[float, float, float, float, float, float]
    flip_rows: bool
    world_affine: Float64[np.ndarray, "4 4"]


def astra_setup(views: ConeBeamViews, grid: ReconGrid, orbit: Orbit | None = None, tol: float = 1e-4) -> AstraSetup:
    """Convert our views and requested grid into an FDK_CUDA-compatible geometry (raises GeometryError if none)."""
    orbit = fit_orbit(views) if orbit is None else orbit
    T = orbit_frame(orbit, views, "z")
    va = transform_views(views, T)
    uh = va.u / np.linalg.norm(va.u, axis=1, keepdims=True)
    vh = va.v / np.linalg.norm(va.v, axis=1, keepdims=True)
    if np.max(np.abs(uh[:, 2])) > tol or np.max(np.abs(np.abs(vh[:, 2]) - 1)) > tol:
        raise GeometryError("FDK_CUDA needs u in the rotation plane and v parallel to the rotation axis")
    if np.any(np.sign(vh[:, 2]) != np.sign(vh[0, 2])):
        raise GeometryError("detector v direction flips between views")
    for name, a in (
        ("|u|", np.linalg.norm(va.u, axis=1)),
        ("|v|", np.linalg.norm(va.v, axis=1)),
        ("SID", orbit.sid),
        ("SDD", orbit.sdd),
        ("source z", va.src[:, 2]),
        ("detector z", va.det[:, 2]),
    ):
        if np.ptp(a) > tol * max(1.0, float(np.abs(a).max())):
            raise GeometryError(f"FDK_CUDA reads one circular geometry from view 0, but {name} varies between views")
    flip = bool(vh[0, 2] < 0)
    v = -va.v if flip else va.v
    vectors = np.concatenate([va.src, va.det, va.u, v], axis=1)
    # axis-centred cubic grid covering the requested grid (in-plane voxel size of the requested grid)
    s = float(np.min(grid.spacing[:2])) if grid.shape[2] > 1 else float(np.min(grid.spacing))
    c = grid.corners() @ T[:3, :3].T + T[:3, 3]
    half = np.max(np.abs(c[:, :2]), axis=0)
    nx, ny = (int(np.ceil(2 * h / s - 1e-6)) for h in half)
    z0, z1 = float(c[:, 2].min()), float(c[:, 2].max())
    nz = max(1, int(np.ceil((z1 - z0) / s - 1e-6)))
    zc = (z0 + z1) / 2
    window = (-nx * s / 2, nx * s / 2, -ny * s / 2, ny * s / 2, zc - nz * s / 2, zc + nz * s / 2)
    A = np.eye(4)
    A[:3, :3] = np.eye(3) * s
    A[:3, 3] = [window[0] + s / 2, window[2] + s / 2, window[4] + s / 2]
    world_affine = np.linalg.inv(T) @ A
    return AstraSetup(vectors, views.height, views.width, (nz, ny, nx), s, window, flip, world_affine)


def astra_project_points(
    setup: AstraSetup, view: int, points_frame: Float[np.ndarray, "N 3"]
) -> Float64[np.ndarray, "N 2"]:
    """ASTRA's cone_vec convention, written from its definition: (N, 2) continuous (row, col) of frame points.

    Point X hits the detector plane at det_corner + a u + b v with det_corner = d - W/2 u - H/2 v; ASTRA samples
    pixel centres at a = col + 1/2, b = row + 1/2.
    """
    sv = setup.vectors[view]
    s, d, u, v = sv[0:3], sv[3:6], sv[6:9], sv[9:12]
    corner = d - setup.det_cols / 2 * u - setup.det_rows / 2 * v
    out = []
    for X in np.atleast_2d(points_frame):
        # X = s + t (corner + a u + b v - s)  ->  solve [u v -(X-s)] (a, b, 1/t) = s - corner
        M = np.stack([u, v, -(X - s)], 1)
        a, b, _ = np.linalg.solve(M, s - corner)
        out.append((b - 0.5, a - 0.5))
    return np.asarray(out)


def fdk(
    projections: Float[np.ndarray, "V H W"],
    views: ConeBeamViews,
    grid: ReconGrid,
    orbit: Orbit | None = None,
    short_scan: bool | None = None,
    window: str = "hann",
    cutoff: float = 1.0,
) -> tuple[Float32[np.ndarray, "nx ny nz"], dict[str, Any]]:
    """ASTRA FDK_CUDA -> (mu (nx, ny, nz) float32 [1/mm] on ``grid``, info). Needs CUDA (probed first)."""
    if not cuda_available():
        raise RuntimeError("ASTRA FDK_CUDA needs a CUDA GPU; none found (probe ran in a subprocess)")
    import astra

    from xwin.pipeline.reconstruct.metrics import resample_to_grid

    orbit = fit_orbit(views) if orbit is None else orbit
    st = astra_setup(views, grid, orbit)
    p = np.asarray(projections, dtype=np.float32)
    if st.flip_rows:
        p = p[:, ::-1, :]
    sino = np.ascontiguousarray(p.transpose(1, 0, 2))  # (det_rows, n_views, det_cols)
    nz, ny, nx = st.vol_shape
    vol_geom = astra.create_vol_geom(ny, nx, nz, *st.window)
    proj_geom = astra.create_proj_geom("cone_vec", st.det_rows, st.det_cols, st.vectors)
    use_parker = (not orbit.full) if short_scan is None else bool(short_scan)
    sino_id = astra.data3d.create("-sino", proj_geom, sino)
    rec_id = astra.data3d.create("-vol", vol_geom, 0.0)
    try:
        cfg = astra.astra_dict("FDK_CUDA")
        cfg["ProjectionDataId"] = sino_id
        cfg["ReconstructionDataId"] = rec_id
        cfg["option"] = {"ShortScan": use_parker, "FilterType": window, "FilterD": float(cutoff)}
        alg = astra.algorithm.create(cfg)
        try:
            astra.algorithm.run(alg)
        finally:
            astra.algorithm.delete(alg)
        rec = astra.data3d.get(rec_id)  # (nz, ny, nx)
    finally:
        astra.data3d.delete([sino_id, rec_id])
    xyz = np.ascontiguousarray(rec.transpose(2, 1, 0))
    out = resample_to_grid(xyz, st.world_affine, grid)
    return out, {"short_scan": use_parker, "astra_grid": list(st.vol_shape), "astra_voxel_mm": st.voxel_mm}
