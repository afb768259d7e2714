"""The one definition of the projection geometry.

Every renderer, the stored action metadata, the FDK reconstruction and the training consumer take their rays
from :class:`ConeBeamViews`. Nothing else in the code base decides angles, flips or units.

World frame: the canonical volume's RAS+ frame in millimetres (``affine`` maps voxel (i, j, k) to world).
Ring: the source orbits the isocentre (the centre of the volume's voxel grid) in the axial plane.
At yaw 0 the source is anterior (+A) and the detector posterior; the image is in radiological display:
column index grows towards patient Left (u = -R at yaw 0), row index grows towards Inferior (v = -S).
Yaw is a right-handed rotation about +S, so yaw 90 moves the source to patient Left (-R).
See docs/geometry.md for the derivation and pictures.

Shapes in signatures (jaxtyping): ``V`` views, ``H W`` detector rows and columns, ``N`` points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Float64, Int

from xwin.schemas.render import RenderSpec, ViewMeta

# a voxel -> world 4x4 matrix: an array, or the nested lists a VolumeRecord stores
AffineLike = Float[np.ndarray, "4 4"] | Sequence[Sequence[float]]


def rot_z(deg: Float[np.ndarray, "*batch"] | float) -> Float64[np.ndarray, "*batch 3 3"]:
    """(..., 3, 3) right-handed rotation about +z by ``deg`` degrees."""
    a = np.deg2rad(np.asarray(deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    z, o = np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def volume_center(affine: AffineLike, shape: tuple[int, int, int]) -> Float64[np.ndarray, "3"]:
    """World position (3,) of the centre of the voxel grid (between the first and last voxel centres)."""
    idx = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    return (np.asarray(affine, dtype=np.float64) @ np.append(idx, 1.0))[:3]


@dataclass(frozen=True)
class ConeBeamViews:
    """A set of flat-panel cone-beam views, one ASTRA ``cone_vec`` row each.

    Attributes (V views, detector ``height`` x ``width``):
        src: (V, 3) source positions, world mm
        det: (V, 3) detector centres, world mm (the centre of the pixel grid, between pixel centres)
        u:   (V, 3) step from pixel (r, c) to (r, c+1), mm
        v:   (V, 3) step from pixel (r, c) to (r+1, c), mm
        yaw_deg: (V,) absolute yaw of each view (for the record; rays never depend on it)
    """

    src: Float64[np.ndarray, "V 3"]
    det: Float64[np.ndarray, "V 3"]
    u: Float64[np.ndarray, "V 3"]
    v: Float64[np.ndarray, "V 3"]
    height: int
    width: int
    yaw_deg: Float64[np.ndarray, " V"]

    def __post_init__(self) -> None:
        n = self.src.shape[0]
        for name in ("src", "det", "u", "v"):
            a = getattr(self, name)
            if a.shape != (n, 3):
                raise ValueError(f"{name} must have shape ({n}, 3), got {a.shape}")
        if self.yaw_deg.shape != (n,):
            raise ValueError("yaw_deg must have shape (V,)")

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def ring(cls, spec: RenderSpec, isocenter: Float[np.ndarray, "3"]) -> ConeBeamViews:
        """The yaw ring of ``spec`` around ``isocenter`` (3,) in world mm."""
        yaw = np.asarray(spec.yaws_deg, dtype=np.float64)
        R = rot_z(yaw)  # (V,3,3)
        iso = np.asarray(isocenter, dtype=np.float64)
        src0 = np.array([0.0, spec.sid_mm, 0.0])  # anterior
        det0 = np.array([0.0, spec.sid_mm - spec.sdd_mm, 0.0])  # posterior, through the isocentre axis
        u0 = np.array([-spec.pixel_mm, 0.0, 0.0])  # columns run towards patient left
        v0 = np.array([0.0, 0.0, -spec.pixel_mm])  # rows run towards inferior
        return cls(
            src=iso + R @ src0,
            det=iso + R @ det0,
            u=R @ u0,
            v=R @ v0,
            height=spec.height,
            width=spec.width,
            yaw_deg=yaw,
        )

    @classmethod
    def from_cone_vecs(
        cls,
        cone_vecs: Float[np.ndarray, "V 12"],
        height: int,
        width: int,
        yaw_deg: Float[np.ndarray, " V"] | None = None,
    ) -> ConeBeamViews:
        cv = np.asarray(cone_vecs, dtype=np.float64).reshape(-1, 12)
        yaw = np.full(len(cv), np.nan) if yaw_deg is None else np.asarray(yaw_deg, dtype=np.float64)
        return cls(cv[:, 0:3], cv[:, 3:6], cv[:, 6:9], cv[:, 9:12], int(height), int(width), yaw)

    def subset(self, idx: Int[np.ndarray, " n"] | Sequence[int] | int) -> ConeBeamViews:
        idx = np.atleast_1d(np.asarray(idx))
        return ConeBeamViews(
            self.src[idx], self.det[idx], self.u[idx], self.v[idx], self.height, self.width, self.yaw_deg[idx]
        )

    def __len__(self) -> int:
        return self.src.shape[0]

    # ---- exported forms -----------------------------------------------------------------------------------
    @property
    def cone_vecs(self) -> Float64[np.ndarray, "V 12"]:
        """(V, 12) ASTRA ``cone_vec`` rows."""
        return np.concatenate([self.src, self.det, self.u, self.v], axis=1)

    def pixel_centres(self, view: int) -> Float64[np.ndarray, "H W 3"]:
        """(H, W, 3) world positions of the pixel centres of one view; [r, c] is row r, column c."""
        r = np.arange(self.height, dtype=np.float64) - (self.height - 1) / 2.0
        c = np.arange(self.width, dtype=np.float64) - (self.width - 1) / 2.0
        return self.det[view] + r[:, None, None] * self.v[view] + c[None, :, None] * self.u[view]

    def camera(self, view: int) -> tuple[Float64[np.ndarray, "4 4"], Float64[np.ndarray, "3 3"]]:
        """(world_from_camera 4x4, intrinsics 3x3) of one view, OpenCV pinhole convention.

        Camera at the source; +x along u, +y along v, +z the detector normal towards the detector.
        A world point X projects to pixel (col, row) = (K @ Xc)[:2] / Xc[2] with Xc = inv(T) @ X.
        """
        s, d, u, v = self.src[view], self.det[view], self.u[view], self.v[view]
        du, dv = np.linalg.norm(u), np.linalg.norm(v)
        ex, ey = u / du, v / dv
        ez = np.cross(ex, ey)
        ez /= np.linalg.norm(ez)
        T = np.eye(4)
        T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = ex, ey, ez, s
        f = float((d - s) @ ez)
        K = np.array(
            [
                [f / du, 0.0, (self.width - 1) / 2.0 - float((d - s) @ ex) / du],
                [0.0, f / dv, (self.height - 1) / 2.0 - float((d - s) @ ey) / dv],
                [0.0, 0.0, 1.0],
            ]
        )
        return T, K

    def view_meta(self) -> ViewMeta:
        """The views' action metadata as stored beside their pixels (index, yaw, cone_vec, camera, intrinsics)."""
        V = len(self)
        T = np.empty((V, 4, 4))
        K = np.empty((V, 3, 3))
        for k in range(V):
            T[k], K[k] = self.camera(k)
        return ViewMeta(
            index=np.arange(V, dtype=np.int32),
            yaw_deg=np.asarray(self.yaw_deg, dtype=np.float64),
            cone_vec=np.ascontiguousarray(self.cone_vecs, dtype=np.float64),
            world_from_camera=T,
            intrinsics=K,
            height=self.height,
            width=self.width,
        )

    @classmethod
    def from_view_meta(cls, meta: ViewMeta) -> ConeBeamViews:
        """The rays of stored views, rebuilt only from their ``cone_vec`` rows (and yaws, for the record)."""
        return cls.from_cone_vecs(meta.cone_vec, meta.height, meta.width, meta.yaw_deg)


def project_points(views: ConeBeamViews, view: int, points: Float[np.ndarray, "N 3"]) -> Float64[np.ndarray, "N 2"]:
    """Project world points (N, 3) into view ``view``; returns (N, 2) continuous (row, col) pixel coordinates."""
    T, K = views.camera(view)
    Xc = (np.linalg.inv(T) @ np.c_[points, np.ones(len(points))].T)[:3]
    p = K @ Xc
    col, row = p[0] / p[2], p[1] / p[2]
    return np.stack([row, col], axis=1)


def ring_for_volume(spec: RenderSpec, affine: AffineLike, shape: tuple[int, int, int]) -> ConeBeamViews:
    """The spec's ring around the centre of a canonical volume."""
    return ConeBeamViews.ring(spec, volume_center(affine, shape))
