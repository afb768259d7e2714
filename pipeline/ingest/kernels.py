"""Numba kernels of the DICOM fast path: one pass from stored values to canonical int16 HU (+ histogram)."""

from __future__ import annotations

import threading

import numba as nb
import numpy as np

# numba's "workqueue" threading layer (used where neither OpenMP nor TBB is available) must not run parallel
# kernels from several threads at once; ingest may run in thread pools (Prefect, dask), so calls are serialised.
KERNEL_LOCK = threading.Lock()


@nb.njit(parallel=True, cache=True, nogil=True)
def assemble_hu(
    flat,
    starts,
    R,
    C,
    slopes,
    inters,
    pad_lo,
    pad_hi,
    thr,
    air,
    out_t,
    swap,
    flip0,
    flip1,
    zflip,
    lo_out,
    hi_out,
    bad_out,
    hist,
):
    """Stored values -> HU int16 written to ``out_t`` (Z', Y', X') = the canonical (X', Y', Z') volume
    transposed (so a Fortran-ordered volume is written contiguously), with a histogram of the output.

    Slice k's stored values are ``flat[starts[k] : starts[k] + R*C]`` in (row, col) order (a view of the files'
    bytes, or of a stacked array). Per slice: stored in [pad_lo[k], pad_hi[k]] is padding (pad_lo > pad_hi:
    none); else HU = rint(stored * slopes[k] + inters[k]), and HU <= thr is padding too. Padding becomes ``air``.
    Voxel (row i, col j) goes to x' = i if swap else j, y' = j if swap else i, each flipped if flip0/flip1,
    z' = Z-1-k if zflip else k. lo_out/hi_out: min/max of non-padding HU per slice (+inf/-inf if none);
    bad_out: 1 where a value did not fit int16 (clipped). hist (n_chunks, 65536): counts of output values
    (index v + 32768), one row per parallel chunk of slices (sum over rows).
    """
    Z = starts.shape[0]
    Xo = out_t.shape[2]
    Yo = out_t.shape[1]
    nch = hist.shape[0]
    per = (Z + nch - 1) // nch
    for ch in nb.prange(nch):
        for k in range(ch * per, min(Z, (ch + 1) * per)):
            zo = np.int64(k)
            if zflip:
                zo = np.int64(Z - 1) - zo
            s = slopes[k]
            b = inters[k]
            plo = pad_lo[k]
            phi = pad_hi[k]
            base = starts[k]
            lo = np.inf
            hi = -np.inf
            bad = 0
            for i in range(R):
                for j in range(C):
                    v = flat[base + i * C + j]
                    if v >= plo and v <= phi:
                        h = air
                    else:
                        h = np.rint(v * s + b)
                        if h <= thr:
                            h = air
                        else:
                            if h < lo:
                                lo = h
                            if h > hi:
                                hi = h
                            if h < -32768.0:
                                h = -32768.0
                                bad = 1
                            elif h > 32767.0:
                                h = 32767.0
                                bad = 1
                    if swap:
                        xo = i
                        yo = j
                    else:
                        xo = j
                        yo = i
                    if flip0:
                        xo = Xo - 1 - xo
                    if flip1:
                        yo = Yo - 1 - yo
                    hv = np.int16(h)
                    out_t[zo, yo, xo] = hv
                    hist[ch, np.int64(hv) + 32768] += 1
            lo_out[k] = lo
            hi_out[k] = hi
            bad_out[k] = bad


@nb.njit(parallel=True, cache=True, nogil=True)
def histogram_int16(flat, nchunks):
    """Counts of each int16 value (index v + 32768) of a 1D array, computed in ``nchunks`` parallel chunks."""
    n = flat.shape[0]
    parts = np.zeros((nchunks, 65536), np.int64)
    step = (n + nchunks - 1) // nchunks
    for c in nb.prange(nchunks):
        a = c * step
        e = min(n, a + step)
        for t in range(a, e):
            parts[c, np.int64(flat[t]) + 32768] += 1
    return parts.sum(axis=0)


@nb.njit(parallel=True, cache=True, nogil=True)
def block_max_and_count(hu, k, at_least):  # pragma: no cover - compiled
    """Per k x k in-plane block and slice: the maximum HU, and the count of voxels >= ``at_least`` (quality checks:
    one pass over the volume instead of a threshold, a reshape copy and a count). hu: (X, Y, Z) int16, any order."""
    X, Y, Z = hu.shape
    bx, by = (X + k - 1) // k, (Y + k - 1) // k
    out = np.full((bx, by, Z), -32768, np.int16)
    counts = np.zeros(Z, np.int64)
    for z in nb.prange(Z):
        c = 0
        for y in range(Y):
            yb = y // k
            for x in range(X):
                v = hu[x, y, z]
                xb = x // k
                if v > out[xb, yb, z]:
                    out[xb, yb, z] = v
                if v >= at_least:
                    c += 1
        counts[z] = c
    return out, counts.sum()
