"""Radiographs from material bases at read time: spectrum, energy-integrating detector, noise, blur, scatter
(docs/appearance.md).

A ring rendered with ``materials: true`` stores, per view, the areal densities a = (a_soft, a_bone) [g/cm^2] along
every ray (``xwin.pipeline.materials``). A :class:`~xwin.schemas.look.Look` turns them into a radiograph:

    T(a) = sum_E w(E) exp(-mu_soft(E) a_soft - mu_bone(E) a_bone) / sum_E w(E)      (primary transmission)
    w(E) = phi(E) * E * eta(E)                      energy-integrating detector: fluence x energy x absorption
    phi   spekpy's tube spectrum (kVp, mm Al, anode angle); mu_m xraydb's NIST mass attenuation [cm^2/g]
    eta   1 (ideal) or 1 - exp(-mu_CsI(E) rho_CsI t) (a CsI layer of t mm)

T is read from a lookup table of -ln T on a grid of (a_soft, a_bone), built once per spectrum (one matrix product
over the energy bins) and interpolated bilinearly: -ln T is smooth and nearly linear in a (its curvature is the
spectrum-weighted variance of mu, the beam hardening), so a 0.25 x 0.1 g/cm^2 grid is exact to ~1e-4, refined
near 0, where a little-filtered spectrum's lowest energies die within hundredths of a g/cm^2. Then:

    scatter   S = f/(1-f) * G_wide * (T (1 - e^(-a/1 g/cm^2)))  (f = scatter_fraction; an approximation, the docs)
    noise     Poisson(N0 (T + S)) / N0 + Normal(0, sigma_e) / N0        (N0 = photons_per_pixel)
    blur      Gaussian point spread of std blur_mm on the detector (it blurs the noise too, as a scintillator does)
    output    transmission (signal / unattenuated signal), log (-ln), display (log windowed to [0, 1])
    process   display only: q + k (q - G_s * q) on the log image q before the window (unsharp mask, gain k =
              enhance_amount, Gaussian std s = enhance_mm), the structure enhancement of CR/DR consoles
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Float32

from xwin.schemas.look import Look

RHO_CSI = 4.51  # g/cm^3
SOFT_MAX, SOFT_STEP = 150.0, 0.25  # g/cm^2: 150 cm of water, far beyond any body path
BONE_MAX, BONE_STEP = 40.0, 0.1
SCATTER_A_G_CM2 = 1.0  # g/cm^2: a ray's scatter source is its primary x (1 - exp(-a / this)) (radiograph_view)
WARP_A0, WARP_C = 0.01, 5.0  # g/cm^2, nodes per e-fold: the lookup table's finer grid near 0 (TransmissionLUT)


def _warp(a: np.ndarray, step: float) -> np.ndarray:
    """The table coordinate ``a / step + WARP_C ln(1 + a / WARP_A0)`` of areal densities ``a`` >= 0 (float32)."""
    a32 = np.asarray(a, np.float32)
    return a32 * np.float32(1.0 / step) + np.float32(WARP_C) * np.log1p(a32 * np.float32(1.0 / WARP_A0))


def _warp_nodes(a_max: float, step: float) -> np.ndarray:
    """The areal densities (float64) at the integer table coordinates 0, 1, ... up to the first at or past
    ``a_max`` (bisection of the increasing map :func:`_warp`)."""
    n = int(np.ceil(a_max / step + WARP_C * np.log1p(a_max / WARP_A0))) + 1
    k = np.arange(n, dtype=np.float64)
    lo, hi = np.zeros(n), k * step
    for _ in range(80):
        mid = (lo + hi) / 2
        below = mid / step + WARP_C * np.log1p(mid / WARP_A0) < k
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return (lo + hi) / 2


def load_look(path: str | Path) -> Look:
    """A :class:`Look` from a .json / .yaml / .yml file (pydantic validates it: unknown keys and bad values raise
    ``pydantic.ValidationError``)."""
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"look file {p}: not a mapping")
    return Look.model_validate(data)


@functools.lru_cache(maxsize=64)
def spectrum(kvp: float, filtration_mm_al: float, anode_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """spekpy's spectrum: (bin centres [keV], fluence per bin), bins of 0.5 keV up to ``kvp``."""
    import spekpy

    s = spekpy.Spek(kvp=float(kvp), th=float(anode_angle_deg))
    if filtration_mm_al > 0:
        s.filter("Al", float(filtration_mm_al))
    e, f = s.get_spectrum()
    e, f = np.asarray(e, np.float64), np.asarray(f, np.float64)
    keep = f > 0
    return e[keep], f[keep]


