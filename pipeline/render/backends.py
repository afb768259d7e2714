"""The render backend registry: which projector a name means, whether it runs here, what versions it depends on."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


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
