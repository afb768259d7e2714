"""A look: how a radiograph is made from a ring's material bases at read time (docs/appearance.md).

The numbers here are parameters; ``xwin.pipeline.radiograph`` turns them into images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Look(BaseModel):
    """X-ray tube, detector, noise, blur, scatter and output of a simulated radiograph.

    The spectrum is spekpy's (``kvp`` tube voltage, ``filtration_mm_al`` of aluminium, ``anode_angle_deg``); mass
    attenuation of the bases is NIST's (xraydb). The detector integrates energy (signal ~ energy x fluence), ideal or
    with a CsI layer of ``detector_csi_mm``. ``photons_per_pixel`` is the mean number of quanta an unattenuated
    pixel receives (None: no noise); ``electronic_noise`` the standard deviation of the additive detector noise in
    the same quanta. ``blur_mm`` is the standard deviation of the detector's Gaussian point spread on the detector,
    ``scatter_fraction`` S/(P+S) of a wide Gaussian (``scatter_kernel_mm``) of the primary image: an
    approximation (docs/appearance.md). ``output``: ``transmission`` (signal / unattenuated signal), ``log``
    (-ln of it) or ``display`` (the log windowed to [0, 1] between its 0.5 and 99.5 percentiles: bright bone).
    ``enhance_amount`` / ``enhance_mm``: the console processing of the display output, an unsharp mask of the log
    image (gain, and the std of its Gaussian in mm on the detector) before the window, as CR and DR consoles enhance
    structures (0: none; display output only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kvp: float = Field(80.0, ge=30.0, le=150.0, description="tube voltage [kV]")
    filtration_mm_al: float = Field(2.5, ge=0.0, le=30.0, description="total filtration [mm Al]")
    anode_angle_deg: float = Field(12.0, ge=5.0, le=45.0, description="anode (target) angle [deg]")
    detector_csi_mm: float = Field(
        0.0, ge=0.0, le=5.0, description="CsI scintillator thickness [mm]; 0: ideal energy-integrating detector"
    )
    photons_per_pixel: float | None = Field(
        None, gt=0.0, description="mean quanta per unattenuated pixel (Poisson noise); None: noiseless"
    )
    electronic_noise: float = Field(0.0, ge=0.0, description="std of additive Gaussian detector noise [quanta]")
    blur_mm: float = Field(0.0, ge=0.0, le=20.0, description="std of the detector's Gaussian blur [mm]")
    scatter_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="scatter fraction S/(P+S)")
    scatter_kernel_mm: float = Field(60.0, gt=0.0, le=500.0, description="std of the scatter kernel [mm]")
    seed: int = Field(0, ge=0, description="seed of the noise (each view draws its own stream)")
    output: Literal["transmission", "log", "display"] = "transmission"
    enhance_amount: float = Field(
        0.0, ge=0.0, le=10.0, description="unsharp-mask gain of the display output's processing; 0: none"
    )
    enhance_mm: float = Field(10.0, gt=0.0, le=200.0, description="std of the unsharp mask's Gaussian [mm]")

    @model_validator(mode="after")
    def _check(self) -> Look:
        if self.electronic_noise > 0 and self.photons_per_pixel is None:
            raise ValueError("electronic_noise is in quanta: it needs photons_per_pixel")
        if self.enhance_amount > 0 and self.output != "display":
            raise ValueError(f"enhance_amount is processing of the display output, not of output {self.output!r}")
        return self

    @property
    def beam_key(self) -> tuple[float, float, float, float]:
        """What the spectrum and the lookup table depend on."""
        return (float(self.kvp), float(self.filtration_mm_al), float(self.anode_angle_deg), float(self.detector_csi_mm))


# the order of a sample's ``look`` vector (training/data/xwin_stream.py): photons_per_pixel 0 = noiseless
LOOK_VECTOR_FIELDS: tuple[str, ...] = (
    "kvp",
    "filtration_mm_al",
    "anode_angle_deg",
    "detector_csi_mm",
    "photons_per_pixel",
    "electronic_noise",
    "blur_mm",
    "scatter_fraction",
    "scatter_kernel_mm",
    "seed",
    "enhance_amount",
    "enhance_mm",
)


