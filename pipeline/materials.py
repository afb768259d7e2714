"""Material bases: the areal densities [g/cm^2] of soft tissue and bone along every ray of a ring's views
(docs/appearance.md).

HU -> (material, density): a two-material model, water and ICRU-44 cortical bone.

- HU <= ``HU_SOFT_MAX`` (100): water-like soft tissue (air, lung, fat, muscle, blood, organs) of density
  ``max(0, 1 + HU/1000)`` g/cm^3. For a material with water's composition this *is* the definition of HU
  (``HU = 1000 (mu - mu_water) / mu_water``), so HU 0 is water at 1.0 g/cm^3 and lung at -800 HU is water at
  0.2 g/cm^3; it is also the monoenergetic model of the views (``mu = mu_water * max(0, 1 + HU/1000)``).
- HU > 100: a mixture of that soft tissue (at 1.1 g/cm^3) and cortical bone (1.92 g/cm^3, ICRU-44 composition), the
  bone volume fraction rising linearly in HU from 0 at 100 HU to 1 at ``HU_CORTICAL`` (1600 HU): the bone region of
  Schneider, Bortfeld and Schlegel (2000, Phys. Med. Biol. 45:459, "Correlation between CT numbers and tissue
  parameters needed for Monte Carlo simulations of clinical dose distributions"), whose HU->density calibration ends
  at cortical bone, 1.9 g/cm^3 at 1600 HU, the same point DeepDRR's ``conv_hu_to_density`` interpolates to. Above
  1600 HU the bone fraction keeps growing (denser bone; metal is not modelled). Unlike DeepDRR's hard thresholds
  (air <= -800 < soft tissue <= 350 < bone HU) the mixture is continuous in HU, so partial-volume voxels at bone
  edges and trabecular bone get the attenuation of what they contain.

Both densities are linear in HU on each side of 100 HU and continuous there; they are rendered as two volumes through
the same backend, volume model and rays as the views (``render_views(..., is_mu=True)``): density [g/cm^3] x mm,
times 0.1 -> g/cm^2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from jaxtyping import Float, Float32, Real

from xwin.pipeline.geometry import ConeBeamViews
from xwin.schemas.render import RenderSpec

MATERIALS: tuple[str, str] = ("soft", "bone")
UNITS = "g/cm^2"
HU_SOFT_MAX = 100.0
HU_CORTICAL = 1600.0
RHO_SOFT_AT_MAX = 1.0 + HU_SOFT_MAX / 1000.0  # 1.1 g/cm^3
RHO_CORTICAL = 1.92  # g/cm^3, ICRU-44 cortical bone

# mass fractions (ICRU Report 44 / NIST "Bone, Cortical (ICRU-44)"); water is the soft-tissue basis
COMPOSITIONS: dict[str, dict[str, float]] = {
    "soft": {"H": 0.111894, "O": 0.888106},
    "bone": {
        "H": 0.034,
        "C": 0.155,
        "N": 0.042,
        "O": 0.435,
        "Na": 0.001,
        "Mg": 0.002,
        "P": 0.103,
        "S": 0.003,
        "Ca": 0.225,
    },
}

# what a ring's commit record says about its bases (``material_model``)
MATERIAL_MODEL: dict[str, Any] = {
    "name": "water-cortical-bone mixture",
    "version": 1,
    "materials": list(MATERIALS),
    "units": UNITS,
    "hu_soft_max": HU_SOFT_MAX,
    "hu_cortical": HU_CORTICAL,
    "rho_cortical_g_cm3": RHO_CORTICAL,
    "soft": "water, density max(0, 1 + HU/1000) g/cm^3 up to 100 HU",
    "bone": "ICRU-44 cortical bone mixed with 1.1 g/cm^3 water, volume fraction (HU - 100) / 1500",
    "reference": "Schneider, Bortfeld, Schlegel 2000 (Phys. Med. Biol. 45:459); DeepDRR conv_hu_to_density",
}


def hu_to_densities(
    hu: Real[np.ndarray, "*shape"],
) -> tuple[Float32[np.ndarray, "*shape"], Float32[np.ndarray, "*shape"]]:
    """HU -> (soft, bone) partial densities [g/cm^3] of each voxel (float32, same shape), the model above.

    Computed in place: about 3 float32 copies of the volume at the peak (a 512 x 512 x 600 CT is 630 MB each)."""
    h = np.asarray(hu, dtype=np.float32)
    bone = h - np.float32(HU_SOFT_MAX)
    bone /= np.float32(HU_CORTICAL - HU_SOFT_MAX)
    np.maximum(bone, np.float32(0.0), out=bone)  # the bone volume fraction
    above = h > np.float32(HU_SOFT_MAX)
    soft = h * np.float32(1e-3)
    del h
    soft += np.float32(1.0)
    np.maximum(soft, np.float32(0.0), out=soft)
    soft[above] = np.maximum(np.float32(1.0) - bone[above], np.float32(0.0)) * np.float32(RHO_SOFT_AT_MAX)
    bone *= np.float32(RHO_CORTICAL)
    return soft, bone


def mass_attenuation(energies_kev: Float[np.ndarray, " E"]) -> Float[np.ndarray, "2 E"]:
    """(soft, bone) mass attenuation coefficients [cm^2/g] at ``energies_kev`` (keV): the mixture rule over the
    elements' total cross sections (coherent + incoherent + photoelectric) of xraydb's Elam/NIST tables."""
    import xraydb

    e_ev = np.asarray(energies_kev, dtype=np.float64) * 1e3
    out = np.zeros((len(MATERIALS), e_ev.size), np.float64)
    for m, name in enumerate(MATERIALS):
        for el, w in COMPOSITIONS[name].items():
            out[m] += w * np.asarray(xraydb.mu_elam(el, e_ev), dtype=np.float64)
    return out


def render_materials(
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    backend: str = "auto",
    on_material: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Float32[np.ndarray, "2 V H W"]:
    """Areal densities [g/cm^2] of (soft, bone) along every ray of ``views``: (2, V, H, W) float32, each basis the
    line integral of its partial density through the same backend and volume model as the views."""
    from xwin.pipeline.render import render_views

    soft, bone = hu_to_densities(hu)
    out = np.empty((2, len(views), views.height, views.width), np.float32)
    for m, dens in enumerate((soft, bone)):
        if m == 1 and not dens.any():  # no voxel above 100 HU: no bone anywhere
            out[m] = 0.0
        else:
            out[m] = render_views(dens, affine, views, backend=backend, is_mu=True, **options)
            out[m] *= np.float32(0.1)  # g/cm^3 * mm -> g/cm^2
        if on_material is not None:
            on_material(m + 1, 2)
    return out


def render_ring_materials(
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    spec: RenderSpec,
    views: ConeBeamViews,
    backend: str = "auto",
    **options: Any,
) -> Float32[np.ndarray, "2 V H W"]:
    """:func:`render_materials` of the volume ``render_ring`` projects for ``spec`` (the body only when
    ``spec.body_mask``), along ``views`` (the ring ``render_ring`` returned)."""
    from xwin.pipeline.render.project import ring_volume

    vol, A = ring_volume(hu, affine, spec)
    return render_materials(vol, A, views, backend=backend, **options)
