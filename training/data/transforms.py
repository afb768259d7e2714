"""Read-time transforms: appearance (stored line integrals -> image look) and resizing to the model resolution.

Appearances (``appearance=``):
    ``"minmax"``  X-WIN's look: per-image min-max of the line integral to [0, 1] (released code, REFERENCE §2).
    ``"neglog"``  radiograph look: the -log transmission (= the line integral) windowed to [0, 1], bright bone.
    ``"none"``    the stored values unchanged (physical line integrals, mu*mm).
The functions come from ``pipeline.render.appearance`` (the render helper's single definition).
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

Appearance = Literal["minmax", "neglog", "none"]


def appearance_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """Name -> function (H,W) float32 -> (H,W) float32."""
    if name == "none":
        return lambda x: x
    try:
        from pipeline.render import appearance as app

        fns = {"minmax": app.minmax, "neglog": app.neglog_window}
    except ImportError:  # render helper's module not installed in this checkout: same definitions, local
        fns = {"minmax": _minmax, "neglog": _neglog_window}
    if name in fns:
        return fns[name]
    raise ValueError(f"unknown appearance {name!r}; choose minmax, neglog or none")


def _minmax(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _neglog_window(img: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [lo_pct, hi_pct])
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32) if hi > lo else np.zeros_like(img)


def apply_appearance(views: np.ndarray, name: str) -> np.ndarray:
    """(n,H,W) stored views -> (n,H,W) float32, each view transformed on its own."""
    if name == "none":
        return np.asarray(views, dtype=np.float32)
    fn = appearance_fn(name)
    return np.stack([np.asarray(fn(v), dtype=np.float32) for v in views]) if len(views) else np.asarray(views, np.float32)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n,1,H,W) float -> (n,1,size,size): bilinear with antialias when shrinking; identity when already there."""
    if images.ndim != 4:
        raise ValueError(f"expected (n,1,H,W), got {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
