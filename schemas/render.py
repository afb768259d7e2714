"""Render contracts: the render spec (what a dataset is made with) and the per-view geometry records.

The numbers here are *parameters*; the single implementation that turns them into rays lives in
``xwin.pipeline.geometry``. Conventions (world frame, yaw sign, detector axes) are documented in docs/geometry.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Float64, Int
from pydantic import BaseModel, ConfigDict, Field, model_validator


class RenderSpec(BaseModel):
    """How a ring of cone-beam DRRs is rendered. Defaults follow X-WIN (paper §3, released code).

    Geometry: the source orbits the volume centre (isocentre) in the axial plane at ``sid_mm``; the flat detector
    faces it at ``sdd_mm`` from the source. View k sits at yaw ``yaw_start_deg + k * yaw_step_deg`` (degrees,
    right-handed about world +S). Yaw 0 is the frontal view (source anterior, radiological display: patient right
    on image left, superior at the top); yaw 90 puts the source on the patient's left (docs/geometry.md).

    Values: each pixel is the line integral of mu = mu_water * max(0, 1 + HU/1000) in units of mu*mm (unitless),
    with ``mu_water_per_mm`` the linear attenuation of water. No per-image normalisation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec_version: Literal[1] = 1
    projection: Literal["cone"] = "cone"
    sid_mm: float = Field(700.0, gt=0, description="source to isocentre distance")
    sdd_mm: float = Field(1020.0, gt=0, description="source to detector distance")
    height: int = Field(512, ge=8, le=4096, description="detector rows")
    width: int = Field(512, ge=8, le=4096, description="detector columns")
    pixel_mm: float = Field(1.0, gt=0, description="detector pixel pitch (square pixels)")
    yaw_start_deg: float = 0.0
    yaw_step_deg: float = Field(3.0, gt=0, le=180)
    n_views: int = Field(120, ge=1, le=3600)
    mu_water_per_mm: float = Field(0.02, gt=0, description="linear attenuation of water [1/mm]")
    store_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="dtype of stored views. float16 (default): rounding errs by at most 2^-11 (4.9e-4) relative, "
        "finer than one 8-bit display level and than the bf16 a GPU trainer feeds the model; half the bytes to "
        "write, store and read (measured error and speed: docs/benchmarks.md, Store). float32: exact.",
    )

    body_mask: bool = Field(
        False,
        description="render only the patient's body: the scanner table and everything outside the body become air "
        "before projection (xwin.pipeline.body; a radiograph has no CT table). Off by default: docs/render.md.",
    )

    materials: bool = Field(
        False,
        description="also render the material bases: per view the areal density [g/cm^2] of soft tissue (water) and "
        "bone along every ray, through the same rays and backend as the views, stored with the ring as a "
        "(2, V, H, W) float16 array (xwin.pipeline.materials; docs/appearance.md). Off by default.",
    )

    @model_validator(mode="after")
    def _check(self) -> RenderSpec:
        if self.sdd_mm <= self.sid_mm:
            raise ValueError(f"sdd_mm ({self.sdd_mm}) must exceed sid_mm ({self.sid_mm})")
        return self

    @property
    def yaws_deg(self) -> list[float]:
        return [self.yaw_start_deg + k * self.yaw_step_deg for k in range(self.n_views)]

    @property
    def arc_deg(self) -> float:
        return self.yaw_step_deg * self.n_views

    @property
    def full_orbit(self) -> bool:
        return self.arc_deg >= 360.0 - 1e-9

    def view_index(self, yaw_deg: float) -> int:
        """Index of the view at absolute yaw ``yaw_deg`` (mod 360); raises if the ring has no such view."""
        for k, y in enumerate(self.yaws_deg):
            if abs(((y - yaw_deg + 180.0) % 360.0) - 180.0) < 1e-6:
                return k
        raise KeyError(f"no view at yaw {yaw_deg} deg in this spec")

    def canonical_json(self) -> str:
        """The spec as sorted compact JSON: what :attr:`spec_hash` hashes. Fields added after the first release
        (not in ``_FIRST_FIELDS``) enter it only when set to a value other than their default, so adding a field
        never changes the hash, and so the dataset path, of a spec that does not use it."""
        d = self.model_dump(mode="json")
        defaults = _defaults_json()
        d = {k: v for k, v in d.items() if k in _FIRST_FIELDS or v != defaults[k]}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def spec_hash(self) -> str:
        """Stable content hash: identical parameters give the same hash across runs and machines."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


# The fields of the first release: always hashed. Every field added later is hashed only when not at its default.
_FIRST_FIELDS = frozenset(
    {
        "spec_version",
        "projection",
        "sid_mm",
        "sdd_mm",
        "height",
        "width",
        "pixel_mm",
        "yaw_start_deg",
        "yaw_step_deg",
        "n_views",
        "mu_water_per_mm",
        "store_dtype",
    }
)


@functools.cache
def _defaults_json() -> dict:
    return RenderSpec().model_dump(mode="json")


@dataclass(frozen=True)
class ViewMeta:
    """The per-view action metadata of ``n`` views: what a ring stores beside its pixels and what a reader gets
    back with them (same order as the requested indices). Built from ``xwin.pipeline.geometry.ConeBeamViews.view_meta``;
    ``ConeBeamViews.from_view_meta`` turns it back into rays (only ``cone_vec``, ``height`` and ``width`` matter).

    ``cone_vec`` is ASTRA's row: source xyz, detector-centre xyz, u = step from pixel (0,0) to (0,1),
    v = step from pixel (0,0) to (1,0) (world mm). ``world_from_camera``: OpenCV-style camera at the source, +x along
    u, +y along v, +z towards the detector. ``intrinsics``: pixel = K @ (x, y, z) / z with pixel centres at integer
    (col, row). Conventions: docs/geometry.md.
    """

    index: Int[np.ndarray, " n"]
    yaw_deg: Float64[np.ndarray, " n"]
    cone_vec: Float64[np.ndarray, "n 12"]
    world_from_camera: Float64[np.ndarray, "n 4 4"]
    intrinsics: Float64[np.ndarray, "n 3 3"]
    height: int
    width: int

    def __post_init__(self) -> None:
        n = len(self)
        want = {"yaw_deg": (n,), "cone_vec": (n, 12), "world_from_camera": (n, 4, 4), "intrinsics": (n, 3, 3)}
        for name, shape in want.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise ValueError(f"ViewMeta.{name} has shape {got}, expected {shape} for {n} views")

    def __len__(self) -> int:
        return int(np.shape(self.index)[0])
