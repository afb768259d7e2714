"""Fast CPU Joseph projector (numba).

For each ray source -> pixel centre, in voxel index space (inverse affine, so obliquity and flips are handled):
step through the voxel-centre planes n = 0..N_a-1 of the ray's dominant axis a, interpolate bilinearly in the
two other axes, and weight every sample by the ray length per plane (mm). Model (shared by all backends): the
volume fills its voxel box [-1/2, N-1/2]^3, edge values extend over the outer half voxel, zero outside.

Two kernels:
    ``_project_general``  any geometry, any affine (the reference path)
    ``_project_columns``  ring fast path, used when a view's detector v axis is parallel to a voxel axis c
                          ("axial" axis) and rays are dominated by one of the two other axes: all rays of one
                          detector column lie in a plane containing axis c, so per column and per plane the
                          in-plane interpolation is done once for the whole line of voxels along c and every ray
                          of the column then only interpolates along c (linear instead of trilinear per sample).
Both give the same values up to float rounding (tests/test_render.py checks it).

Multi-channel (``project_channels``): C volumes on one grid (a channels-last (X, Y, Z, C) array, e.g. the soft and
bone densities of pipeline/materials.py) projected along the same rays in one traversal: ``_ray_multi``,
``_project_general_multi`` and ``_project_columns_multi`` are the kernels above with every voxel read, interpolation
and accumulation done per channel (same operations in the same order, so each channel equals its single-channel
projection) and the ray set-up, box clip, plane loop and interpolation weights shared by all channels.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numba as nb
import numpy as np
from jaxtyping import Float, Float32

from xwin.pipeline.geometry import ConeBeamViews
from xwin.pipeline.render._rays import index_space as _index_space
from xwin.pipeline.render.project import _check_volume


@nb.njit(cache=True, inline="always")
def _clip_slab(s, d, n, tmin, tmax):
    """Slab clip of the ray parameter interval [tmin, tmax] to [-1/2, n-1/2] along one index axis (start ``s``,
    direction ``d``); an empty result has tmin >= tmax (a ray parallel to the slab and outside it: (1, 0))."""
    if abs(d) < 1e-12:
        if s < -0.5 or s > n - 0.5:
            return 1.0, 0.0
        return tmin, tmax
    t0 = (-0.5 - s) / d
    t1 = (n - 0.5 - s) / d
    if t0 > t1:
        t0, t1 = t1, t0
    return max(tmin, t0), min(tmax, t1)


@nb.njit(cache=True, inline="always")
def _ray(vol, nx, ny, nz, sx, sy, sz, px, py, pz, length):
    """Line integral along source (sx,sy,sz) -> pixel (px,py,pz), index space; ``length`` = world mm."""
    d0 = px - sx
    d1 = py - sy
    d2 = pz - sz
    # clip t in [0, 1] to the voxel box [-0.5, N-0.5]^3 (slab method)
    tmin = 0.0
    tmax = 1.0
    for ax in range(3):
        if ax == 0:
            s, d, n = sx, d0, nx
        elif ax == 1:
            s, d, n = sy, d1, ny
        else:
            s, d, n = sz, d2, nz
        tmin, tmax = _clip_slab(s, d, n, tmin, tmax)
    if tmin >= tmax:
        return 0.0
    a0, a1, a2 = abs(d0), abs(d1), abs(d2)
    # dominant axis a; (b, c) the others. Work with (sa, da, na), (sb, db, nb_), (sc, dc, nc)
    if a0 >= a1 and a0 >= a2:
        sa, da, na, sb, db, nb_, sc, dc, nc = sx, d0, nx, sy, d1, ny, sz, d2, nz
        st_a, st_b, st_c = ny * nz, nz, 1
    elif a1 >= a2:
        sa, da, na, sb, db, nb_, sc, dc, nc = sy, d1, ny, sx, d0, nx, sz, d2, nz
        st_a, st_b, st_c = nz, ny * nz, 1
    else:
        sa, da, na, sb, db, nb_, sc, dc, nc = sz, d2, nz, sx, d0, nx, sy, d1, ny
        st_a, st_b, st_c = 1, ny * nz, nz
    xa0 = sa + tmin * da
    xa1 = sa + tmax * da
    lo = min(xa0, xa1)
    hi = max(xa0, xa1)
    n0 = max(0, int(math.ceil(lo)))
    n1 = min(na - 1, int(math.floor(hi)))
    if n1 < n0:
        return 0.0
    kb = db / da
    kc = dc / da
    acc = 0.0
    bmax = nb_ - 1.0
    cmax = nc - 1.0
    for n in range(n0, n1 + 1):
        pb = sb + (n - sa) * kb
        pc = sc + (n - sa) * kc
        # edge extension over the outer half voxel (rays are inside the box here up to rounding)
        if pb < 0.0:
            pb = 0.0
        elif pb > bmax:
            pb = bmax
        if pc < 0.0:
            pc = 0.0
        elif pc > cmax:
            pc = cmax
        ib = min(int(pb), nb_ - 2)
        ic = min(int(pc), nc - 2)
        fb = pb - ib
        fc = pc - ic
        base = n * st_a + ib * st_b + ic * st_c
        v00 = vol[base]
        v01 = vol[base + st_c]
        v10 = vol[base + st_b]
        v11 = vol[base + st_b + st_c]
        acc += (1.0 - fb) * ((1.0 - fc) * v00 + fc * v01) + fb * ((1.0 - fc) * v10 + fc * v11)
    return acc * length / abs(da)


@nb.njit(cache=True, inline="always")
def _ray_multi(vol, C, nx, ny, nz, sx, sy, sz, px, py, pz, acc):
    """``_ray`` for C channels: ``vol`` channels-last (flat, voxel (i, j, k) channel ch at (i*ny*nz + j*nz + k)*C +
    ch); fills ``acc[:C]`` with the sums over the planes and returns |da| (the line integral of channel ch is
    ``acc[ch] * length / |da|``), or 0.0 for a ray that misses the box (``acc`` zero)."""
    for ch in range(C):
        acc[ch] = 0.0
    d0 = px - sx
    d1 = py - sy
    d2 = pz - sz
    tmin = 0.0
    tmax = 1.0
    for ax in range(3):
        if ax == 0:
            s, d, n = sx, d0, nx
        elif ax == 1:
            s, d, n = sy, d1, ny
        else:
            s, d, n = sz, d2, nz
        tmin, tmax = _clip_slab(s, d, n, tmin, tmax)
    if tmin >= tmax:
        return 0.0
    a0, a1, a2 = abs(d0), abs(d1), abs(d2)
    if a0 >= a1 and a0 >= a2:
        sa, da, na, sb, db, nb_, sc, dc, nc = sx, d0, nx, sy, d1, ny, sz, d2, nz
        st_a, st_b, st_c = ny * nz, nz, 1
    elif a1 >= a2:
        sa, da, na, sb, db, nb_, sc, dc, nc = sy, d1, ny, sx, d0, nx, sz, d2, nz
        st_a, st_b, st_c = nz, ny * nz, 1
    else:
        sa, da, na, sb, db, nb_, sc, dc, nc = sz, d2, nz, sx, d0, nx, sy, d1, ny
        st_a, st_b, st_c = 1, ny * nz, nz
    xa0 = sa + tmin * da
    xa1 = sa + tmax * da
    lo = min(xa0, xa1)
    hi = max(xa0, xa1)
    n0 = max(0, int(math.ceil(lo)))
    n1 = min(na - 1, int(math.floor(hi)))
    if n1 < n0:
        return 0.0
    kb = db / da
    kc = dc / da
    bmax = nb_ - 1.0
    cmax = nc - 1.0
    sb_c = st_b * C
    sc_c = st_c * C
    for n in range(n0, n1 + 1):
        pb = sb + (n - sa) * kb
        pc = sc + (n - sa) * kc
        if pb < 0.0:
            pb = 0.0
        elif pb > bmax:
            pb = bmax
        if pc < 0.0:
            pc = 0.0
        elif pc > cmax:
            pc = cmax
        ib = min(int(pb), nb_ - 2)
        ic = min(int(pc), nc - 2)
        fb = pb - ib
        fc = pc - ic
        gb = 1.0 - fb
        gc = 1.0 - fc
        base = (n * st_a + ib * st_b + ic * st_c) * C
        if C == 2:  # two channels (the material bases): unrolled, same arithmetic as the loop below
            i, j = base, base + 1
            s0 = gb * (gc * vol[i] + fc * vol[i + sc_c]) + fb * (gc * vol[i + sb_c] + fc * vol[i + sb_c + sc_c])
            s1 = gb * (gc * vol[j] + fc * vol[j + sc_c]) + fb * (gc * vol[j + sb_c] + fc * vol[j + sb_c + sc_c])
            acc[0] += s0
            acc[1] += s1
        else:
            for ch in range(C):
                i = base + ch
                acc[ch] += gb * (gc * vol[i] + fc * vol[i + sc_c]) + fb * (
                    gc * vol[i + sb_c] + fc * vol[i + sb_c + sc_c]
                )
    return abs(da)


@nb.njit(parallel=True, cache=True)
def _project_general(vol, nx, ny, nz, P, H, W, out):
    V = P.shape[0]
    ch = (H - 1) / 2.0
    cw = (W - 1) / 2.0
    # parallel over (view, row); rows run along the axial direction in ring views, columns inside
    for job in nb.prange(V * H):
        k = job // H
        r = job % H
        dr = r - ch
        for c in range(W):
            dc = c - cw
            px = P[k, 3] + dr * P[k, 9] + dc * P[k, 6]
            py = P[k, 4] + dr * P[k, 10] + dc * P[k, 7]
            pz = P[k, 5] + dr * P[k, 11] + dc * P[k, 8]
            wx = P[k, 15] + dr * P[k, 21] + dc * P[k, 18] - P[k, 12]
            wy = P[k, 16] + dr * P[k, 22] + dc * P[k, 19] - P[k, 13]
            wz = P[k, 17] + dr * P[k, 23] + dc * P[k, 20] - P[k, 14]
            length = math.sqrt(wx * wx + wy * wy + wz * wz)
            out[k, r, c] = _ray(vol, nx, ny, nz, P[k, 0], P[k, 1], P[k, 2], px, py, pz, length)


@nb.njit(parallel=True, cache=True)
def _project_columns(vol, nx, ny, nz, P, H, W, out):
    """Ring fast path. Preconditions (checked by the caller): the last voxel axis (z, contiguous) is the axial
    axis: u_i[2] == 0 and v_i[0] == v_i[1] == 0 for every view, and the source is outside the box in-plane."""
    V = P.shape[0]
    ch = (H - 1) / 2.0
    cw = (W - 1) / 2.0
    zmax = nz - 1.0
    for job in nb.prange(V * W):
        k = job // W
        c = job % W
        dc = c - cw
        sx, sy, sz = P[k, 0], P[k, 1], P[k, 2]
        # column line: q(r) = (qx, qy, qz0 + dr * vz)
        qx = P[k, 3] + dc * P[k, 6]
        qy = P[k, 4] + dc * P[k, 7]
        qz0 = P[k, 5] + dc * P[k, 8]
        vz = P[k, 11]
        ex = qx - sx
        ey = qy - sy
        # in-plane clip of t to the box in x and y (shared by every ray of the column)
        tmin = 0.0
        tmax = 1.0
        for ax in range(2):
            if ax == 0:
                s, d, n = sx, ex, nx
            else:
                s, d, n = sy, ey, ny
            tmin, tmax = _clip_slab(s, d, n, tmin, tmax)
        if tmin >= tmax:
            for r in range(H):
                out[k, r, c] = 0.0
            continue
        # world direction pieces for the per-ray lengths
        wx0 = P[k, 15] + dc * P[k, 18] - P[k, 12]
        wy0 = P[k, 16] + dc * P[k, 19] - P[k, 13]
        wz0 = P[k, 17] + dc * P[k, 20] - P[k, 14]
        if abs(ex) >= abs(ey):
            sa, da, na, sb, db, nb_ = sx, ex, nx, sy, ey, ny
            st_a, st_b = ny * nz, nz
        else:
            sa, da, na, sb, db, nb_ = sy, ey, ny, sx, ex, nx
            st_a, st_b = nz, ny * nz
        xa0 = sa + tmin * da
        xa1 = sa + tmax * da
        n0 = max(0, int(math.ceil(min(xa0, xa1))))
        n1 = min(na - 1, int(math.floor(max(xa0, xa1))))
        acc = np.zeros(H, dtype=np.float64)
        line = np.empty(nz, dtype=np.float64)
        if n1 >= n0:
            kb = db / da
            bmax = nb_ - 1.0
            for n in range(n0, n1 + 1):
                t = (n - sa) / da
                pb = sb + (n - sa) * kb
                if pb < 0.0:
                    pb = 0.0
                elif pb > bmax:
                    pb = bmax
                ib = min(int(pb), nb_ - 2)
                fb = pb - ib
                base = n * st_a + ib * st_b
                for z in range(nz):
                    line[z] = (1.0 - fb) * vol[base + z] + fb * vol[base + st_b + z]
                # every ray of the column: z(r) = z0 + r * zk, rows restricted to the box analytically
                z0 = sz + t * (qz0 - ch * vz - sz)
                zk = t * vz
                r0 = 0
                r1 = H - 1
                if zk > 1e-12:
                    r0 = max(r0, int(math.ceil((-0.5 - z0) / zk)))
                    r1 = min(r1, int(math.floor((nz - 0.5 - z0) / zk)))
                elif zk < -1e-12:
                    r0 = max(r0, int(math.ceil((nz - 0.5 - z0) / zk)))
                    r1 = min(r1, int(math.floor((-0.5 - z0) / zk)))
                elif z0 < -0.5 or z0 > nz - 0.5:
                    r1 = -1
                for r in range(r0, r1 + 1):
                    pz = min(max(z0 + r * zk, 0.0), zmax)
                    iz = min(int(pz), nz - 2)
                    fz = pz - iz
                    lo_ = line[iz]
                    acc[r] += lo_ + fz * (line[iz + 1] - lo_)
        inv_da = 1.0 / abs(da)
        for r in range(H):
            dr = r - ch
            wz = wz0 + dr * P[k, 23]
            wx = wx0 + dr * P[k, 21]
            wy = wy0 + dr * P[k, 22]
            out[k, r, c] = acc[r] * math.sqrt(wx * wx + wy * wy + wz * wz) * inv_da


@nb.njit(parallel=True, cache=True)
def _project_general_multi(vol, C, nx, ny, nz, P, H, W, out):
    """``_project_general`` for a channels-last volume of C channels; ``out`` (C, V, H, W)."""
    V = P.shape[0]
    ch = (H - 1) / 2.0
    cw = (W - 1) / 2.0
    for job in nb.prange(V * H):
        k = job // H
        r = job % H
        dr = r - ch
        acc = np.empty(C, dtype=np.float64)
        for c in range(W):
            dc = c - cw
            px = P[k, 3] + dr * P[k, 9] + dc * P[k, 6]
            py = P[k, 4] + dr * P[k, 10] + dc * P[k, 7]
            pz = P[k, 5] + dr * P[k, 11] + dc * P[k, 8]
            wx = P[k, 15] + dr * P[k, 21] + dc * P[k, 18] - P[k, 12]
            wy = P[k, 16] + dr * P[k, 22] + dc * P[k, 19] - P[k, 13]
            wz = P[k, 17] + dr * P[k, 23] + dc * P[k, 20] - P[k, 14]
            length = math.sqrt(wx * wx + wy * wy + wz * wz)
            ada = _ray_multi(vol, C, nx, ny, nz, P[k, 0], P[k, 1], P[k, 2], px, py, pz, acc)
            for m in range(C):
                out[m, k, r, c] = acc[m] * length / ada if ada > 0.0 else 0.0


@nb.njit(parallel=True, cache=True)
def _project_columns_multi(vol, C, nx, ny, nz, P, H, W, out):
    """``_project_columns`` for a channels-last volume of C channels; ``out`` (C, V, H, W). The in-plane
    interpolation of a column's voxel line is one contiguous loop over its nz * C values."""
    V = P.shape[0]
    ch = (H - 1) / 2.0
    cw = (W - 1) / 2.0
    zmax = nz - 1.0
    for job in nb.prange(V * W):
        k = job // W
        c = job % W
        dc = c - cw
        sx, sy, sz = P[k, 0], P[k, 1], P[k, 2]
        qx = P[k, 3] + dc * P[k, 6]
        qy = P[k, 4] + dc * P[k, 7]
        qz0 = P[k, 5] + dc * P[k, 8]
        vz = P[k, 11]
        ex = qx - sx
        ey = qy - sy
        tmin = 0.0
        tmax = 1.0
        for ax in range(2):
            if ax == 0:
                s, d, n = sx, ex, nx
            else:
                s, d, n = sy, ey, ny
            tmin, tmax = _clip_slab(s, d, n, tmin, tmax)
        if tmin >= tmax:
            for m in range(C):
                for r in range(H):
                    out[m, k, r, c] = 0.0
            continue
        wx0 = P[k, 15] + dc * P[k, 18] - P[k, 12]
        wy0 = P[k, 16] + dc * P[k, 19] - P[k, 13]
        wz0 = P[k, 17] + dc * P[k, 20] - P[k, 14]
        if abs(ex) >= abs(ey):
            sa, da, na, sb, db, nb_ = sx, ex, nx, sy, ey, ny
            st_a, st_b = ny * nz, nz
        else:
            sa, da, na, sb, db, nb_ = sy, ey, ny, sx, ex, nx
            st_a, st_b = nz, ny * nz
        xa0 = sa + tmin * da
        xa1 = sa + tmax * da
        n0 = max(0, int(math.ceil(min(xa0, xa1))))
        n1 = min(na - 1, int(math.floor(max(xa0, xa1))))
        acc = np.zeros(H * C, dtype=np.float64)  # acc[r * C + m]
        line = np.empty(nz * C, dtype=np.float64)  # line[z * C + m]
        nzc = nz * C
        if n1 >= n0:
            kb = db / da
            bmax = nb_ - 1.0
            for n in range(n0, n1 + 1):
                t = (n - sa) / da
                pb = sb + (n - sa) * kb
                if pb < 0.0:
                    pb = 0.0
                elif pb > bmax:
                    pb = bmax
                ib = min(int(pb), nb_ - 2)
                fb = pb - ib
                base = (n * st_a + ib * st_b) * C
                base1 = base + st_b * C
                for i in range(nzc):
                    line[i] = (1.0 - fb) * vol[base + i] + fb * vol[base1 + i]
                z0 = sz + t * (qz0 - ch * vz - sz)
                zk = t * vz
                r0 = 0
                r1 = H - 1
                if zk > 1e-12:
                    r0 = max(r0, int(math.ceil((-0.5 - z0) / zk)))
                    r1 = min(r1, int(math.floor((nz - 0.5 - z0) / zk)))
                elif zk < -1e-12:
                    r0 = max(r0, int(math.ceil((nz - 0.5 - z0) / zk)))
                    r1 = min(r1, int(math.floor((-0.5 - z0) / zk)))
                elif z0 < -0.5 or z0 > nz - 0.5:
                    r1 = -1
                for r in range(r0, r1 + 1):
                    pz = min(max(z0 + r * zk, 0.0), zmax)
                    iz = min(int(pz), nz - 2)
                    fz = pz - iz
                    j = iz * C
                    a = r * C
                    if C == 2:  # unrolled, as in _ray_multi
                        l0 = line[j]
                        l1 = line[j + 1]
                        acc[a] += l0 + fz * (line[j + 2] - l0)
                        acc[a + 1] += l1 + fz * (line[j + 3] - l1)
                    else:
                        for m in range(C):
                            lo_ = line[j + m]
                            acc[a + m] += lo_ + fz * (line[j + C + m] - lo_)
        inv_da = 1.0 / abs(da)
        for r in range(H):
            dr = r - ch
            wz = wz0 + dr * P[k, 23]
            wx = wx0 + dr * P[k, 21]
            wy = wy0 + dr * P[k, 22]
            length = math.sqrt(wx * wx + wy * wy + wz * wz)
            for m in range(C):
                out[m, k, r, c] = acc[r * C + m] * length * inv_da


