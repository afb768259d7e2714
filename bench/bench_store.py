"""Store benchmark on the bundled CT's ring (120 x 512 x 512), all ratios against raw .npy measured in the same run.

    .venv/bin/python bench/bench_store.py [--views 120] [--size 512] [--workdir /tmp/xwin_bench_store]

Reports: float16 error vs float32; per stored dtype and codec (zstd, blosc-zstd+shuffle, blosc-lz4+shuffle):
compression ratio; write time of the full commit (``write_ring``: claim, cast, encode, write, sha256, read-back
verify, commit record, catalog; fsync'd) and of zarr-python's own shard write, each against the like-for-like
baseline **raw**: the same views cast to the stored dtype with the store's own cast, written as raw .npy files (one
per view) and os.sync'd -- the same work short of compression, hashing and verification. Two more baselines for
context: **raw numpy cast** (numpy's slower float16 cast, what a plain writer does) and **raw f32** (the rendered
float32 ring dumped as is). Interleaved repetitions, every one recorded. Then what the commit's remaining cost
buys, each part timed alone on the same ring: cast + compression on the encode pool, the sha256 of the stored
values, writing + fsync of the compressed bytes, and the read-back (raw bytes + crc32c) that verifies them.
Reads: latency of reading 9 random views (1 context + 8 targets) in the stored dtype vs np.load of the same 9 .npy
files (and both converted to float32). Goals: write >= 0.8x raw, 9-view read <= 1.5x raw.
Results: bench/results/store-<date>.json (bench/record.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from datetime import UTC
from functools import partial
from pathlib import Path

import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)


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


def interleaved_reads(reads: dict, picks: list, reps: int) -> dict[str, list[float]]:
    """Seconds of each of ``reps`` calls of every ``reads[name](pick)``, cycling through ``picks``; the readers
    alternate call by call, so a slow spell of the shared machine hits them alike."""
    ts: dict[str, list[float]] = {k: [] for k in reads}
    for k in range(reps):
        for name, read in reads.items():
            t = time.perf_counter()
            read(picks[k % len(picks)])
            ts[name].append(time.perf_counter() - t)
    return ts


def parts_alone(views: np.ndarray, dt: str, codec, work: Path, reps: int) -> dict[str, list[float]]:
    """What the commit does beyond the raw writer, each part timed alone on the same ring (seconds per repeat):
    cast + compression on the store's encode pool, the same with the sha256 of the stored values fed by the encoder
    (as the commit does), writing + fsync of the compressed shard, and the read-back (raw bytes + crc32c)."""
    import google_crc32c

    from xwin.storage.shardwrite import encode_shard, shard_layout

    V, H, W = views.shape
    lay = shard_layout((V, H, W), dt, (1, H, W), codec)
    out: dict[str, list[float]] = {"encode": [], "encode_sha256": [], "write_fsync": [], "read_back": []}
    f = work / "parts.bin"
    for _ in range(reps):
        t = time.perf_counter()
        pieces = list(encode_shard(views, lay, codec))
        out["encode"].append(time.perf_counter() - t)
        h = hashlib.sha256()
        t = time.perf_counter()
        pieces = list(encode_shard(views, lay, codec, on_chunk=lambda raw, h=h: h.update(raw.data)))
        h.hexdigest()
        out["encode_sha256"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with open(f, "wb") as fh:
            for p in pieces:
                fh.write(p)
            fh.flush()
            os.fsync(fh.fileno())
        out["write_fsync"].append(time.perf_counter() - t)
        t = time.perf_counter()
        google_crc32c.value(f.read_bytes())
        out["read_back"].append(time.perf_counter() - t)
    f.unlink()
    return out


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
            "add_row_s": ts,
            "bucket_bytes_mean": float(np.mean(list(scope.bucket_nbytes().values()))),
            "read_catalog_s": time.perf_counter() - t,
            "rows_read": n,
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/xwin_bench_store")
    ap.add_argument("--reps", type=int, default=21, help="repetitions of each 9-view read")
    ap.add_argument("--catalog-rows", type=int, default=26000, help="catalog size for the row-add benchmark (0: skip)")
    ap.add_argument("--codecs", default="zstd3,blosc-zstd3-shuffle,blosc-lz4-shuffle")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument(
        "--write-reps", type=int, default=5, help="interleaved raw / commit / zarr-python write repetitions"
    )
    ap.add_argument("--part-reps", type=int, default=3, help="repetitions of the commit's parts timed alone")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("store", args)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import zarr

    from xwin.storage import open_store
    from xwin.storage.layout import VIEW_CODECS, make_views_codec
    from xwin.storage.shardwrite import cast, zarr_reference_write

    views, spec, geom, how = load_ring(args.views, args.size, work)
    V, H, W = views.shape
    out: dict = {"ring": [V, H, W], "renderer": how, "range": [float(views.min()), float(views.max())]}

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

    # ---- raw baselines --------------------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    picks = [rng.choice(V, 9, replace=False) for _ in range(args.reps)]

    def raw_write(dt: str, how: str) -> tuple[float, Path]:
        """how: "fast" (the store's cast: like for like), "numpy" (numpy's cast), "f32" (the float32 ring)."""
        d = work / f"raw_{dt}_{how}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t = time.perf_counter()
        vv = views if how == "f32" else cast(views, np.dtype(dt)) if how == "fast" else views.astype(dt, copy=False)
        for k in range(V):
            np.save(d / f"{k:03d}.npy", vv[k])
        os.sync()
        return time.perf_counter() - t, d

    results = []
    codecs = [c for c in args.codecs.split(",") if c in VIEW_CODECS]
    for dt in args.dtypes.split(","):
        raw_bytes = views.astype(dt).nbytes
        rawdir = raw_write(dt, "fast")[1]

        def raw_read(ix, rawdir=rawdir):
            return np.stack([np.load(rawdir / f"{k:03d}.npy") for k in ix])

        raw_read(picks[0])
        for name in codecs:
            root = work / f"store_{dt}_{name}"
            shutil.rmtree(root, ignore_errors=True)
            s = open_store(root)
            sp = spec.model_copy(update={"store_dtype": dt})
            ds = s.dataset("bench", sp, views_codec=name)
            g = zarr.open_group(str(root), path="zarr_reference", mode="a")
            w: dict[str, list[float]] = {"raw": [], "raw_numpy_cast": [], "raw_f32": [], "commit": [], "zarr": []}
            for rep in range(args.write_reps):  # interleaved, so all see the same machine state
                w["raw"].append(raw_write(dt, "fast")[0])
                w["raw_numpy_cast"].append(w["raw"][-1] if dt == "float32" else raw_write(dt, "numpy")[0])
                w["raw_f32"].append(w["raw"][-1] if dt == "float32" else raw_write(dt, "f32")[0])
                t = time.perf_counter()
                assert ds.write_ring(f"ct{rep}", views, geom.view_meta(), {"bench": True})
                os.sync()
                w["commit"].append(time.perf_counter() - t)
                t = time.perf_counter()
                # the same cast inside the timing as the raw writer and the commit (like for like)
                zarr_reference_write(g, f"views{rep}", cast(views, np.dtype(dt)), (1, H, W), make_views_codec(dt, name))
                os.sync()
                w["zarr"].append(time.perf_counter() - t)
            parts = parts_alone(views, dt, make_views_codec(dt, name), work, args.part_reps)
            ds2 = open_store(root).dataset("bench", sp)
            ds2.read_views("ct0", [0])  # open the handle (warm)
            reads = interleaved_reads(
                {
                    "read9_s": partial(ds2.read_views, "ct0", dtype=None),
                    "raw_read9_s": raw_read,
                    "read9_float32_s": partial(ds2.read_views, "ct0"),
                    "raw_read9_float32_s": lambda ix, read=raw_read: read(ix).astype(np.float32),
                },
                picks,
                args.reps,
            )
            ds3 = open_store(root).dataset("bench", sp)
            t = time.perf_counter()
            ds3.read_views("ct0", picks[0])
            t_cold = time.perf_counter() - t
            r = {
                "dtype": dt,
                "codec": name,
                "raw_bytes": raw_bytes,
                "stored_bytes": ds.stored_nbytes("ct0"),
                "write_s": w,
                "parts_alone_s": parts,
                **reads,
                "read9_cold_s": t_cold,
            }
            med = {k: float(np.median(v)) for k, v in w.items()}
            print(
                f"{dt} {name}: ratio {raw_bytes / r['stored_bytes']:.2f}, commit {med['commit']:.3f} s, "
                f"raw {med['raw']:.3f} s -> commit vs raw (like for like) {med['raw'] / med['commit']:.2f}x; "
                f"9-view read {np.median(reads['read9_s']) * 1e3:.2f} ms vs raw "
                f"{np.median(reads['raw_read9_s']) * 1e3:.2f} ms",
                flush=True,
            )
            results.append(r)
    out["codecs"] = results
    if args.catalog_rows:
        out["catalog"] = bench_catalog(work, args.catalog_rows)
        print(json.dumps({k: v for k, v in out["catalog"].items() if k == "rows"}))
    rec.save(samples=out)


if __name__ == "__main__":
    main()
