"""Reference backend: DiffDRR 0.6.1's Siddon renderer, fed OUR rays.

We build a ``diffdrr.drr.DRR`` around a torchio Subject whose volume affine is exactly our voxel->world affine
(no ``read()``: it would re-centre the volume and rescale HU to its own density). ``DRR.render`` maps world
points to voxel space with that affine's inverse, so giving it world-frame source/target points from
:class:`ConeBeamViews` renders exactly our geometry. The density buffer is replaced by mu [1/mm]; DiffDRR
multiplies by the ray length in world units, so the result is sum(mu*mm).

Siddon's cost grows with rays x (X+Y+Z) intersections: one view at a time, ``chunk_rays`` rays per call, so the
peak memory is set by ``chunk_rays`` and the volume's size, not by the detector's.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Float32

from xwin.pipeline.geometry import ConeBeamViews


def _make_drr(mu: np.ndarray, affine: np.ndarray, views: ConeBeamViews, renderer: str):
    from diffdrr.drr import DRR
    from torchio import ScalarImage, Subject

    t = torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))[None]
    vol = ScalarImage(tensor=t, affine=np.asarray(affine, dtype=np.float64))
    subject = Subject(
        volume=vol,
        density=ScalarImage(tensor=t, affine=np.asarray(affine, dtype=np.float64)),
        mask=None,
        reorient=torch.eye(4),
        orientation=None,
        fiducials=None,
    )
    sdd = float(np.linalg.norm(views.det[0] - views.src[0]))
    delx = float(np.linalg.norm(views.u[0]))
    drr = DRR(subject, sdd=sdd, height=views.height, width=views.width, delx=delx, renderer=renderer)
    drr.density = t[0]  # keep the (X,Y,Z) shape even when an axis has length 1
    return drr


@torch.no_grad()
def project(
    mu: Float[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    *,
    chunk_rays: int = 8192,
    renderer: str = "siddon",
    device: str = "cpu",
) -> Float32[np.ndarray, "V H W"]:
    """(X,Y,Z) float32 mu -> (V,H,W) float32 line integrals via DiffDRR's renderer on our rays, on ``device``
    (the CPU by default; "cuda" for the GPU benchmark, bench/gpu_check.py)."""
    dev = torch.device(device)
    drr = _make_drr(mu, affine, views, renderer).to(dev)
    V, H, W = len(views), views.height, views.width
    out = np.empty((V, H, W), dtype=np.float32)
    for k in range(V):
        src = torch.as_tensor(views.src[k], dtype=torch.float32, device=dev).reshape(1, 1, 3)
        tgt = torch.as_tensor(views.pixel_centres(k).reshape(1, -1, 3), dtype=torch.float32, device=dev)
        parts = []
        for t in tgt.split(max(1, chunk_rays), dim=1):
            img = drr.render(drr.density, src, t)  # (1, 1, n)
            parts.append(img.reshape(-1))
        out[k] = torch.cat(parts).reshape(H, W).cpu().numpy()
    return out