# One kernel at a time per process: each call already uses every numba thread, and numba's "workqueue" threading
# layer (the fallback where neither OpenMP nor TBB loads) must not be entered from two Python threads at once
# (thread-pool task runners call us concurrently).
_KERNEL_LOCK = threading.Lock()


def _ring_fast_ok(P: np.ndarray, shape: tuple[int, int, int]) -> bool:
    """True when every view has v along voxel axis z, u in the x-y plane and the source outside the box in x-y."""
    u_i, v_i, s_i = P[:, 6:9], P[:, 9:12], P[:, 0:3]
    tol = 1e-9 * (np.abs(v_i).max() + np.abs(u_i).max())
    if np.any(np.abs(v_i[:, :2]) > tol) or np.any(np.abs(u_i[:, 2]) > tol):
        return False
    nx, ny, _ = shape
    inside = (s_i[:, 0] > -0.5) & (s_i[:, 0] < nx - 0.5) & (s_i[:, 1] > -0.5) & (s_i[:, 1] < ny - 0.5)
    return not bool(np.any(inside))


def _method(method: str, P: np.ndarray, shape: tuple[int, int, int]) -> str:
    """The kernel ``method`` ("auto", "general", "columns") means for views ``P`` on a volume of ``shape``."""
    if method == "auto":
        return "columns" if _ring_fast_ok(P, shape) else "general"
    if method == "columns" and not _ring_fast_ok(P, shape):
        raise ValueError("method='columns' needs ring views whose v axis is parallel to voxel axis z")
    if method not in ("general", "columns"):
        raise ValueError(f"unknown joseph method {method!r}")
    return method