@dataclass(frozen=True)
class Beam:
    """A spectrum seen by a detector: energies [keV], normalised detector weights w(E) (sum 1), and the bases'
    mass attenuation mu (2, E) [cm^2/g] at those energies."""

    energies: np.ndarray
    weights: np.ndarray
    mu: np.ndarray


@functools.lru_cache(maxsize=64)
def _beam(key: tuple[float, float, float, float]) -> Beam:
    from xwin.pipeline.materials import mass_attenuation

    kvp, filt, angle, csi_mm = key
    e, f = spectrum(kvp, filt, angle)
    w = f * e
    if csi_mm > 0:
        import xraydb

        mu_csi = np.asarray(xraydb.material_mu("CsI", e * 1e3, density=RHO_CSI), np.float64)  # 1/cm
        w = w * -np.expm1(-mu_csi * csi_mm * 0.1)
    return Beam(e, w / w.sum(), mass_attenuation(e))


def beam(look: Look) -> Beam:
    return _beam(look.beam_key)


def transmission_direct(
    soft: Float[np.ndarray, "*shape"], bone: Float[np.ndarray, "*shape"], b: Beam
) -> Float[np.ndarray, "*shape"]:
    """The primary transmission of every pixel computed energy by energy (float64; the reference for the LUT)."""
    s = np.asarray(soft, np.float64)
    t = np.asarray(bone, np.float64)
    out = np.zeros(s.shape, np.float64)
    for k in range(b.energies.size):
        out += b.weights[k] * np.exp(-b.mu[0, k] * s - b.mu[1, k] * t)
    return out


class TransmissionLUT:
    """-ln T on a (a_soft, a_bone) grid for one beam; ``__call__`` interpolates it bilinearly (float32).

    The grid is regular in ``u(a) = a / step + WARP_C ln(1 + a / WARP_A0)``: ``step`` apart at large a, about
    ``WARP_A0 / WARP_C`` apart near 0, where a soft (little-filtered) spectrum loses its lowest energies within
    hundredths of a g/cm^2 and -ln T bends sharply. Beyond the grid the last cell's plane is extrapolated (-ln T
    is nearly linear there); negative inputs are 0."""

    def __init__(self, b: Beam, soft_max: float = SOFT_MAX, soft_step: float = SOFT_STEP,
                 bone_max: float = BONE_MAX, bone_step: float = BONE_STEP) -> None:  # fmt: skip
        self.beam = b
        self.soft_step, self.bone_step = float(soft_step), float(bone_step)
        gs = _warp_nodes(soft_max, self.soft_step)
        gb = _warp_nodes(bone_max, self.bone_step)
        self.soft_nodes, self.bone_nodes = gs, gb
        es = np.exp(-np.outer(gs, b.mu[0])) * b.weights  # (Ns, E)
        eb = np.exp(-np.outer(gb, b.mu[1]))  # (Nb, E)
        t = es @ eb.T  # (Ns, Nb): sum_E w exp(-mu_s s - mu_b b)
        self.table = (-np.log(np.maximum(t, 1e-300))).astype(np.float32)
        self.ns, self.nb = self.table.shape
        self._flat = self.table.ravel()

    def neglog(
        self, soft: Float[np.ndarray, "*shape"], bone: Float[np.ndarray, "*shape"]
    ) -> Float32[np.ndarray, "*shape"]:
        """-ln T of every pixel (float32)."""
        x = _warp(np.maximum(np.asarray(soft, np.float32), np.float32(0.0)), self.soft_step)
        y = _warp(np.maximum(np.asarray(bone, np.float32), np.float32(0.0)), self.bone_step)
        i = np.minimum(x.astype(np.int32), self.ns - 2)
        j = np.minimum(y.astype(np.int32), self.nb - 2)
        x -= i
        y -= j
        k = i * self.nb + j
        f = self._flat
        l00, l01, l10, l11 = f[k], f[k + 1], f[k + self.nb], f[k + self.nb + 1]
        a = l00 + (l01 - l00) * y
        c = l10 + (l11 - l10) * y
        return (a + (c - a) * x).astype(np.float32, copy=False)

    def __call__(
        self, soft: Float[np.ndarray, "*shape"], bone: Float[np.ndarray, "*shape"]
    ) -> Float32[np.ndarray, "*shape"]:
        """Primary transmission T of every pixel (float32)."""
        return np.exp(-self.neglog(soft, bone))


@functools.lru_cache(maxsize=32)
def _lut(key: tuple[float, float, float, float]) -> TransmissionLUT:
    return TransmissionLUT(_beam(key))


def lut(look: Look) -> TransmissionLUT:
    """The lookup table of ``look``'s beam (built once per spectrum and detector, then cached)."""
    return _lut(look.beam_key)


