"""Store benchmark on the bundled CT's ring (120 x 512 x 512), all ratios against raw .npy measured in the same run.

    .venv/bin/python bench/bench_store.py [--views 120] [--size 512] [--workdir /tmp/xwin_bench_store]

Reports: float16 error vs float32; per stored dtype and codec (zstd, blosc-zstd+shuffle, blosc-lz4+shuffle):
compression ratio; write throughput of the full commit (``write_ring``: claim, encode, write, read-back verify,
commit record, catalog; fsync'd) and of zarr-python's own shard write, each vs writing the same views as raw .npy
files (one per view, in the stored dtype, then os.sync), medians of interleaved repetitions; latency of reading 9
random views (1 context + 8 targets) in the stored dtype vs np.load of the same 9 .npy files (and both converted to
float32). Goals: write >= 0.8x raw, 9-view read <= 1.5x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import UTC
from functools import partial
from pathlib import Path

import numpy as np


def load_ring(n_views: int, size: int, workdir: Path) -> tuple[np.ndarray, object, object, str]:
    """Render the bundled CT's ring with the joseph projector (cached in workdir)."""
    import nibabel as nib

    from xwin.pipeline.example import example_ct_path
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.schemas.render import RenderSpec

    spec = RenderSpec(n_views=n_views, height=size, width=size, yaw_step_deg=360.0 / n_views)
    img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
    hu = np.asarray(img.dataobj).astype(np.int16)
    hu[hu < -1000] = -1000
    geom = ring_for_volume(spec, img.affine, hu.shape)
    cache = workdir / f"ring_{n_views}_{size}.npy"
    if cache.exists():
        return np.load(cache), spec, geom, "joseph (cached)"
    from xwin.pipeline.render import render_views

    t = time.perf_counter()
    views = render_views(hu, img.affine, geom, spec.mu_water_per_mm, backend="joseph")
    print(f"rendered {n_views} views {size}^2 with joseph in {time.perf_counter() - t:.1f} s")
    np.save(cache, views)
    return views, spec, geom, "joseph"


def median_over_picks(read, picks: list, reps: int) -> float:
    """Median seconds of ``read(pick)`` over ``reps`` calls, cycling through ``picks``."""
    ts = []
    for k in range(reps):
        t = time.perf_counter()
        read(picks[k % len(picks)])
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def drop_cache_hint() -> None:
    os.sync()


