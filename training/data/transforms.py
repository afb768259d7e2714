"""Read-time transforms: appearance (stored line integrals -> image look) and resizing to the model resolution.

Appearances (``appearance=``):
    ``"minmax"``  X-WIN's look: per-image min-max of the line integral to [0, 1] (released code, REFERENCE §2).
    ``"neglog"``  radiograph look: the -log transmission (= the line integral) windowed to [0, 1], bright bone.
    ``"none"``    the stored values unchanged (physical line integrals, mu*mm).
The functions come from ``xwin.pipeline.render.appearance`` (their single definition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from xwin.pipeline.render import appearance

Appearance = Literal["minmax", "neglog", "none"]


def appearance_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """Name -> function (H,W) float32 -> (H,W) float32."""
    if name == "none":
        return lambda x: x
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "minmax": appearance.minmax,
        "neglog": appearance.neglog_window,
    }
    if name in fns:
        return fns[name]
    raise ValueError(f"unknown appearance {name!r}; choose minmax, neglog or none")


def apply_appearance(views: np.ndarray, name: str) -> np.ndarray:
    """(n,H,W) stored views -> (n,H,W) float32, each view transformed on its own."""
    if name == "none":
        return np.asarray(views, dtype=np.float32)
    fn = appearance_fn(name)
    return (
        np.stack([np.asarray(fn(v), dtype=np.float32) for v in views]) if len(views) else np.asarray(views, np.float32)
    )


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n,1,H,W) float -> (n,1,size,size): bilinear with antialias when shrinking; identity when already there."""
    if images.ndim != 4:
        raise ValueError(f"expected (n,1,H,W), got {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ------------------------------------------------------------------------------------------ into preallocated output
_OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def out_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``None``/"float32" -> torch.float32; "float16"/"bfloat16" (or the torch dtypes) for half-size output."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name in _OUT_DTYPES.values():
            return name
    elif name in _OUT_DTYPES:
        return _OUT_DTYPES[name]
    raise ValueError(f"output dtype {name!r} not supported; choose float32, float16 or bfloat16")


def appearance_into(views, name: str, out: torch.Tensor) -> None:
    """Appearance + resize of ``n`` stored views, written into ``out`` (n,1,S,S) float32/float16/bfloat16.

    ``views``: (n,H,W) float32/float16 array, or a sequence of (H,W) arrays. Same values as
    ``resize(torch.from_numpy(apply_appearance(views, name)).unsqueeze(1), S)`` cast to ``out.dtype``. The common
    case (min-max, H = W = S, float32 out) writes straight into ``out``: no per-view temporaries, no stack, no resize.
    """
    n, S = out.shape[0], out.shape[-1]
    if len(views) != n or out.ndim != 4 or out.shape[1] != 1:
        raise ValueError(f"appearance_into: {len(views)} views into output of shape {tuple(out.shape)}")
    H, W = np.shape(views[0])
    if name == "minmax" and (H, W) == (S, S):
        if out.dtype == torch.float32 and out.is_contiguous():
            o = out.numpy()
            for j in range(n):
                appearance.minmax_into(np.asarray(views[j]), o[j, 0])
            return
        tmp = np.empty((S, S), np.float32)
        for j in range(n):
            appearance.minmax_into(np.asarray(views[j]), tmp)
            out[j, 0].copy_(torch.from_numpy(tmp))
        return
    stacked = np.stack([np.asarray(v) for v in views]) if not isinstance(views, np.ndarray) else views
    out.copy_(resize(torch.from_numpy(apply_appearance(stacked, name)).unsqueeze(1), S))
