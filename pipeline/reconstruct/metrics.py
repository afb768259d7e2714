"""Reference volume, validation mask, PSNR and SSIM (protocol: docs/reconstruction.md, REFERENCE section 7).

Reference: the volume that was projected, converted with the renderer's own mu = mu_water * max(0, 1 + HU/1000)
(:func:`xwin.pipeline.render.hu_to_mu`) and trilinearly resampled onto the reconstruction grid (at the default grid's
2x in-plane factor this is exactly a 2x2 in-plane block average).
Mask: the central 60% of the grid's axial slices (k index) and voxels within 95% of the field-of-view radius of
the rotation axis. PSNR uses the reference's range inside the mask; SSIM (scikit-image, 7^3 window, data range =
the same reference range) runs on both volumes multiplied by the mask.
Body: the patient's body (:func:`xwin.pipeline.body.body_mask`: no table, no air around the patient) on the grid.
Three SSIM figures come from one SSIM map: ``ssim`` (the protocol's, over the whole grid: every voxel outside the mask
is 0 in both volumes and counts as perfect), ``ssim_in_mask`` (the map's mean over the mask voxels, which include the
air around the patient inside the field of view, where the reference is flat and faint FDK streaks weigh heavily in
SSIM) and ``ssim_in_body`` (the mean over the mask voxels inside the body: the anatomy only, the headline figure).
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


def body_on_grid(
    hu: Real[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], grid: ReconGrid
) -> Bool[np.ndarray, "nx ny nz"]:
    """The body of the CT (``xwin.pipeline.body.body_mask``: True inside the patient, not the table) on ``grid``."""
    from xwin.pipeline.body import body_mask

    a = np.asarray(affine, dtype=np.float64)
    spacing = tuple(float(x) for x in np.linalg.norm(a[:3, :3], axis=0))
    body = body_mask(hu, (spacing[0], spacing[1], spacing[2]))
    return resample_to_grid(body.astype(np.float32), a, grid) >= 0.5


def psnr(ref: Float[np.ndarray, "*s"], rec: Float[np.ndarray, "*s"], mask: Bool[np.ndarray, "*s"]) -> float:
    """PSNR in dB with the reference's range inside ``mask`` as the peak."""
    r, x = ref[mask].astype(np.float64), rec[mask].astype(np.float64)
    rng = float(r.max() - r.min())
    mse = float(np.mean((r - x) ** 2))
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(rng**2 / mse))


def ssim_map(
    ref: Float[np.ndarray, "*s"], rec: Float[np.ndarray, "*s"], mask: Bool[np.ndarray, "*s"]
) -> tuple[float, Float32[np.ndarray, "*s"]]:
    """(protocol SSIM, the SSIM map): scikit-image SSIM (7^3 window) of ref * mask vs rec * mask over the whole
    grid, data range = the reference's range inside the mask."""
    from skimage.metrics import structural_similarity

    r = np.where(mask, ref, 0).astype(np.float32)
    x = np.where(mask, rec, 0).astype(np.float32)
    rng = float(ref[mask].max() - ref[mask].min())
    mean, smap = structural_similarity(r, x, data_range=rng, full=True)
    return float(mean), np.asarray(smap, dtype=np.float32)


def ssim(
    ref: Float[np.ndarray, "*s"], rec: Float[np.ndarray, "*s"], mask: Bool[np.ndarray, "*s"]
) -> tuple[float, float]:
    """(protocol SSIM, SSIM inside the mask).

    Protocol (REFERENCE section 7, the acceptance figures): scikit-image SSIM (7^3 window) of ref * mask vs
    rec * mask over the whole grid, data range = the reference's range inside the mask. Voxels outside the mask are
    0 in both and count as perfect, so the second number, the mean of the same SSIM map over the mask voxels only,
    is the stricter one (reported beside it).
    """
    mean, smap = ssim_map(ref, rec, mask)
    return mean, float(smap[mask].mean())


def score(
    ref: Float[np.ndarray, "*s"],
    rec: Float[np.ndarray, "*s"],
    mask: Bool[np.ndarray, "*s"],
    body: Bool[np.ndarray, "*s"] | None = None,
) -> dict[str, Any]:
    """{"psnr_db", "ssim", "ssim_in_mask", "rmse_per_mm", "ref_range_per_mm", "mask_voxels"} inside ``mask``;
    with ``body`` (:func:`body_on_grid`) also "ssim_in_body" and "psnr_in_body_db" over the mask voxels inside the
    body, and "body_voxels"."""
    r = ref[mask].astype(np.float64)
    s_protocol, smap = ssim_map(ref, rec, mask)
    out: dict[str, Any] = {
        "psnr_db": psnr(ref, rec, mask),
        "ssim": s_protocol,
        "ssim_in_mask": float(smap[mask].mean()),
        "rmse_per_mm": float(np.sqrt(np.mean((r - rec[mask]) ** 2))),
        "ref_range_per_mm": float(r.max() - r.min()),
        "mask_voxels": int(mask.sum()),
    }
    if body is not None:
        inside = mask & body
        if not inside.any():
            raise ValueError("score: the body mask does not overlap the validation mask")
        # same peak as psnr_db (the reference's range inside the mask), error over the body voxels only
        mse = float(np.mean((ref[inside].astype(np.float64) - rec[inside]) ** 2))
        out["ssim_in_body"] = float(smap[inside].mean())
        out["psnr_in_body_db"] = float(10 * np.log10(out["ref_range_per_mm"] ** 2 / mse)) if mse > 0 else float("inf")
        out["body_voxels"] = int(inside.sum())
    return out