def bench_catalog(work: Path, n_rows: int, reps: int = 15) -> dict:
    """Cost of one catalog row added by a commit when the dataset already holds ``n_rows`` volumes (NLST: ~26k),
    with the 16 one-digit buckets of older stores vs the 256 two-digit buckets of new ones."""
    from datetime import datetime

    from xwin.schemas.store import CatalogRow, EntryKind
    from xwin.storage import Scope, make_backend
    from xwin.storage.layout import dataset_path

    now = datetime.now(UTC)
    row = CatalogRow(
        volume_id="x",
        kind=EntryKind.ring,
        cohort="c",
        spec_hash="0" * 16,
        path="p",
        shape=(120, 512, 512),
        dtype="float16",
        nbytes=62914560,
        checksum="sha256:" + "0" * 64,
        committed_at=now,
    )
    res = {"rows": n_rows}
    for hexd in (1, 2):
        root = work / f"catalog_{hexd}"
        shutil.rmtree(root, ignore_errors=True)
        scope = Scope(make_backend(root), dataset_path("c", "0" * 16), hexd)
        scope.catalog_add_many(row.model_copy(update={"volume_id": f"v{i:06d}"}) for i in range(n_rows))
        ts = []
        for k in range(reps):
            t = time.perf_counter()
            scope.catalog_add(row.model_copy(update={"volume_id": f"new{k}"}))
            ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = len(scope.catalog())
        res[f"{16**hexd}_buckets"] = {
            "add_row_ms": round(float(np.median(ts)) * 1e3, 1),
            "bucket_kB": round(float(np.mean(list(scope.bucket_nbytes().values()))) / 1e3, 1),
            "read_catalog_s": round(time.perf_counter() - t, 3),
            "rows_read": n,
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/xwin_bench_store")
    ap.add_argument("--reps", type=int, default=30, help="repetitions of each 9-view read")
    ap.add_argument("--catalog-rows", type=int, default=26000, help="catalog size for the row-add benchmark (0: skip)")
    ap.add_argument("--codecs", default="zstd3,blosc-zstd3-shuffle,blosc-lz4-shuffle")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument(
        "--write-reps", type=int, default=5, help="interleaved raw / commit / zarr-python write repetitions"
    )
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import zarr

    from xwin.storage import open_store
    from xwin.storage.layout import VIEW_CODECS, make_views_codec
    from xwin.storage.shardwrite import cast, zarr_reference_write

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

    def raw_write(dt, fast_cast=False):
        d = work / f"raw_{dt}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t = time.perf_counter()
        # numpy's cast (what a plain .npy writer does; none for float32), or the store's faster float16 cast
        vv = cast(views, np.dtype(dt)) if fast_cast else views.astype(dt, copy=False)
        for k in range(V):
            np.save(d / f"{k:03d}.npy", vv[k])
        os.sync()
        return time.perf_counter() - t, d

    results = []
    codecs = [c for c in args.codecs.split(",") if c in VIEW_CODECS]
    for dt in args.dtypes.split(","):
        raw_bytes = views.astype(dt).nbytes
        rawdir = raw_write(dt)[1]

        def raw_read(ix, rawdir=rawdir):
            return np.stack([np.load(rawdir / f"{k:03d}.npy") for k in ix])

        raw_read(picks[0])
        t_raw_read = median_over_picks(raw_read, picks, args.reps)
        t_raw_read32 = median_over_picks(lambda ix, read=raw_read: read(ix).astype(np.float32), picks, args.reps)
        for name in codecs:
            root = work / f"store_{dt}_{name}"
            shutil.rmtree(root, ignore_errors=True)
            s = open_store(root)
            sp = spec.model_copy(update={"store_dtype": dt})
            ds = s.dataset("bench", sp, views_codec=name)
            px = views.astype(dt)
            g = zarr.open_group(str(root), path="zarr_reference", mode="a")
            t_raw, t_raw32, t_rawfast, t_commit, t_zarr = [], [], [], [], []
            for rep in range(args.write_reps):  # interleaved, so all see the same machine state
                t_raw.append(raw_write(dt)[0])
                t_raw32.append(t_raw[-1] if dt == "float32" else raw_write("float32")[0])
                t_rawfast.append(t_raw[-1] if dt == "float32" else raw_write(dt, fast_cast=True)[0])
                t = time.perf_counter()
                assert ds.write_ring(f"ct{rep}", views, geom.view_meta(), {"bench": True})
                os.sync()
                t_commit.append(time.perf_counter() - t)
                t = time.perf_counter()
                zarr_reference_write(g, f"views{rep}", px, (1, H, W), make_views_codec(dt, name))
                os.sync()
                t_zarr.append(time.perf_counter() - t)
            t_raw, t_raw32, t_rawfast, t_commit, t_zarr = (
                float(np.median(x)) for x in (t_raw, t_raw32, t_rawfast, t_commit, t_zarr)
            )
            ratio = raw_bytes / ds.stored_nbytes("ct0")
            ds2 = open_store(root).dataset("bench", sp)
            ds2.read_views("ct0", [0])  # open the handle (warm)
            t_read = median_over_picks(partial(ds2.read_views, "ct0", dtype=None), picks, args.reps)
            t_read32 = median_over_picks(partial(ds2.read_views, "ct0"), picks, args.reps)
            ds3 = open_store(root).dataset("bench", sp)
            t = time.perf_counter()
            ds3.read_views("ct0", picks[0])
            t_cold = time.perf_counter() - t
            r = {
                "dtype": dt,
                "codec": name,
                "ratio": round(ratio, 3),
                "raw_write_MBps": round(raw_bytes / t_raw / 1e6, 1),
                "commit_write_MBps": round(raw_bytes / t_commit / 1e6, 1),
                "commit_write_vs_raw": round(t_raw / t_commit, 2),
                "commit_s": round(t_commit, 3),
                "raw_s": round(t_raw, 3),
                "raw_float32_s": round(t_raw32, 3),
                "commit_vs_raw_float32_ring": round(t_raw32 / t_commit, 2),
                "raw_fast_cast_s": round(t_rawfast, 3),
                "commit_vs_raw_fast_cast": round(t_rawfast / t_commit, 2),
                "zarr_python_shard_write_vs_raw": round(t_raw / t_zarr, 2),
                "read9_ms": round(t_read * 1e3, 2),
                "raw_read9_ms": round(t_raw_read * 1e3, 2),
                "read9_vs_raw": round(t_read / t_raw_read, 2),
                "read9_as_float32_vs_raw_plus_astype": round(t_read32 / t_raw_read32, 2),
                "read9_cold_ms": round(t_cold * 1e3, 1),
            }
            print(json.dumps(r), flush=True)
            results.append(r)
    out["codecs"] = results
    if args.catalog_rows:
        out["catalog"] = bench_catalog(work, args.catalog_rows)
        print(json.dumps(out["catalog"]))
    print(json.dumps(out, indent=1))
    (work / "bench_store.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
