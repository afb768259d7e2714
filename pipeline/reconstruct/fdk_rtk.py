"""RTK's CPU FDK (``rtk.FDKConeBeamReconstructionFilter``), the independent reference reconstructor.

Geometry: the render helper's single RTK builder (:func:`xwin.pipeline.render.rtk_backend.rtk_geometry`, vector form
of ``AddProjection``) fed with our views rigidly moved into the orbit frame (rotation axis = RTK's y axis, see
``frames``); the output grid is moved by the same transform, so the returned array is on the requested world grid.
Short scans use RTK's ``ParkerShortScanImageFilter`` (on a copy: it works in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float, Float32

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.reconstruct.frames import orbit_frame, transform_grid, transform_views
from xwin.pipeline.reconstruct.grid import ReconGrid
from xwin.pipeline.reconstruct.orbit import Orbit, fit_orbit


def fdk(
    projections: Float[np.ndarray, "V H W"],
    views: ConeBeamViews,
    grid: ReconGrid,
    orbit: Orbit | None = None,
    short_scan: bool | None = None,
    window: str = "hann",
    cutoff: float = 1.0,
    threads: int | None = None,
) -> tuple[Float32[np.ndarray, "nx ny nz"], dict[str, Any]]:
    """RTK FDK of ``projections`` (V, H, W) [mu*mm] -> (mu (nx, ny, nz) float32 [1/mm], info).

    ``window``: "ram-lak" or "hann" (RTK's ``HannCutFrequency`` = ``cutoff``, the same window as ours).
    """
    import itk
    from itk import RTK as rtk

    from xwin.pipeline.render.rtk_backend import (
        itk_image_from_volume,
        projection_stack,
        rtk_geometry,
        volume_from_itk_image,
    )

    if window not in ("ram-lak", "hann"):
        raise ValueError(f"RTK FDK supports windows 'ram-lak' and 'hann', not {window!r}")
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    orbit = fit_orbit(views) if orbit is None else orbit
    T = orbit_frame(orbit, views, "y")
    v_rtk = transform_views(views, T)
    g_rtk = transform_grid(grid, T)
    geometry = rtk_geometry(v_rtk)
    ImageType = itk.Image[itk.F, 3]
    proj = projection_stack(v_rtk, np.array(projections, dtype=np.float32, copy=True))
    use_parker = (not orbit.full) if short_scan is None else bool(short_scan)
    if use_parker:
        parker = rtk.ParkerShortScanImageFilter[ImageType].New()
        parker.SetInput(proj)
        parker.SetGeometry(geometry)
        parker.Update()
        proj = parker.GetOutput()
        proj.DisconnectPipeline()
    vol = itk_image_from_volume(np.zeros(grid.shape, np.float32), g_rtk.affine)
    f = rtk.FDKConeBeamReconstructionFilter[ImageType].New()
    f.SetInput(0, vol)
    f.SetInput(1, proj)
    f.SetGeometry(geometry)
    f.GetRampFilter().SetTruncationCorrection(0.0)
    f.GetRampFilter().SetHannCutFrequency(float(cutoff) if window == "hann" else 0.0)
    f.Update()
    arr, _ = volume_from_itk_image(f.GetOutput())
    return np.ascontiguousarray(arr, dtype=np.float32), {"short_scan": use_parker}
