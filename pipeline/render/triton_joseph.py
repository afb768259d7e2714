"""Fused Triton Joseph projector: one kernel launch renders a batch of views (a whole ring) from a volume resident
in device memory.

The sampling is exactly that of ``joseph.py`` (the numba reference): for each ray source -> pixel centre in voxel
index space, the ray parameter is clipped to the voxel box [-1/2, N-1/2]^3 (slab method), the ray steps through
the voxel-centre planes n0..n1 of its dominant index axis a, interpolates bilinearly in the two other axes (clamped
to the edge value over the outer half voxel) and the sum is weighted by the world length per plane (mm). Ray
set-up (pixel position, box clip, first plane, world length) runs in float64 like the numba kernel; the loop over
planes runs in float32 with float32 accumulation, so the values agree with ``joseph`` to ~1e-6 relative.

One program renders a tile of ``TILE_R`` detector rows x ``BLOCK // TILE_R`` columns of one view; the launch grid is
(tiles per view x views), so one launch covers every view it is given. Within a tile the rows run fastest: on a
ring the detector rows follow the contiguous voxel axis z, so neighbouring lanes read neighbouring voxels.

Volume storage: ``volume_dtype`` "float32" (default), "float16" or "bfloat16" (half the memory and bandwidth; the
kernel converts every sample to float32; the error this costs is measured in tests/test_render_triton.py and
docs/benchmarks.md).

Where it runs: on CUDA (Triton compiles the kernel), or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``
in the environment: the kernel then runs on torch CPU tensors, slowly; used to test it without a GPU). The kernel is
built on first use for the mode in force at that moment (``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a
function), so setting the variable after import works too. ``device="cpu"`` without the interpreter renders with
``joseph`` (the same model and values), which is also where ``render_views`` sends a view set that ran out of CUDA
memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Float32

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.render._rays import index_space

VOLUME_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TILE_R = 32  # detector rows per tile (the fastest-varying lane index)
BLOCK_CUDA = 128  # rays per program on a GPU (4 rows of 32 lanes; 4 warps)
BLOCK_INTERPRET = 4096  # rays per program in the interpreter (its cost is per step: fewer, larger steps)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - a broken triton install means no triton backend  # pragma: no cover
        return False


def available() -> bool:
    """The backend runs here: triton imports, and CUDA exists or the interpreter is on."""
    if not triton_importable():
        return False
    return bool(torch.cuda.is_available()) or interpreting()


_KERNELS: dict[bool, Any] = {}


def _kernel() -> Any:
    """The jitted kernel for the current mode (compiled for CUDA, or wrapped by the interpreter)."""
    mode = interpreting()
    if mode not in _KERNELS:
        import triton

        from xwin.pipeline.render._triton_kernel import joseph_kernel

        # no specialisation on integer values (a 1-row detector must not turn H into a constant)
        ints = ["H", "W", "nx", "ny", "nz", "n_tiles_c", "tiles_per_view"]
        _KERNELS[mode] = triton.jit(joseph_kernel, do_not_specialize=ints)
    return _KERNELS[mode]


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def upload_volume(
    mu: Float[np.ndarray, "X Y Z"] | torch.Tensor,
    device: str | torch.device | None = None,
    volume_dtype: str = "float32",
) -> torch.Tensor:
    """(X, Y, Z) mu -> a C-contiguous tensor on ``device`` in ``volume_dtype`` (the volume the kernel samples;
    keep it to render several view sets without copying the volume again)."""
    if volume_dtype not in VOLUME_DTYPES:
        raise ValueError(f"volume_dtype must be one of {sorted(VOLUME_DTYPES)}, got {volume_dtype!r}")
    t = torch.as_tensor(mu)
    if t.ndim != 3 or min(t.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 voxels per axis, got shape {tuple(t.shape)}")
    if t.numel() >= 2**31:
        raise ValueError(f"volume has {t.numel()} voxels; the kernel indexes with int32 (< 2**31)")
    return t.to(device=_device(device), dtype=VOLUME_DTYPES[volume_dtype]).contiguous()


def ray_table(views: ConeBeamViews, affine: Float[np.ndarray, "4 4"], device: str | torch.device | None = None):
    """(V, 24) float64 per-view ray parameters (``_rays.index_space``) on ``device``."""
    return torch.as_tensor(index_space(views, affine), dtype=torch.float64, device=_device(device)).contiguous()


def project_device(
    vol: torch.Tensor, P: torch.Tensor, height: int, width: int, out: torch.Tensor | None = None, block: int = 0
) -> torch.Tensor:
    """One launch: (V, H, W) float32 line integrals on the volume's device, from a volume made by
    :func:`upload_volume` and a ray table made by :func:`ray_table` (no host transfer; the caller synchronises)."""
    if vol.ndim != 3 or vol.dtype not in VOLUME_DTYPES.values():
        raise ValueError("vol must be a 3-D float32/float16/bfloat16 tensor (see upload_volume)")
    if P.ndim != 2 or P.shape[1] != 24 or P.dtype != torch.float64:
        raise ValueError("P must be a (V, 24) float64 ray table (see ray_table)")
    if height < 1 or width < 1:
        raise ValueError(f"detector must be at least 1x1, got {height}x{width}")
    V = int(P.shape[0])
    if out is None:
        out = torch.empty((V, height, width), device=vol.device, dtype=torch.float32)
    if V == 0:
        return out
    block = int(block) or (BLOCK_INTERPRET if interpreting() else BLOCK_CUDA)
    if block % TILE_R or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of {TILE_R}, got {block}")
    tiles_r = -(-height // TILE_R)
    tiles_c = -(-width // (block // TILE_R))
    tiles = tiles_r * tiles_c
    nx, ny, nz = (int(s) for s in vol.shape)
    # FMA contraction on (the default; set explicitly so Triton 3.9 does not warn that its default will change)
    _kernel()[(V * tiles,)](
        vol,
        P,
        out,
        height,
        width,
        nx,
        ny,
        nz,
        tiles_c,
        tiles,
        BLOCK=block,
        TILE_R=TILE_R,
        num_warps=4,
        enable_fp_fusion=True,
    )
    return out


@torch.no_grad()
def project(
    mu: Float[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    *,
    device: str | None = None,
    volume_dtype: str = "float32",
    max_views: int | None = None,
    block: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Float32[np.ndarray, "V H W"]:
    """(X,Y,Z) float32 mu [1/mm] -> (V,H,W) float32 line integrals [mu*mm], one kernel launch per ``max_views``
    views (default: all views in one launch); ``on_progress(done, V)`` after each launch.

    ``device``: "cuda" (default where CUDA exists) or "cpu" (the interpreter when ``TRITON_INTERPRET=1``, else the
    numba ``joseph`` projector: same model and values). ``volume_dtype``: storage of the volume on the device.
    ``block``: rays per program (a power of two, multiple of 32; default 128 on CUDA, 4096 in the interpreter).
    """
    dev = _device(device)
    if dev.type == "cpu" and not interpreting():
        if volume_dtype != "float32":
            raise ValueError("volume_dtype other than float32 needs CUDA or TRITON_INTERPRET=1")
        from xwin.pipeline.render import joseph

        return joseph.project(mu, affine, views, on_progress=on_progress)
    if not triton_importable():
        raise RuntimeError("the triton backend needs the 'triton' package (pip install 'xwin[gpu]')")
    if max_views is not None and max_views < 1:
        raise ValueError(f"max_views must be >= 1, got {max_views}")
    vol = upload_volume(np.ascontiguousarray(mu, dtype=np.float32), dev, volume_dtype)
    P = ray_table(views, affine, dev)
    V, H, W = len(views), views.height, views.width
    step = max_views or max(V, 1)
    out = np.empty((V, H, W), dtype=np.float32)
    for v0 in range(0, V, step):
        out[v0 : v0 + step] = project_device(vol, P[v0 : v0 + step], H, W, block=block).cpu().numpy()
        if on_progress is not None:
            on_progress(min(V, v0 + step), V)
    return out
