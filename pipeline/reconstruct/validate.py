"""``validate_volume``: reconstruct a ring and score it (PSNR/SSIM) against the volume it was rendered from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Bool, Float, Float32, Real

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct.fdk import reconstruct
from xwin.pipeline.reconstruct.grid import ReconGrid, default_grid
from xwin.pipeline.reconstruct.orbit import GeometryError


@dataclass
class ValidationResult:
    """metrics: {"psnr_db", "ssim", "ssim_in_mask", "ssim_in_body", "backend", "seconds", ...}; arrays on ``grid``.

    ``ssim_in_body``: the SSIM map over the mask voxels inside the patient's body (the anatomy only; the headline),
    beside ``ssim`` (whole volume, the protocol's) and ``ssim_in_mask`` (the field of view, air included): the
    metrics module docstring. Absent when the body does not reach into the field of view."""

    metrics: dict[str, Any]
    reference: Float32[np.ndarray, "nx ny nz"]
    reconstruction: Float32[np.ndarray, "nx ny nz"]
    mask: Bool[np.ndarray, "nx ny nz"]
    grid: ReconGrid


def validate_volume(
    projections: Float[np.ndarray, "V H W"],
    views: ConeBeamViews,
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    mu_water: float,
    grid: ReconGrid | None = None,
    backend: str = "auto",
    **options: Any,
) -> ValidationResult:
    """Reconstruct and score against the projected volume (HU (X,Y,Z) + affine) on ``grid`` (default: the
    CT's box at ~1.4 mm in-plane, native axial spacing). ``options`` go to :func:`reconstruct`."""
    from xwin.pipeline.reconstruct.metrics import body_on_grid, reference_mu, score, validation_mask

    grid = default_grid(affine, np.shape(hu)) if grid is None else grid
    rec = reconstruct(projections, views, grid, backend, **options)
    ref = reference_mu(hu, affine, grid, mu_water)
    mask = validation_mask(grid, rec.orbit)
    if not mask.any():
        raise GeometryError("the validation mask is empty: the grid does not overlap the field of view")
    body = body_on_grid(hu, affine, grid)
    m = score(ref, rec.mu, mask, body if (body & mask).any() else None)  # no body in view: no in-body figures
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
