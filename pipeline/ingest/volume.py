"""Array-level steps shared by DICOM and NIfTI: padding -> air, HU sanity, canonical RAS order, resampling, stats.

Conventions: arrays are (X, Y, Z) voxel order matching the affine's columns; affines map (i, j, k, 1) -> world mm.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from scipy import ndimage

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.errors import IngestError
from xwin.pipeline.ingest.kernels import KERNEL_LOCK, histogram_int16
from xwin.schemas.ingest import HUStats, RejectReason

AIR_HU = -1000
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """(4, 4) voxel->LPS affine -> voxel->RAS affine (x and y negated)."""
    return LPS_TO_RAS @ affine_lps


def check_hu_range(lo: float | None, hi: float, cfg: IngestConfig, what: str) -> None:
    """HU sanity from the minimum ``lo`` of the non-padding voxels (None: all padding) and the maximum ``hi``.

    Raises hu_out_of_range when values cannot be HU: below cfg.min_hu, beyond int16, or no air at all.
    """
    if lo is None:
        raise IngestError(RejectReason.hu_out_of_range, f"{what}: every voxel is padding")
    if lo < cfg.min_hu:
        raise IngestError(
            RejectReason.hu_out_of_range,
            f"{what}: minimum {lo:g} HU below {cfg.min_hu:g} and not "
            f"padding (<= {cfg.padding_hu_at_or_below:g} or "
            "PixelPaddingValue)",
        )
    if hi > 32767:
        raise IngestError(RejectReason.hu_out_of_range, f"{what}: maximum {hi:g} HU does not fit int16")
    if lo > cfg.air_hu:
        raise IngestError(
            RejectReason.hu_out_of_range,
            f"{what}: no air (minimum {lo:g} HU > {cfg.air_hu:g}); not HU values (missing rescale?)",
        )


def canonical_ras(arr: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip voxel axes so the affine is closest to RAS+ (nibabel ``as_closest_canonical`` semantics).

    The world position of every voxel is unchanged: obliquity stays in the affine exactly.
    Returns (contiguous array, new affine); Fortran order (x fastest) unless the input was C-contiguous.
    """
    ornt = io_orientation(affine_ras)
    aff = affine_ras @ inv_ornt_aff(ornt, arr.shape)
    out = apply_orientation(arr, ornt)
    if out.flags.c_contiguous or out.flags.f_contiguous:
        return out, aff
    return (np.ascontiguousarray(out) if arr.flags.c_contiguous else np.asfortranarray(out)), aff


def orientation(affine_ras: np.ndarray) -> np.ndarray:
    """(3, 2) nibabel orientation: input axis i -> output axis ornt[i, 0], flipped if ornt[i, 1] == -1."""
    return io_orientation(affine_ras)


def resample_to_spacing(
    hu: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling of a canonical volume to ``spacing`` (mm along each voxel axis), same field of view.

    New size n' = round(n * s / s'); the new grid is centred on the old one. Padding is already air, so nothing
    but real HU is interpolated. Returns (int16 (X', Y', Z'), affine').
    """
    old = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    new = np.asarray(spacing, float)
    shape = np.asarray(hu.shape)
    nshape = np.maximum(1, np.round(shape * old / new)).astype(int)
    scale = new / old  # old index per new index
    # centres coincide: old_idx = scale * new_idx + offset
    offset = (shape - 1) / 2.0 - scale * (nshape - 1) / 2.0
    out = ndimage.affine_transform(
        hu.astype(np.float32), scale, offset=offset, output_shape=tuple(nshape), order=1, mode="nearest"
    )
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] * scale[None, :]
    aff[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return np.round(out).astype(np.int16), aff


def hu_stats(hu: np.ndarray, counts: np.ndarray | None = None) -> HUStats:
    """Exact statistics of an int16 volume (any memory order) from a histogram of its 65536 possible values.

    ``counts`` (65536,): the histogram if already known (index v + 32768). Percentiles: numpy ``method='lower'``.
    """
    if counts is None:
        with KERNEL_LOCK:
            counts = histogram_int16(hu.ravel(order="K"), 4)  # ravel: no copy for C- or F-contiguous arrays
    counts = np.asarray(counts, np.float64)
    values = np.arange(-32768, 32768, dtype=np.float64)
    n = counts.sum()
    nz = np.flatnonzero(counts)
    mean = float(counts @ values / n)
    var = float(counts @ (values - mean) ** 2 / n)
    cdf = np.cumsum(counts)

    def q(p: float) -> float:
        return float(values[np.searchsorted(cdf, np.floor(p * (n - 1)) + 1)])  # numpy method='lower'

    return HUStats(
        min=float(values[nz[0]]),
        max=float(values[nz[-1]]),
        mean=mean,
        std=var**0.5,
        p01=q(0.01),
        p99=q(0.99),
        air_fraction=float(cdf[32768 - 950] / n),
    )
