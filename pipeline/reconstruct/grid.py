"""Reconstruction grids: where the reconstructed voxels sit in the canonical world frame (RAS mm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float, Float64


@dataclass(frozen=True)
class ReconGrid:
    """A voxel grid in the world frame. Arrays on it are indexed (i, j, k) = ``shape`` order.

    Attributes:
        shape: (nx, ny, nz) voxel counts
        affine: (4, 4) voxel index (i, j, k, 1) -> world mm (same convention as a canonical volume's affine)
    """

    shape: tuple[int, int, int]
    affine: Float64[np.ndarray, "4 4"]

    def __post_init__(self) -> None:
        A = np.asarray(self.affine, dtype=np.float64)
        if A.shape != (4, 4) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-12:
            raise ValueError("ReconGrid.affine must be a finite, invertible 4x4 voxel->world matrix")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"ReconGrid.shape must be 3 positive ints, got {self.shape}")
        object.__setattr__(self, "affine", A)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def spacing(self) -> Float64[np.ndarray, "3"]:
        """(3,) voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def center(self) -> Float64[np.ndarray, "3"]:
        """(3,) world position of the centre of the voxel grid."""
        idx = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return (self.affine @ np.append(idx, 1.0))[:3]

    def corners(self) -> Float64[np.ndarray, "8 3"]:
        """(8, 3) world corners of the voxel box (outer faces, half a voxel beyond the extreme centres)."""
        lo = -0.5 * np.ones(3)
        hi = np.asarray(self.shape, dtype=np.float64) - 0.5
        c = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        return c @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "affine": self.affine.tolist(), "spacing_mm": self.spacing.tolist()}


def default_grid(affine: Float[np.ndarray, "4 4"], shape: tuple[int, int, int], inplane_mm: float = 1.4) -> ReconGrid:
    """The CT's own voxel box at ~``inplane_mm`` in-plane and the native axial (k) spacing.

    The in-plane voxel size is the CT's multiplied by the integer factor closest to ``inplane_mm`` / spacing
    (0.703 mm -> 2x -> 1.406 mm, 512 -> 256 voxels), so the grid tiles the CT's box exactly and its voxel centres
    sit midway between CT voxel centres. Axes (and any obliquity or flip) follow the CT's affine.
    """
    A = np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(A[:3, :3], axis=0)
    f = np.ones(3)
    for ax in (0, 1):
        f[ax] = max(1.0, round(inplane_mm / sp[ax]))
    n = np.maximum(1, np.round(np.asarray(shape, dtype=np.float64) / f)).astype(int)
    # exact tiling of the original box [-1/2, N-1/2]: new voxel size = N * sp / n
    scale = np.asarray(shape, dtype=np.float64) / n
    out = np.eye(4)
    out[:3, :3] = A[:3, :3] @ np.diag(scale)
    # first new voxel centre: original box start + half a new voxel
    first_idx = -0.5 + scale / 2.0
    out[:3, 3] = A[:3, :3] @ first_idx + A[:3, 3]
    return ReconGrid((int(n[0]), int(n[1]), int(n[2])), out)