def project(
    mu: Float[np.ndarray, "X Y Z"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    *,
    method: str = "auto",
    batch_views: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> Float32[np.ndarray, "V H W"]:
    """(X,Y,Z) float32 mu [1/mm] -> (V,H,W) float32 line integrals [mu*mm].

    method: "auto" (ring fast path where its preconditions hold, else general), "general", "columns".
    Views are processed ``batch_views`` at a time (memory: the output plus one float64 column per thread);
    ``on_progress(done, V)`` is called after each batch.
    """
    vol = np.ascontiguousarray(mu, dtype=np.float32)
    nx, ny, nz = vol.shape
    flat = vol.reshape(-1)
    P = _index_space(views, affine)
    V, H, W = len(views), views.height, views.width
    kern = _project_columns if _method(method, P, vol.shape) == "columns" else _project_general
    out = np.empty((V, H, W), dtype=np.float32)
    for b0 in range(0, V, max(1, batch_views)):
        b1 = min(V, b0 + max(1, batch_views))
        part = np.empty((b1 - b0, H, W), dtype=np.float32)
        with _KERNEL_LOCK:
            kern(flat, nx, ny, nz, np.ascontiguousarray(P[b0:b1]), H, W, part)
        out[b0:b1] = part
        if on_progress is not None:
            on_progress(b1, V)
    return out


def project_channels(
    vols: Float[np.ndarray, "X Y Z C"],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    *,
    method: str = "auto",
    batch_views: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> Float32[np.ndarray, "C V H W"]:
    """:func:`project` of C volumes on one grid at once: (X,Y,Z,C) channels-last float32 [1/mm] -> (C,V,H,W)
    float32 line integrals, one traversal of each ray for all channels. Channel ``m`` equals ``project(vols[...,
    m], ...)`` (same sampling, same float64 accumulation, same operations in the same order). Options as
    :func:`project`; memory: the output plus, per thread, one float64 column of C channels."""
    vol = np.ascontiguousarray(vols, dtype=np.float32)
    if vol.ndim != 4 or vol.shape[3] < 1:
        raise ValueError(f"project_channels needs an (X, Y, Z, C) volume, got shape {vol.shape}")
    _check_volume(vol[..., 0], affine)  # at least 2 voxels along each axis (the kernels' cells), a usable affine
    nx, ny, nz, C = vol.shape
    flat = vol.reshape(-1)
    P = _index_space(views, affine)
    V, H, W = len(views), views.height, views.width
    kern = _project_columns_multi if _method(method, P, (nx, ny, nz)) == "columns" else _project_general_multi
    out = np.empty((C, V, H, W), dtype=np.float32)
    for b0 in range(0, V, max(1, batch_views)):
        b1 = min(V, b0 + max(1, batch_views))
        part = np.empty((C, b1 - b0, H, W), dtype=np.float32)
        with _KERNEL_LOCK:
            kern(flat, C, nx, ny, nz, np.ascontiguousarray(P[b0:b1]), H, W, part)
        out[:, b0:b1] = part
        if on_progress is not None:
            on_progress(b1, V)
    return out
