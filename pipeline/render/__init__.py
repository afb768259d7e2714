"""Cone-beam DRR rendering: physical line integrals of mu through a canonical CT, along rays of ConeBeamViews.

Values: each pixel is sum(mu * mm) along the segment source -> pixel centre, with
``mu = mu_water * max(0, 1 + HU/1000)`` [1/mm]. No per-image normalisation (see ``appearance`` for read-time looks).

Volume model shared by every backend: the volume occupies its voxel box [-1/2, N-1/2] along each index axis;
inside, mu is the trilinear interpolant of the voxel values (clamped to the edge value in the outer half voxel);
outside the box mu is 0. Voxel (i, j, k) sits at ``affine @ (i, j, k, 1)`` (any affine: oblique, flipped,
anisotropic). Rays come only from :class:`xwin.pipeline.geometry.ConeBeamViews`.

Backends (``backend=``; the registry is :mod:`.backends`, the entry points :mod:`.project`):
    "joseph"  fast CPU Joseph projector (numba)                          -- render/joseph.py
    "triton"  the same sampling as one fused Triton kernel per view set (CUDA; the CPU only under
              TRITON_INTERPRET=1)                                           -- render/triton_joseph.py
    "torch"   the same sampling in torch, batched over views (CPU or CUDA; ``device=``) -- render/gpu.py
    "gpu"     "torch" on CUDA; registered only where CUDA exists
    "nanodrr" nanodrr (PyPI) on our rays, its pinhole camera mapped from ConeBeamViews -- render/nanodrr_backend.py
    "diffdrr" DiffDRR 0.6.1 Siddon on our rays, the reference (slow)      -- render/diffdrr_backend.py
    "rtk"     RTK's JosephForwardProjectionImageFilter (benchmark baseline, independent check)
    "auto"    "triton" where CUDA exists (and triton imports; else "gpu"), else "joseph"
"""

from xwin.pipeline.render.backends import BACKENDS, available_backends, backend_versions, resolve_backend
from xwin.pipeline.render.project import hu_to_mu, render_ring, render_views

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_versions",
    "hu_to_mu",
    "render_ring",
    "render_views",
    "resolve_backend",
]
