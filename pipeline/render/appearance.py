"""Read-time appearance transforms of stored line integrals p = sum(mu*mm) (numpy arrays or torch tensors).

Stored views are physical and never normalised; the trainer picks a look when it reads them:

    minmax(p)         X-WIN's released pipeline: per-image min-max to [0, 1] of the raw line integral
    beer_lambert(p)   transmitted intensity I = i0 * exp(-p) (what a detector measures: dark bone, bright air)
    neglog_window(p)  radiograph display: -log(I/i0) = p windowed to [0, 1] between two per-image percentiles
                      (or fixed bounds) with an optional gamma: bright bone, dark lungs, black air

All functions act on the last two axes (H, W) and broadcast over leading axes; dtype float32 in, float32 out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float

Array = Any  # np.ndarray or torch.Tensor: numpy in, numpy out; torch in, torch out


def _is_torch(x: Array) -> bool:
    return hasattr(x, "detach") and hasattr(x, "device")


def _amin_amax(x: Array):
    if _is_torch(x):
        return x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    return x.min(axis=(-2, -1), keepdims=True), x.max(axis=(-2, -1), keepdims=True)


def minmax(img: Float[Array, "*batch H W"], eps: float = 1e-8) -> Float[Array, "*batch H W"]:
    """(..., H, W) -> (..., H, W) in [0, 1]: (img - min) / ((max - min) + eps) per image (constant images -> 0).
    The numpy path is :func:`minmax_into` per image (the same float32 operations, so the values are identical)."""
    if _is_torch(img):
        lo, hi = _amin_amax(img)
        return (img - lo) / ((hi - lo) + eps)
    a = np.asarray(img, dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    flat_in, flat_out = a.reshape(-1, *a.shape[-2:]), out.reshape(-1, *a.shape[-2:])
    for k in range(flat_in.shape[0]):
        minmax_into(flat_in[k], flat_out[k], eps)
    return out


def minmax_into(view: Float[np.ndarray, "H W"], out: Float[np.ndarray, "H W"], eps: float = 1e-8) -> None:
    """:func:`minmax` of one (H, W) float32/float16 view written into ``out`` (H, W) float32 without temporaries:
    one pass each for min, max, subtract, divide (the training loader's hot path)."""
    if view.dtype != np.float32:  # float16 rings: widen once into the output (exact), then work in place
        import torch  # its SIMD cast is far faster than numpy's float16 -> float32

        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(view)))
        view = out
    lo, hi = np.float32(view.min()), np.float32(view.max())
    np.subtract(view, lo, out=out)
    np.divide(out, np.float32(hi - lo) + np.float32(eps), out=out)


def beer_lambert(p: Float[Array, "*batch H W"], i0: float = 1.0) -> Float[Array, "*batch H W"]:
    """(..., H, W) line integrals -> transmitted intensity ``i0 * exp(-p)``."""
    if _is_torch(p):
        import torch

        return i0 * torch.exp(-p)
    return (i0 * np.exp(-np.asarray(p, dtype=np.float32))).astype(np.float32)


def _percentiles(x: Array, q_lo: float, q_hi: float):
    if _is_torch(x):
        import torch

        flat = x.reshape(*x.shape[:-2], -1).float()
        q = torch.tensor([q_lo / 100.0, q_hi / 100.0], dtype=flat.dtype, device=flat.device)
        qs = torch.quantile(flat, q, dim=-1)  # (2, ...)
        return qs[0][..., None, None].to(x.dtype), qs[1][..., None, None].to(x.dtype)
    lo = np.percentile(x, q_lo, axis=(-2, -1), keepdims=True).astype(np.float32)
    hi = np.percentile(x, q_hi, axis=(-2, -1), keepdims=True).astype(np.float32)
    return lo, hi


def neglog_window(
    p: Float[Array, "*batch H W"],
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    gamma: float = 1.0,
    i0: float = 1.0,
) -> Float[Array, "*batch H W"]:
    """(..., H, W) line integrals -> radiograph display in [0, 1] (bright bone, dark lungs).

    Simulates the detector (I = i0*exp(-p)), takes -log(I/i0) and windows it: between fixed bounds ``window``
    (in units of p) or, by default, between the per-image ``percentiles``; then ``** gamma``.
    """
    torch_in = _is_torch(p)
    if not torch_in:
        p = np.asarray(p, dtype=np.float32)
    intensity = beer_lambert(p, i0)
    if torch_in:
        import torch

        q = -torch.log(torch.clamp(intensity / i0, min=1e-30))
    else:
        q = -np.log(np.maximum(intensity / np.float32(i0), np.float32(1e-30)))
    if window is None:
        lo, hi = _percentiles(q, *percentiles)
    else:
        lo, hi = window
        if not hi > lo:
            raise ValueError(f"window must be (lo, hi) with hi > lo, got {window}")
    span = hi - lo
    if torch_in:
        out = torch.clamp((q - lo) / torch.clamp(torch.as_tensor(span, dtype=q.dtype), min=1e-8), 0.0, 1.0)
        return out**gamma if gamma != 1.0 else out
    out = np.clip((q - lo) / np.maximum(span, np.float32(1e-8)), 0.0, 1.0).astype(np.float32)
    return out**gamma if gamma != 1.0 else out


LOOKS = {"raw": None, "minmax": minmax, "neglog": neglog_window, "beer_lambert": beer_lambert}


def apply(look: str, img: Float[Array, "*batch H W"]) -> Float[Array, "*batch H W"]:
    """Apply a named look ("raw", "minmax", "neglog", "beer_lambert")."""
    if look not in LOOKS:
        raise ValueError(f"unknown appearance {look!r}; known: {sorted(LOOKS)}")
    f = LOOKS[look]
    return img if f is None else f(img)