def look_vector(look: Look) -> list[float]:
    """``look``'s parameters in :data:`LOOK_VECTOR_FIELDS` order (what a training sample records)."""
    d = look.model_dump()
    d["photons_per_pixel"] = d["photons_per_pixel"] or 0.0
    return [float(d[k]) for k in LOOK_VECTOR_FIELDS]


class LookRanges(BaseModel):
    """Domain actions: per training sample, a :class:`Look` drawn from these ranges ``[lo, hi]`` (uniform; photons
    per pixel log-uniform; ``photons_per_pixel: null`` = noiseless). The spectrum's parameters are rounded to their
    ``*_step`` so a worker builds a bounded number of lookup tables (one per spectrum, cached)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kvp: tuple[float, float] = (70.0, 120.0)
    filtration_mm_al: tuple[float, float] = (2.5, 4.0)
    anode_angle_deg: tuple[float, float] = (12.0, 12.0)
    detector_csi_mm: tuple[float, float] = (0.0, 0.0)
    photons_per_pixel: tuple[float, float] | None = (1e4, 1e6)
    electronic_noise: tuple[float, float] = (0.0, 0.0)
    blur_mm: tuple[float, float] = (0.0, 0.5)
    scatter_fraction: tuple[float, float] = (0.0, 0.4)
    scatter_kernel_mm: tuple[float, float] = (60.0, 60.0)
    enhance_amount: tuple[float, float] = (0.0, 0.0)
    enhance_mm: tuple[float, float] = (10.0, 10.0)
    output: Literal["transmission", "log", "display"] = "display"
    kvp_step: float = Field(5.0, gt=0)
    filtration_step: float = Field(0.5, gt=0)
    angle_step: float = Field(1.0, gt=0)
    csi_step: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LookRanges:
        ends: list[dict] = [{"output": self.output}, {"output": self.output}]
        for name in type(self).model_fields:
            r = getattr(self, name)
            if isinstance(r, tuple):
                if not r[0] <= r[1]:
                    raise ValueError(f"{name}: range {list(r)} must be [lo, hi] with lo <= hi")
                ends[0][name], ends[1][name] = r
        for e in ends:  # both ends must be valid looks (Look's own rules)
            Look(**e)
        return self

    def sample(self, rng: np.random.Generator) -> Look:
        """One look drawn with ``rng`` (its noise seed too)."""

        def u(r: tuple[float, float], step: float | None = None) -> float:
            v = float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])
            if step is not None:
                v = min(max(round(v / step) * step, r[0]), r[1])
            return v

        ppp = None
        if self.photons_per_pixel is not None:
            lo, hi = np.log(self.photons_per_pixel[0]), np.log(self.photons_per_pixel[1])
            ppp = float(np.exp(rng.uniform(lo, hi))) if hi > lo else float(self.photons_per_pixel[0])
        return Look(
            kvp=u(self.kvp, self.kvp_step),
            filtration_mm_al=u(self.filtration_mm_al, self.filtration_step),
            anode_angle_deg=u(self.anode_angle_deg, self.angle_step),
            detector_csi_mm=u(self.detector_csi_mm, self.csi_step),
            photons_per_pixel=ppp,
            electronic_noise=u(self.electronic_noise) if ppp is not None else 0.0,
            blur_mm=u(self.blur_mm),
            scatter_fraction=u(self.scatter_fraction),
            scatter_kernel_mm=u(self.scatter_kernel_mm),
            seed=int(rng.integers(0, 2**24)),
            output=self.output,
            # drawn after the others: ranges without processing draw exactly what they drew before it existed
            enhance_amount=u(self.enhance_amount),
            enhance_mm=u(self.enhance_mm),
        )