def _linear_upsample(n: int, m: int, d: int) -> np.ndarray:
    """(n, m) weights of linear interpolation from ``m`` block centres ((d-1)/2 + d*k) to ``n`` pixels (edges held)."""
    x = np.clip((np.arange(n) - (d - 1) / 2.0) / d, 0.0, m - 1.0)
    i = np.minimum(x.astype(np.int64), max(m - 2, 0))
    t = x - i
    w = np.zeros((n, m))
    w[np.arange(n), i] += 1.0 - t
    if m > 1:
        w[np.arange(n), i + 1] += t
    return w


def _wide_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """A Gaussian of std ``sigma_px`` (wide) on a block-averaged copy, brought back by linear interpolation (two
    small matrix products): the scatter image is smooth, so this costs about a millisecond for any width."""
    import scipy.ndimage as ndi

    H, W = img.shape
    d = max(1, int(sigma_px // 8))
    if d == 1:
        return ndi.gaussian_filter(img, sigma_px, mode="nearest")
    hp, wp = -(-H // d) * d, -(-W // d) * d
    padded = np.pad(img, ((0, hp - H), (0, wp - W)), mode="edge")
    small = ndi.gaussian_filter(padded.reshape(hp // d, d, wp // d, d).mean(axis=(1, 3)), sigma_px / d, mode="nearest")
    return _linear_upsample(H, hp // d, d) @ small @ _linear_upsample(W, wp // d, d).T


def radiograph_view(
    soft: Float[np.ndarray, "H W"],
    bone: Float[np.ndarray, "H W"],
    look: Look,
    pixel_mm: float,
    view_index: int = 0,
) -> Float32[np.ndarray, "H W"]:
    """One view's radiograph under ``look`` (the module docstring's steps). The noise of view ``view_index`` is
    drawn from its own stream, ``default_rng([look.seed, view_index])``: the same view gives the same image
    however the views are read."""
    import scipy.ndimage as ndi

    sig = lut(look)(soft, bone)
    if look.scatter_fraction > 0:
        # scatter arises in matter: a ray through (nearly) nothing adds none, so the air beside the body stays at 1
        # (up to the veil the body spreads into it) instead of 1 / (1 - f)
        f = look.scatter_fraction
        src = sig * -np.expm1((np.maximum(soft, 0) + np.maximum(bone, 0)) * np.float32(-1.0 / SCATTER_A_G_CM2))
        sig = sig + np.float32(f / (1.0 - f)) * _wide_blur(src, look.scatter_kernel_mm / pixel_mm).astype(np.float32)
    n0 = look.photons_per_pixel
    if n0 is not None:
        rng = np.random.default_rng([look.seed, int(view_index)])
        counts = rng.poisson(np.float64(n0) * sig).astype(np.float32)
        if look.electronic_noise > 0:
            counts += rng.standard_normal(counts.shape, dtype=np.float32) * np.float32(look.electronic_noise)
        sig = counts * np.float32(1.0 / n0)
    if look.blur_mm > 0:
        sig = ndi.gaussian_filter(sig, look.blur_mm / pixel_mm, mode="nearest")
    sig = np.asarray(sig, np.float32)
    if look.output == "transmission":
        return sig
    floor = np.float32(0.5 / n0 if n0 is not None else 1e-12)
    q = -np.log(np.maximum(sig, floor))
    if look.output == "log":
        return q
    if look.enhance_amount > 0:
        smooth = ndi.gaussian_filter(q, look.enhance_mm / pixel_mm, mode="reflect")
        q = q + np.float32(look.enhance_amount) * (q - smooth)
    lo, hi = np.percentile(q, (0.5, 99.5))
    return np.clip((q - lo) / max(float(hi - lo), 1e-8), 0.0, 1.0).astype(np.float32)


def radiograph(
    bases: Float[np.ndarray, "2 n H W"],
    look: Look,
    pixel_mm: float,
    view_indices: list[int] | np.ndarray | None = None,
) -> Float32[np.ndarray, "n H W"]:
    """Radiographs (n, H, W) float32 of material bases (2, n, H, W) [g/cm^2] under ``look``; ``pixel_mm`` is the
    detector pitch (blur and scatter widths are in mm on the detector); ``view_indices`` name the views for their
    noise streams (default 0..n-1)."""
    b = np.asarray(bases)
    if b.ndim != 4 or b.shape[0] != 2:
        raise ValueError(f"material bases must be (2, n, H, W), got {b.shape}")
    idx = list(range(b.shape[1])) if view_indices is None else [int(i) for i in view_indices]
    if len(idx) != b.shape[1]:
        raise ValueError(f"{len(idx)} view indices for {b.shape[1]} views")
    out = np.empty(b.shape[1:], np.float32)
    for k in range(b.shape[1]):
        out[k] = radiograph_view(b[0, k], b[1, k], look, pixel_mm, idx[k])
    return out
