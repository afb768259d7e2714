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
the same backend, volume model and rays as the views: density [g/cm^3] x mm, times 0.1 -> g/cm^2. With joseph both
in one pass over the rays (one channels-last volume, ``joseph.project_channels``), with the other backends one after
the other (``render_views(..., is_mu=True)``); the results are the same.

The model is written once, for one voxel (``_density``, numba, float32); ``hu_to_densities`` and
``hu_to_density_channels`` run it over a volume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, no_type_check

import numba as nb
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


# the model's numbers as the float32 the densities are computed in
_F32_HU_SOFT_MAX = np.float32(HU_SOFT_MAX)
_F32_HU_SPAN = np.float32(HU_CORTICAL - HU_SOFT_MAX)
_F32_RHO_SOFT_AT_MAX = np.float32(RHO_SOFT_AT_MAX)
_F32_RHO_CORTICAL = np.float32(RHO_CORTICAL)


@nb.njit(cache=True, inline="always")
@no_type_check  # compiled by numba: the tests' shape-checking import hook must leave it unwrapped
def _density(h):  # pragma: no cover - compiled (numba); its values are tested through hu_to_densities
    """The model above for one voxel, in float32: HU -> (soft, bone) [g/cm^3]."""
    x = np.float32(h)
    frac = (x - _F32_HU_SOFT_MAX) / _F32_HU_SPAN  # the bone volume fraction
    if frac < np.float32(0.0):
        frac = np.float32(0.0)
    if x > _F32_HU_SOFT_MAX:
        s = np.float32(1.0) - frac
        s = (s if s > np.float32(0.0) else np.float32(0.0)) * _F32_RHO_SOFT_AT_MAX
    else:
        s = x * np.float32(1e-3) + np.float32(1.0)
        if s < np.float32(0.0):
            s = np.float32(0.0)
    return s, frac * _F32_RHO_CORTICAL


@nb.njit(cache=True)
@no_type_check  # compiled by numba: the tests' shape-checking import hook must leave it unwrapped
def _densities_into(h, soft, bone):  # pragma: no cover - compiled (numba)
    """``h`` (N,) HU of any real dtype -> ``soft``, ``bone`` (N,) float32."""
    for i in range(h.shape[0]):
        soft[i], bone[i] = _density(h[i])


@nb.njit(cache=True)
@no_type_check  # compiled by numba: the tests' shape-checking import hook must leave it unwrapped
def _density_pairs_into(h, out):  # pragma: no cover - compiled (numba)
    """``h`` (X, Y, Z) HU of any real dtype and layout -> ``out`` (2 X Y Z,) float32: C order, (soft, bone)
    interleaved. Tiles of 16 x 16 in (x, z) per y plane, so a Fortran-ordered volume (ingest's) is read and the
    C-ordered output written a cache line at a time. Returns the number of voxels with bone."""
    nx, ny, nz = h.shape
    n_bone = 0
    for j in range(ny):
        for i0 in range(0, nx, 16):
            for k0 in range(0, nz, 16):
                for i in range(i0, min(nx, i0 + 16)):
                    q = 2 * ((i * ny + j) * nz + k0)
                    for k in range(k0, min(nz, k0 + 16)):
                        s, b = _density(h[i, j, k])
                        out[q] = s
                        out[q + 1] = b
                        n_bone += b != np.float32(0.0)
                        q += 2
    return n_bone


def _compiled_input(h: np.ndarray) -> np.ndarray:
    """``h`` as the compiled model takes it: native-order integers, float32 or float64 as they are; anything else
    (big-endian, as a NIfTI file may hold it, float16, bool) as float32 in the same memory layout (the model computes
    in float32 anyway)."""
    if h.dtype.isnative and (h.dtype.kind in "iu" or h.dtype in (np.float32, np.float64)):
        return h
    return h.astype(np.float32, order="K")


def hu_to_densities(
    hu: Real[np.ndarray, "*shape"],
) -> tuple[Float32[np.ndarray, "*shape"], Float32[np.ndarray, "*shape"]]:
    """HU -> (soft, bone) partial densities [g/cm^3] of each voxel (float32, same shape), the model above.

    One pass over the volume, no temporaries (for native integers, float32 or float64; see :func:`_compiled_input`):
    the two float32 outputs are all the memory it takes (a 512 x 512 x 600 CT is 630 MB each)."""
    h = _compiled_input(np.asarray(hu))
    if not (h.flags.c_contiguous or h.flags.f_contiguous):
        h = np.ascontiguousarray(h)
    order: Literal["C", "F"] = "C" if h.flags.c_contiguous else "F"  # the outputs keep the input's layout (ingest's: F)
    soft = np.empty(h.shape, np.float32, order=order)
    bone = np.empty(h.shape, np.float32, order=order)
    _densities_into(h.ravel(order), soft.ravel(order), bone.ravel(order))
    return soft, bone


def hu_to_density_channels(hu: Real[np.ndarray, "X Y Z"]) -> tuple[Float32[np.ndarray, "X Y Z 2"], bool]:
    """:func:`hu_to_densities` of a volume as one C-ordered channels-last float32 array (soft ``[..., 0]``, bone
    ``[..., 1]``: the layout the fused projector reads), in one pass whatever the input's layout, and whether any
    voxel has bone (is above ``HU_SOFT_MAX``)."""
    h = np.asarray(hu)
    if h.ndim != 3:
        raise ValueError(f"volume must be 3-D (X,Y,Z), got shape {h.shape}")
    h = _compiled_input(h)
    out = np.empty((*h.shape, 2), np.float32)
    n_bone = _density_pairs_into(h, out.reshape(-1))
    return out, bool(n_bone > 0)


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
    line integral of its partial density through the same backend and volume model as the views.

    With the "joseph" backend (and "auto" where it means joseph) both bases are projected in one pass over the
    rays (:func:`xwin.pipeline.render.joseph.project_channels`, equal to projecting each alone); other backends
    project them one after the other. ``on_material(done, 2)`` is called as bases are finished: (1, 2) then (2, 2)
    one after the other, (2, 2) once for the single pass. ``options`` go to the backend as in ``render_views``
    (``notes``, ``on_progress``: once per pass over the views)."""
    from xwin.pipeline.render import render_views, resolve_backend

    if resolve_backend(backend) == "joseph":
        return _render_materials_joseph(hu, affine, views, on_material, **options)
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


def _render_materials_joseph(
    hu: Real[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    on_material: Callable[[int, int], None] | None,
    notes: list[str] | None = None,  # render_views' keyword: the CPU projector has nothing to note
    on_progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Float32[np.ndarray, "2 V H W"]:
    """Both bases in one joseph pass: the densities as one channels-last volume, projected as two channels."""
    from xwin.pipeline.render.joseph import project, project_channels
    from xwin.pipeline.render.project import _check_volume

    vol, A = _check_volume(hu, affine)
    dens, any_bone = hu_to_density_channels(vol)
    if on_progress is not None:
        on_progress(0, len(views))
    if any_bone:
        out = project_channels(dens, A, views, on_progress=on_progress, **options)
    else:  # no voxel above 100 HU: no bone anywhere, the soft basis alone
        out = np.zeros((2, len(views), views.height, views.width), np.float32)
        out[0] = project(dens[..., 0], A, views, on_progress=on_progress, **options)
    out *= np.float32(0.1)  # g/cm^3 * mm -> g/cm^2
    if on_material is not None:
        on_material(2, 2)
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
