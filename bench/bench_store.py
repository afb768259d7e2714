"""Store benchmark on the bundled CT's ring (120 x 512 x 512), all ratios against raw .npy measured in the same run.

    .venv/bin/python bench/bench_store.py [--views 120] [--size 512] [--workdir /tmp/xwin_bench_store]

Reports: float16 error vs float32; per codec (zstd, blosc-zstd+shuffle, blosc-lz4+shuffle): compression ratio,
write throughput of the full commit (write + read-back verify + commit record + catalog) and of the shard write
alone vs writing the same bytes as raw .npy files (one per view); latency of reading 9 random views (1 context +
8 targets) vs np.load of the same 9 .npy files. Goals: write >= 0.8x raw, 9-view read <= 1.5x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np


def load_ring(n_views: int, size: int, workdir: Path) -> tuple[np.ndarray, object, object, str]:
    """Render the bundled CT's ring with the joseph projector (cached in workdir)."""
    import nibabel as nib

    from pipeline.example import example_ct_path
    from pipeline.geometry import ring_for_volume
    from schemas.render import RenderSpec

    spec = RenderSpec(n_views=n_views, height=size, width=size, yaw_step_deg=360.0 / n_views)
    img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
    hu = np.asarray(img.dataobj).astype(np.int16)
    hu[hu < -1000] = -1000
    geom = ring_for_volume(spec, img.affine, hu.shape)
    cache = workdir / f"ring_{n_views}_{size}.npy"
    if cache.exists():
        return np.load(cache), spec, geom, "joseph (cached)"
    from pipeline.render import render_views

    t = time.perf_counter()
    views = render_views(hu, img.affine, geom, spec.mu_water_per_mm, backend="joseph")
    print(f"rendered {n_views} views {size}^2 with joseph in {time.perf_counter() - t:.1f} s")
    np.save(cache, views)
    return views, spec, geom, "joseph"


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def drop_cache_hint() -> None:
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/xwin_bench_store")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import storage.store as st
    from storage import open_store
    from zarr.codecs import BloscCodec, ZstdCodec

    views, spec, geom, how = load_ring(args.views, args.size, work)
    V, H, W = views.shape
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "ring": [V, H, W], "renderer": how}
    out["range"] = [float(views.min()), float(views.max())]

    # ---- float16 vs float32 --------------------------------------------------------------------------------------
    f16 = views.astype(np.float16).astype(np.float32)
    err = np.abs(f16 - views)
    nz = views > 0.05
    out["float16"] = {
        "max_abs_err": float(err.max()),
        "max_rel_err_where_>0.05": float((err[nz] / views[nz]).max()),
        "rel_l2": float(np.linalg.norm(f16 - views) / np.linalg.norm(views)),
        "max_abs_err_after_minmax_uint8_levels": float(err.max() / (views.max() - views.min()) * 255),
    }

    # ---- raw baseline ---------------------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    picks = [rng.choice(V, 9, replace=False) for _ in range(args.reps)]

    def raw_write(dt):
        d = work / f"raw_{dt}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t = time.perf_counter()
        vv = views.astype(dt)
        for k in range(V):
            np.save(d / f"{k:03d}.npy", vv[k])
        os.sync()
        return time.perf_counter() - t, d

    codecs = {
        "zstd3": lambda dt: ZstdCodec(level=3),
        "blosc-zstd3-shuffle": lambda dt: BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=np.dtype(dt).itemsize),
        "blosc-lz4-shuffle": lambda dt: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dt).itemsize),
    }
    results = []
    for dt in ("float32", "float16"):
        t_raw, rawdir = raw_write(dt)
        t_raw = min(t_raw, raw_write(dt)[0])
        raw_bytes = views.astype(dt).nbytes

        def raw_read(ix, rawdir=rawdir):
            return np.stack([np.load(rawdir / f"{k:03d}.npy") for k in ix])

        raw_read(picks[0])
        i = iter(range(10**9))
        t_raw_read = median_time(lambda: raw_read(picks[next(i) % len(picks)]), args.reps)
        for name, make in codecs.items():
            st.views_compressors = make  # the store's codec hook
            root = work / f"store_{dt}_{name}"
            shutil.rmtree(root, ignore_errors=True)
            s = open_store(root)
            sp = spec.model_copy(update={"store_dtype": dt})
            ds = s.dataset("bench", sp)
            t = time.perf_counter()
            ds.write_ring("ct", views, geom, {"bench": True})
            os.sync()
            t_commit = time.perf_counter() - t
            # shard write alone (what raw .npy writing is compared to)
            g = st.zarr.open_group(str(root), path=f"{ds.path}/rings/ct", mode="a")
            px = views.astype(dt)
            t = time.perf_counter()
            st._write_whole(g, "views_again", px, (1, H, W), make(dt))
            os.sync()
            t_shard = time.perf_counter() - t
            shard = root / ds.path / "rings/ct/views/c/0/0/0"
            ratio = raw_bytes / shard.stat().st_size
            ds2 = open_store(root).dataset("bench", sp)
            ds2.read_views("ct", [0])  # open the handle (warm)
            j = iter(range(10**9))
            t_read = median_time(lambda: ds2.read_views("ct", picks[next(j) % len(picks)]), args.reps)
            ds3 = open_store(root).dataset("bench", sp)
            t = time.perf_counter()
            ds3.read_views("ct", picks[0])
            t_cold = time.perf_counter() - t
            r = {
                "dtype": dt,
                "codec": name,
                "ratio": round(ratio, 3),
                "raw_write_MBps": round(raw_bytes / t_raw / 1e6, 1),
                "shard_write_MBps": round(raw_bytes / t_shard / 1e6, 1),
                "shard_write_vs_raw": round(t_raw / t_shard, 2),
                "commit_write_vs_raw": round(t_raw / t_commit, 2),
                "read9_ms": round(t_read * 1e3, 2),
                "raw_read9_ms": round(t_raw_read * 1e3, 2),
                "read9_vs_raw": round(t_read / t_raw_read, 2),
                "read9_cold_ms": round(t_cold * 1e3, 1),
            }
            print(json.dumps(r))
            results.append(r)
    out["codecs"] = results
    print(json.dumps(out, indent=1))
    (work / "bench_store.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
