"""Circular-orbit analysis of a set of cone-beam views, from their ``cone_vec`` rows only.

FDK needs a circular source orbit: a rotation axis, the orbit radius (SID), the gantry angle of every view, and
the detector row direction in the rotation plane. Everything here is *measured* from ConeBeamViews (which come
from the stored per-view ``cone_vec``), never taken from a RenderSpec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from jaxtyping import Float64

from xwin.pipeline.geometry import ConeBeamViews


class GeometryError(ValueError):
    """The views do not form a geometry this reconstructor supports (the message says why)."""


@dataclass(frozen=True)
class Orbit:
    """A fitted circular orbit.

    Attributes (V views):
        center: (3,) a point on the rotation axis (centre of the source circle), world mm
        axis: (3,) unit rotation axis, oriented so that ``angles_rad`` increase with the view index
        angles_rad: (V,) unwrapped gantry angle of each source about ``axis`` (first view in [0, 2pi))
        sid: (V,) source to axis distance, mm
        sdd: (V,) source to detector-plane distance along the detector normal, mm
        u_along_motion: (V,) +1 where the detector u (column) step points along the source motion, else -1
        arc_rad: angular range covered, counting one angular step per view (V * mean step)
        full: True when the views cover a full orbit (arc >= 2pi)
        fov_radius: radius (mm) of the axis-centred cylinder every view's detector fan covers
        max_fan_rad: largest |fan angle| of the detector columns (half the fan)
        residual_mm: largest distance of a source from the fitted circle
    """

    center: Float64[np.ndarray, "3"]
    axis: Float64[np.ndarray, "3"]
    angles_rad: Float64[np.ndarray, " V"]
    sid: Float64[np.ndarray, " V"]
    sdd: Float64[np.ndarray, " V"]
    u_along_motion: Float64[np.ndarray, " V"]
    arc_rad: float
    full: bool
    fov_radius: float
    max_fan_rad: float
    residual_mm: float
    notes: list[str] = field(default_factory=list)

    @property
    def step_rad(self) -> float:
        return float(self.arc_rad / len(self.angles_rad))

    def angular_weights(self) -> Float64[np.ndarray, " V"]:
        """(V,) angular integration weight of each view (rad): half the gap to each neighbour.

        Full orbits wrap around; the two ends of a short scan take one full step each side.
        """
        a = self.angles_rad
        V = len(a)
        if V == 1:
            return np.array([self.arc_rad])
        order = np.argsort(a)
        s = a[order]
        gaps = np.diff(s)
        w = np.empty(V)
        if self.full:
            wrap = 2 * np.pi - (s[-1] - s[0])
            left = np.r_[wrap, gaps]
            right = np.r_[gaps, wrap]
        else:
            step = self.step_rad
            left = np.r_[step, gaps]
            right = np.r_[gaps, step]
        w[order] = 0.5 * (left + right)
        if self.full:
            w *= 2 * np.pi / w.sum()  # redundant over-coverage (> 2pi) is averaged, not summed
        return w

    def to_dict(self) -> dict:
        return {
            "center_mm": self.center.tolist(),
            "axis": self.axis.tolist(),
            "sid_mm": float(np.mean(self.sid)),
            "sdd_mm": float(np.mean(self.sdd)),
            "arc_deg": float(np.rad2deg(self.arc_rad)),
            "full_orbit": bool(self.full),
            "fov_radius_mm": float(self.fov_radius),
            "half_fan_deg": float(np.rad2deg(self.max_fan_rad)),
            "orbit_residual_mm": float(self.residual_mm),
            "notes": list(self.notes),
        }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fit_orbit(views: ConeBeamViews, tol_mm: float = 0.5) -> Orbit:
    """Fit the circular orbit of ``views`` (needs >= 3 views with distinct sources, or v parallel to the axis).

    Raises GeometryError when the sources are not on a circle within ``tol_mm`` or the detector rows are not in
    the rotation plane (FDK's ramp filter runs along detector rows).
    """
    src = np.asarray(views.src, dtype=np.float64)
    V = len(views)
    if V < 2:
        raise GeometryError(f"FDK needs at least 2 views, got {V}")
    # axis: normal of the best plane through the sources (or the detector v direction when degenerate)
    m = src.mean(0)
    _, sv, vt = np.linalg.svd(src - m)
    if V >= 3 and sv[1] > 1e-6 * max(sv[0], 1e-12):
        axis = vt[2]
    else:
        axis = _unit(views.v.mean(0))
    # circle centre in the plane: least squares |p - c|^2 = r^2 in 2-D plane coordinates
    e1 = _unit(src[0] - m) if np.linalg.norm(src[0] - m) > 1e-9 else _unit(np.cross(axis, [1.0, 0.0, 0.0]))
    e1 = _unit(e1 - axis * (e1 @ axis))
    e2 = np.cross(axis, e1)
    p = np.stack([(src - m) @ e1, (src - m) @ e2], 1)
    if V >= 3:
        Amat = np.c_[2 * p, np.ones(V)]
        sol, *_ = np.linalg.lstsq(Amat, (p**2).sum(1), rcond=None)
        c2 = sol[:2]
    else:  # two views: assume the axis passes through the detector-centre/source lines' closest points
        c2 = np.zeros(2)
        for k in range(2):
            dk = views.det[k] - src[k]
            t = -((src[k] - m) @ dk) / (dk @ dk)
            q = src[k] - m + t * dk
            c2 += np.array([q @ e1, q @ e2]) / 2
    center = m + c2[0] * e1 + c2[1] * e2
    rel = src - center
    rel_in = rel - np.outer(rel @ axis, axis)
    sid = np.linalg.norm(rel_in, axis=1)
    residual = float(np.max(np.abs(sid - sid.mean())) + np.max(np.abs(rel @ axis - (rel @ axis).mean())))
    if residual > tol_mm:
        raise GeometryError(f"sources are not on a circular orbit (deviation {residual:.3g} mm > {tol_mm} mm)")
    ang = np.unwrap(np.arctan2(rel_in @ e2, rel_in @ e1))
    if V >= 2 and ang[-1] < ang[0]:
        axis, e2 = -axis, -e2
        ang = np.unwrap(np.arctan2(rel_in @ e2, rel_in @ e1))
    ang = ang - 2 * np.pi * np.floor(ang[0] / (2 * np.pi))
    if np.any(np.diff(ang) <= 0):
        raise GeometryError("views are not ordered by gantry angle (monotonic orbit expected)")
    notes: list[str] = []
    # detector frame checks
    uh, vh = _unit(views.u), _unit(views.v)
    if np.max(np.abs(uh @ axis)) > 1e-3:
        raise GeometryError("detector rows (u) are not in the rotation plane: FDK needs a circular-orbit geometry")
    n = _unit(np.cross(uh, vh))
    sdd = np.abs(np.einsum("ij,ij->i", views.det - src, n))
    tangent = np.cross(axis, _unit(rel_in))
    sgn = np.sign(np.einsum("ij,ij->i", uh, tangent))
    if np.any(sgn != sgn[0]):
        raise GeometryError("detector u direction flips relative to the source motion between views")
    # arc: unwrapped span plus one step (each view covers one step)
    steps = np.diff(ang)
    step = float(np.median(steps)) if V > 1 else 2 * np.pi
    if V > 2 and np.max(np.abs(steps - step)) > 1e-3 * max(step, 1e-9):
        notes.append("angular steps are not uniform; angular gaps used as weights")
    arc = float(ang[-1] - ang[0] + step)
    full = arc >= 2 * np.pi - 1e-6
    # field of view: distance from the axis to the fan's edge rays (in-plane), smallest over views and both edges
    fov = np.inf
    max_fan = 0.0
    for k in range(V):
        for c in (-0.5, views.width - 0.5):
            edge = views.det[k] + (c - (views.width - 1) / 2.0) * views.u[k]
            d = edge - src[k]
            d_in = d - (d @ axis) * axis
            r = src[k] - center
            r_in = r - (r @ axis) * axis
            # distance from the axis point (0 in-plane) to the line r_in + t d_in
            cross = np.linalg.norm(np.cross(r_in, d_in)) / np.linalg.norm(d_in)
            fov = min(fov, float(cross))
            cosang = -(r_in @ d_in) / (np.linalg.norm(r_in) * np.linalg.norm(d_in))
            max_fan = max(max_fan, float(np.arccos(np.clip(cosang, -1, 1))))
    return Orbit(center, axis, ang, sid, sdd, sgn, arc, bool(full), fov, max_fan, residual, notes)
