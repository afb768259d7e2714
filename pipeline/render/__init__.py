"""Cone-beam DRR rendering: physical line integrals of mu through a canonical CT, along rays of ConeBeamViews.

Values: each pixel is sum(mu * mm) along the segment source -> pixel centre, with
``mu = mu_water * max(0, 1 + HU/1000)`` [1/mm]. No per-image normalisation (see ``appearance`` for read-time looks).

Volume model shared by every backend: the volume occupies its voxel box [-1/2, N-1/2] along each index axis;
inside, mu is the trilinear interpolant of the voxel values (clamped to the edge value in the outer half voxel);
outside the box mu is 0. Voxel (i, j, k) sits at ``affine @ (i, j, k, 1)`` (any affine: oblique, flipped,
anisotropic). Rays come only from :class:`pipeline.geometry.ConeBeamViews`.

Backends (``backend=``):
    "joseph"  fast CPU Joseph projector (numba)                          -- pipeline.render.joseph
    "torch"   the same sampling in torch (CPU or CUDA; ``device=``)        -- pipeline.render.gpu
    "gpu"     "torch" on CUDA; registered only where CUDA exists ("nanodrr" is an alias)
    "diffdrr" DiffDRR 0.6.1 Siddon on our rays, the reference (slow)      -- pipeline.render.diffdrr_backend
    "rtk"     RTK's JosephForwardProjectionImageFilter (benchmark baseline, independent check)
    "auto"    "gpu" if CUDA is available else "joseph"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.schemas.render import RenderSpec

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_versions",
    "hu_to_mu",
    "render_ring",
    "render_views",
    "resolve_backend",
]


def hu_to_mu(hu: np.ndarray, mu_water: float = 0.02) -> np.ndarray:
    """(X,Y,Z) HU -> (X,Y,Z) float32 linear attenuation [1/mm]: ``mu_water * max(0, 1 + HU/1000)``."""
    if not np.isfinite(mu_water) or mu_water <= 0:
        raise ValueError(f"mu_water must be a positive finite number, got {mu_water}")
    h = np.asarray(hu, dtype=np.float32)
    mu = np.maximum(h * np.float32(1e-3) + np.float32(1.0), np.float32(0.0))
    mu *= np.float32(mu_water)
    return mu


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    function: str
    available: Callable[[], bool]
    description: str
    options: tuple[tuple[str, object], ...] = ()

    def load(self) -> Callable[..., np.ndarray]:
        return getattr(importlib.import_module(self.module), self.function)


def _always() -> bool:
    return True


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - whatever fails in the CUDA probe means no GPU  # pragma: no cover
        return False


def _rtk() -> bool:
    try:
        import itk  # noqa: F401
        from itk import RTK  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - itk's lazy loader raises several types when RTK is missing  # pragma: no cover
        return False


BACKENDS: dict[str, Backend] = {
    "joseph": Backend("joseph", "xwin.pipeline.render.joseph", "project", _always, "numba Joseph projector (CPU)"),
    "torch": Backend("torch", "xwin.pipeline.render.gpu", "project", _always, "torch Joseph projector (CPU/CUDA)"),
    "gpu": Backend(
        "gpu", "xwin.pipeline.render.gpu", "project", _cuda, "torch Joseph projector on CUDA", (("device", "cuda"),)
    ),
    "nanodrr": Backend(
        "nanodrr", "xwin.pipeline.render.gpu", "project", _cuda, "alias of 'gpu'", (("device", "cuda"),)
    ),
    "diffdrr": Backend(
        "diffdrr", "xwin.pipeline.render.diffdrr_backend", "project", _always, "DiffDRR 0.6.1 Siddon (reference)"
    ),
    "rtk": Backend("rtk", "xwin.pipeline.render.rtk_backend", "project", _rtk, "RTK JosephForwardProjection (CPU)"),
}


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    return [n for n, b in BACKENDS.items() if b.available()]


def resolve_backend(name: str = "auto") -> str:
    """'auto' -> 'gpu' where CUDA exists, else 'joseph'; other names are checked for availability."""
    if name == "auto":
        return "gpu" if _cuda() else "joseph"
    if name not in BACKENDS:
        raise ValueError(f"unknown render backend {name!r}; known: {sorted(BACKENDS)}")
    if not BACKENDS[name].available():
        raise RuntimeError(f"render backend {name!r} is not available here ({BACKENDS[name].description})")
    return name


def backend_versions(name: str) -> dict[str, str]:
    """Library versions that determine a backend's output (for provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    out = {"numpy": numpy.__version__, "backend": name}
    libs = {
        "joseph": ["numba"],
        "torch": ["torch"],
        "gpu": ["torch"],
        "nanodrr": ["torch"],
        "diffdrr": ["diffdrr", "torch"],
        "rtk": ["itk-rtk", "itk"],
    }.get(name, [])
    for lib in libs:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:  # pragma: no cover
            out[lib] = "unknown"
    return out


def _check_volume(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    hu: np.ndarray,
    affine: np.ndarray,
    views: ConeBeamViews,
    mu_water: float = 0.02,
    backend: str = "auto",
    *,
    is_mu: bool = False,
    **options,
) -> np.ndarray:
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
    hu: np.ndarray, affine: np.ndarray, spec: RenderSpec, backend: str = "auto", **options
) -> tuple[np.ndarray, ConeBeamViews]:
    """Render the yaw ring of ``spec`` around the volume centre. Returns ((V,H,W) float32, ConeBeamViews)."""
    vol, A = _check_volume(hu, affine)
    views = ring_for_volume(spec, A, vol.shape)
    return render_views(vol, A, views, spec.mu_water_per_mm, backend, **options), views
