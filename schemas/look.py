"""A look: how a radiograph is made from a ring's material bases at read time (docs/appearance.md).

The numbers here are parameters; ``xwin.pipeline.radiograph`` turns them into images.
"""

from __future__ import annotations

from typing import Literal

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

    @model_validator(mode="after")
    def _check(self) -> Look:
        if self.electronic_noise > 0 and self.photons_per_pixel is None:
            raise ValueError("electronic_noise is in quanta: it needs photons_per_pixel")
        return self

    @property
    def beam_key(self) -> tuple[float, float, float, float]:
        """What the spectrum and the lookup table depend on."""
        return (float(self.kvp), float(self.filtration_mm_al), float(self.anode_angle_deg), float(self.detector_csi_mm))
