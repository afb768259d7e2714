"""FDK reconstruction of stored DRR rings and the 3-D validation loop (docs/reconstruction.md).

    reconstruct(projections (V,H,W) [mu*mm], views, grid, backend) -> Reconstruction, mu [1/mm]     fdk.py
    validate_volume(projections, views, hu, affine, mu_water, ...) -> ValidationResult (metrics)     validate.py

Geometry comes only from ``views`` (for stored rings: the stored ``cone_vec``s, ``xwin.flows.validate``), never from a
RenderSpec. Backends:
    "numba"  our CPU FDK (FFT ramp filter + numba voxel-driven backprojection) -- fdk_numba
    "rtk"    RTK's CPU FDK, the independent reference                           -- fdk_rtk
    "astra"  ASTRA FDK_CUDA (GPU; untested on a GPU so far)                     -- fdk_astra
    "auto"   "astra" where ASTRA's CUDA probe passes (in a subprocess), else "numba"
"""

from xwin.pipeline.reconstruct.fdk import (
    BACKENDS,
    Reconstruction,
    default_cutoff,
    fov_grid,
    reconstruct,
    resolve_backend,
    truncation_report,
)
from xwin.pipeline.reconstruct.grid import ReconGrid, default_grid
from xwin.pipeline.reconstruct.orbit import GeometryError, Orbit, fit_orbit
from xwin.pipeline.reconstruct.validate import ValidationResult, validate_volume

__all__ = [
    "BACKENDS",
    "GeometryError",
    "Orbit",
    "ReconGrid",
    "Reconstruction",
    "ValidationResult",
    "default_cutoff",
    "default_grid",
    "fit_orbit",
    "fov_grid",
    "reconstruct",
    "resolve_backend",
    "truncation_report",
    "validate_volume",
]
