"""Reference volume, validation mask, PSNR and SSIM (protocol: docs/reconstruction.md, REFERENCE section 7).

Reference: the volume that was projected, converted with the renderer's own mu = mu_water * max(0, 1 + HU/1000)
(:func:`xwin.pipeline.render.hu_to_mu`) and trilinearly resampled onto the reconstruction grid (at the default grid's
2x in-plane factor this is exactly a 2x2 in-plane block average).
Mask: the central 60% of the grid's axial slices (k index) and voxels within 95% of the field-of-view radius of
the rotation axis. PSNR uses the reference's range inside the mask; SSIM (scikit-image, 7^3 window, data range =
the same reference range) runs on both volumes multiplied by the mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Bool, Float, Float32, Real
from scipy import ndimage

from xwin.pipeline.reconstruct.grid import ReconGrid
from xwin.pipeline.reconstruct.orbit import Orbit


def resample_to_grid(
    vol: Real[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], grid: ReconGrid, order: int = 1
) -> Float32[np.ndarray, "nx ny nz"]:
    """Sample ``vol`` (X, Y, Z) with voxel->world ``affine`` at the voxel centres of ``grid``: (nx, ny, nz) float32.

    Outside the source volume's voxel box the nearest edge value is used within half a voxel, 0 beyond.
    """
    A = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ grid.affine  # grid index -> source index
    v = np.asarray(vol, dtype=np.float32)
    out = ndimage.affine_transform(
        v, A[:3, :3], offset=A[:3, 3], output_shape=grid.shape, order=order, mode="nearest", prefilter=False
    )
    # zero beyond the source box [-1/2, N-1/2]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    src = idx @ A[:3, :3].T + A[:3, 3]
    inside = np.all((src >= -0.5 - 1e-6) & (src <= np.asarray(v.shape) - 0.5 + 1e-6), axis=1)
    out = out.reshape(-1)
    out[~inside] = 0.0
    return out.reshape(grid.shape).astype(np.float32)


def reference_mu(
    hu: Real[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], grid: ReconGrid, mu_water: float
) -> Float32[np.ndarray, "nx ny nz"]:
    """The projected volume as mu [1/mm] on ``grid``: (nx, ny, nz) float32."""
    from xwin.pipeline.render import hu_to_mu

    return resample_to_grid(hu_to_mu(hu, mu_water), affine, grid)


def validation_mask(
    grid: ReconGrid, orbit: Orbit, axial_fraction: float = 0.6, fov_fraction: float = 0.95
) -> Bool[np.ndarray, "nx ny nz"]:
    """(nx, ny, nz) bool: central ``axial_fraction`` of the k slices and within ``fov_fraction`` x FOV radius."""
    nx, ny, nz = grid.shape
    k0 = round(nz * (1 - axial_fraction) / 2)
    k1 = nz - k0
    # in-plane distance of voxel centres (at k = 0; the axis is parallel to k for ring grids) from the axis
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="ij")
    pts = np.stack([ii, jj, np.zeros_like(ii)], -1) @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    rel = pts - orbit.center
    rel_in = rel - (rel @ orbit.axis)[..., None] * orbit.axis
    disk = np.linalg.norm(rel_in, axis=-1) <= fov_fraction * orbit.fov_radius
    m = np.zeros(grid.shape, dtype=bool)
    m[:, :, k0:k1] = disk[:, :, None]
    return m


def psnr(ref: Float[np.ndarray, "*s"], rec: Float[np.ndarray, "*s"], mask: Bool[np.ndarray, "*s"]) -> float:
    """PSNR in dB with the reference's range inside ``mask`` as the peak."""
    r, x = ref[mask].astype(np.float64), rec[mask].astype(np.float64)
    rng = float(r.max() - r.min())
    mse = float(np.mean((r - x) ** 2))
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(rng**2 / mse))


def ssim(
    ref: Float[np.ndarray, "*s"], rec: Float[np.ndarray, "*s"], mask: Bool[np.ndarray, "*s"]
) -> tuple[float, float]:
    """(protocol SSIM, SSIM inside the mask).

    Protocol (REFERENCE section 7, the acceptance figures): scikit-image SSIM (7^3 window) of ref * mask vs
    rec * mask over the whole grid, data range = the reference's range inside the mask. Voxels outside the mask are
    0 in both and count as perfect, so the second number, the mean of the same SSIM map over the mask voxels only,
    is the stricter one (reported beside it).
    """
    from skimage.metrics import structural_similarity

    r = np.where(mask, ref, 0).astype(np.float32)
    x = np.where(mask, rec, 0).astype(np.float32)
    rng = float(ref[mask].max() - ref[mask].min())
    mean, smap = structural_similarity(r, x, data_range=rng, full=True)
    return float(mean), float(smap[mask].mean())


def score(ref: Float[np.ndarray, "*s"], rec: Float[np.ndarray, "*s"], mask: Bool[np.ndarray, "*s"]) -> dict[str, Any]:
    """{"psnr_db", "ssim", "ssim_in_mask", "rmse_per_mm", "ref_range_per_mm", "mask_voxels"} inside ``mask``."""
    r = ref[mask].astype(np.float64)
    s_protocol, s_mask = ssim(ref, rec, mask)
    return {
        "psnr_db": psnr(ref, rec, mask),
        "ssim": s_protocol,
        "ssim_in_mask": s_mask,
        "rmse_per_mm": float(np.sqrt(np.mean((r - rec[mask]) ** 2))),
        "ref_range_per_mm": float(r.max() - r.min()),
        "mask_voxels": int(mask.sum()),
    }
