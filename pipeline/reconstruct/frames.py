"""The orbit frame: a rigid change of world coordinates that puts a fitted rotation axis on +y through the origin.

RTK's FDK assumes the gantry rotates about its y axis (ASTRA's about z, through the volume centre); our world
(RAS mm) rotates about +z through the volume centre. Both library backends therefore get rigidly moved copies of
the *same* ConeBeamViews and grid (a rotation + translation changes no line integral and no FDK weight), built
here from the fitted :class:`Orbit`, so no angle or flip convention is re-invented.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Float64

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct.grid import ReconGrid
from xwin.pipeline.reconstruct.orbit import Orbit


def orbit_frame(orbit: Orbit, views: ConeBeamViews, axis_to: str = "y") -> Float64[np.ndarray, "4 4"]:
    """(4, 4) rigid transform world -> frame with the rotation axis on +``axis_to`` ('y' for RTK, 'z' for ASTRA)
    through the origin and the first source on +z ('y') or -y ('z', ASTRA's angle-0 source side)."""
    n = orbit.axis / np.linalg.norm(orbit.axis)
    r = views.src[0] - orbit.center
    r = r - (r @ n) * n
    r /= np.linalg.norm(r)
    if axis_to == "y":
        rows = [np.cross(n, r), n, r]  # x' = y' x z', y' = axis, z' = first source direction
    elif axis_to == "z":
        rows = [np.cross(-r, n), -r, n]  # x' = y' x z', y' = -(first source direction), z' = axis
    else:
        raise ValueError("axis_to must be 'y' or 'z'")
    R = np.stack(rows)
    assert np.isclose(np.linalg.det(R), 1.0)
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ orbit.center
    return T


def transform_views(views: ConeBeamViews, T: Float[np.ndarray, "4 4"]) -> ConeBeamViews:
    """The same views expressed in the frame ``T`` (4x4 rigid, world -> frame)."""
    R, t = T[:3, :3], T[:3, 3]
    return ConeBeamViews(
        src=views.src @ R.T + t,
        det=views.det @ R.T + t,
        u=views.u @ R.T,
        v=views.v @ R.T,
        height=views.height,
        width=views.width,
        yaw_deg=views.yaw_deg,
    )


def transform_grid(grid: ReconGrid, T: Float[np.ndarray, "4 4"]) -> ReconGrid:
    """The same grid (same voxels, same index order) with its affine expressed in the frame ``T``."""
    return ReconGrid(grid.shape, T @ grid.affine)
