"""The Triton kernel of the ``triton`` render backend (host code, docs and the model: ``triton_joseph.py``).

Kept apart from the host code so that nothing wraps it: ``triton.jit`` reads this function's source. Imported only
where triton is installed.
"""

from __future__ import annotations

import triton.language as tl
from triton.runtime import JITFunction


def _max(a, b):
    return tl.maximum(a, b)


# Only core builtins in the kernel (tl.full, tl.reduce, ...), no functions of Triton's standard library (tl.zeros,
# tl.max): those were wrapped for the mode in force when triton was first imported, and the interpreter cannot call
# a compiled one (nor the compiler an interpreted one). The reduction's combine function is built as a compiled
# function whatever the mode (the interpreter calls its Python body directly).
max_combine = JITFunction(_max)


# One program: a tile of TILE_R rows x BLOCK//TILE_R columns of one view (program id = view * tiles_per_view + tile).
# vol_ptr: (nx, ny, nz) C-ordered volume (float32/16/bf16); P_ptr: (V, 24) float64 ray table (_rays.index_space);
# out_ptr: (V, H, W) float32.
def joseph_kernel(
    vol_ptr,
    P_ptr,
    out_ptr,
    H,
    W,
    nx,
    ny,
    nz,
    n_tiles_c,
    tiles_per_view,
    BLOCK: tl.constexpr,
    TILE_R: tl.constexpr,
):
    pid = tl.program_id(0)
    view = pid // tiles_per_view
    tile = pid % tiles_per_view
    lane = tl.arange(0, BLOCK)
    r = (tile // n_tiles_c) * TILE_R + lane % TILE_R
    c = (tile % n_tiles_c) * (BLOCK // TILE_R) + lane // TILE_R
    valid = (r < H) & (c < W)

    # ---- ray set-up in float64 (as joseph.py): index-space source and pixel, world length ----------------------
    p = P_ptr + view.to(tl.int64) * 24
    sx = tl.load(p + 0)
    sy = tl.load(p + 1)
    sz = tl.load(p + 2)
    dr = r.to(tl.float64) - (H - 1).to(tl.float64) * 0.5
    dc = c.to(tl.float64) - (W - 1).to(tl.float64) * 0.5
    d0 = tl.load(p + 3) + dr * tl.load(p + 9) + dc * tl.load(p + 6) - sx
    d1 = tl.load(p + 4) + dr * tl.load(p + 10) + dc * tl.load(p + 7) - sy
    d2 = tl.load(p + 5) + dr * tl.load(p + 11) + dc * tl.load(p + 8) - sz
    wx = tl.load(p + 15) + dr * tl.load(p + 21) + dc * tl.load(p + 18) - tl.load(p + 12)
    wy = tl.load(p + 16) + dr * tl.load(p + 22) + dc * tl.load(p + 19) - tl.load(p + 13)
    wz = tl.load(p + 17) + dr * tl.load(p + 23) + dc * tl.load(p + 20) - tl.load(p + 14)
    length = tl.sqrt(wx * wx + wy * wy + wz * wz)
    fx = nx.to(tl.float64)
    fy = ny.to(tl.float64)
    fz = nz.to(tl.float64)

    # ---- slab clip of t in [0, 1] to the voxel box [-1/2, N-1/2]^3 (joseph._clip_slab, axis by axis) ----------
    tmin = tl.full([BLOCK], 0.0, tl.float64)
    tmax = tl.full([BLOCK], 1.0, tl.float64)
    # axis x
    small = tl.abs(d0) < 1e-12
    dd = tl.where(small, 1.0, d0)
    t0 = (-0.5 - sx) / dd
    t1 = (fx - 0.5 - sx) / dd
    out_slab = (sx < -0.5) | (sx > fx - 0.5)
    tmin = tl.where(small, tl.where(out_slab, 1.0, tmin), tl.maximum(tmin, tl.minimum(t0, t1)))
    tmax = tl.where(small, tl.where(out_slab, 0.0, tmax), tl.minimum(tmax, tl.maximum(t0, t1)))
    # axis y
    small = tl.abs(d1) < 1e-12
    dd = tl.where(small, 1.0, d1)
    t0 = (-0.5 - sy) / dd
    t1 = (fy - 0.5 - sy) / dd
    out_slab = (sy < -0.5) | (sy > fy - 0.5)
    tmin = tl.where(small, tl.where(out_slab, 1.0, tmin), tl.maximum(tmin, tl.minimum(t0, t1)))
    tmax = tl.where(small, tl.where(out_slab, 0.0, tmax), tl.minimum(tmax, tl.maximum(t0, t1)))
    # axis z
    small = tl.abs(d2) < 1e-12
    dd = tl.where(small, 1.0, d2)
    t0 = (-0.5 - sz) / dd
    t1 = (fz - 0.5 - sz) / dd
    out_slab = (sz < -0.5) | (sz > fz - 0.5)
    tmin = tl.where(small, tl.where(out_slab, 1.0, tmin), tl.maximum(tmin, tl.minimum(t0, t1)))
    tmax = tl.where(small, tl.where(out_slab, 0.0, tmax), tl.minimum(tmax, tl.maximum(t0, t1)))

    # ---- dominant axis a and the two others (b, c), with their strides in the C-ordered (x, y, z) volume --------
    a0 = tl.abs(d0)
    a1 = tl.abs(d1)
    a2 = tl.abs(d2)
    is0 = (a0 >= a1) & (a0 >= a2)
    is1 = (a1 >= a2) & ~is0
    is01 = is0 | is1
    sa = tl.where(is0, sx, tl.where(is1, sy, sz))
    da = tl.where(is0, d0, tl.where(is1, d1, d2))
    na = tl.where(is0, nx, tl.where(is1, ny, nz))
    sb = tl.where(is0, sy, sx)
    db = tl.where(is0, d1, d0)
    nb = tl.where(is0, ny, nx)
    sc = tl.where(is01, sz, sy)
    dcc = tl.where(is01, d2, d1)
    nc = tl.where(is01, nz, ny)
    st_a = tl.where(is0, ny * nz, tl.where(is1, nz, 1))
    st_b = tl.where(is0, nz, ny * nz)
    st_c = tl.where(is01, 1, nz)

    # planes n0..n1 of axis a inside the clipped segment
    xa0 = sa + tmin * da
    xa1 = sa + tmax * da
    ok = valid & (tmin < tmax)
    lo = tl.where(ok, tl.minimum(xa0, xa1), 0.0)
    hi = tl.where(ok, tl.maximum(xa0, xa1), -1.0)
    n0 = tl.maximum(tl.ceil(tl.maximum(lo, -1.0)), 0.0).to(tl.int32)
    n1 = tl.minimum(tl.floor(tl.minimum(hi, na.to(tl.float64))), (na - 1).to(tl.float64)).to(tl.int32)
    cnt = tl.where(ok & (n1 >= n0), n1 - n0 + 1, 0)
    kb = db / da
    kc = dcc / da
    # in-plane positions at the first plane in float64, then float32 steps (k * slope, k < N_a)
    pb0 = (sb + (n0.to(tl.float64) - sa) * kb).to(tl.float32)
    pc0 = (sc + (n0.to(tl.float64) - sa) * kc).to(tl.float32)
    kb32 = kb.to(tl.float32)
    kc32 = kc.to(tl.float32)
    bmax = (nb - 1).to(tl.float32)
    cmax = (nc - 1).to(tl.float32)

    acc = tl.full([BLOCK], 0.0, tl.float32)
    kmax = tl.reduce(cnt, 0, max_combine)
    for k in range(kmax):
        m = k < cnt
        kf = k * 1.0
        pb = tl.minimum(tl.maximum(pb0 + kf * kb32, 0.0), bmax)
        pc = tl.minimum(tl.maximum(pc0 + kf * kc32, 0.0), cmax)
        ib = tl.minimum(pb.to(tl.int32), nb - 2)
        ic = tl.minimum(pc.to(tl.int32), nc - 2)
        fb = pb - ib.to(tl.float32)
        fc = pc - ic.to(tl.float32)
        base = (n0 + k) * st_a + ib * st_b + ic * st_c
        v00 = tl.load(vol_ptr + base, mask=m, other=0.0).to(tl.float32)
        v01 = tl.load(vol_ptr + base + st_c, mask=m, other=0.0).to(tl.float32)
        v10 = tl.load(vol_ptr + base + st_b, mask=m, other=0.0).to(tl.float32)
        v11 = tl.load(vol_ptr + base + st_b + st_c, mask=m, other=0.0).to(tl.float32)
        val = (1.0 - fb) * ((1.0 - fc) * v00 + fc * v01) + fb * ((1.0 - fc) * v10 + fc * v11)
        acc += tl.where(m, val, 0.0)

    res = acc * (length / tl.abs(da)).to(tl.float32)
    o = out_ptr + view.to(tl.int64) * H * W + r * W + c
    tl.store(o, tl.where(cnt > 0, res, 0.0), mask=valid)
