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


def _triton() -> bool:
    """triton imports, and CUDA exists or Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    from xwin.pipeline.render.triton_joseph import available

    return available()


def _nanodrr() -> bool:
    from xwin.pipeline.render.nanodrr_backend import available

    return available()


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
    "triton": Backend(
        "triton",
        "xwin.pipeline.render.triton_joseph",
        "project",
        _triton,
        "fused Triton Joseph projector (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)",
    ),
    "nanodrr": Backend(
        "nanodrr",
        "xwin.pipeline.render.nanodrr_backend",
        "project",
        _nanodrr,
        "nanodrr (PyPI) on our rays: its fused Triton kernel on CUDA, its torch path elsewhere",
    ),
    "diffdrr": Backend(
        "diffdrr", "xwin.pipeline.render.diffdrr_backend", "project", _always, "DiffDRR 0.6.1 Siddon (reference)"
    ),
    "rtk": Backend("rtk", "xwin.pipeline.render.rtk_backend", "project", _rtk, "RTK JosephForwardProjection (CPU)"),
}


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    return [n for n, b in BACKENDS.items() if b.available()]


def auto_backend() -> str:
    """What 'auto' means here: 'triton' where CUDA exists and triton imports, 'gpu' (torch on CUDA) where only
    CUDA exists, else 'joseph' (the interpreter is never chosen automatically: it is for tests, and slow)."""
    if not _cuda():
        return "joseph"
    from xwin.pipeline.render.triton_joseph import triton_importable

    return "triton" if triton_importable() else "gpu"


def resolve_backend(name: str = "auto") -> str:
    """'auto' -> :func:`auto_backend`; other names are checked for availability."""
    if name == "auto":
        return auto_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown render backend {name!r}; known: {sorted(BACKENDS)}")
    if not BACKENDS[name].available():
        why = BACKENDS[name].description
        if name == "triton":
            from xwin.pipeline.render.triton_joseph import triton_importable

            why = (
                "CUDA not found; set TRITON_INTERPRET=1 to run its kernel in Triton's CPU interpreter (slow)"
                if triton_importable()
                else "the 'triton' package is not installed: pip install 'xwin[gpu]'"
            )
        raise RuntimeError(f"render backend {name!r} is not available here ({why})")
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
        "triton": ["triton", "torch"],
        "nanodrr": ["nanodrr", "torch", "triton"],
        "diffdrr": ["diffdrr", "torch"],
        "rtk": ["itk-rtk", "itk"],
    }.get(name, [])
    for lib in libs:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:  # pragma: no cover
            out[lib] = "unknown"
    if name == "triton":
        from xwin.pipeline.render.triton_joseph import interpreting

        out["triton_mode"] = "interpreter" if interpreting() else "cuda"
    return out
