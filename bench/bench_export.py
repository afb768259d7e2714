"""Dataset export throughput (``xwin export --what dataset``) against the store's own read throughput, same run.

    .venv/bin/python bench/bench_export.py [--volumes 4] [--size 256] [--repeats 2] [--workdir /tmp/xwin_bench_export]

A store of ``--volumes`` rings (the bundled CT rendered once at ``--size``² over 512 mm, 120 views x 3 deg, stored
float16, intensity-scaled copies; ``training.data.bench.make_bench_store``) is read ring by ring in the stored dtype
(``read_views`` of every view: the baseline, what any exporter must at least do), read and written as one raw .npy
file per ring (the second baseline: the floor of any export to files) and exported as WebDataset and
Hugging Face Parquet shards, per ring and per view, each into a fresh folder (``storage.interchange.export_rings``:
read, encode, write, sha256 of the shard, manifest). Repetitions are interleaved; every one is recorded. Figures:
MiB/s of views and the ratios export / read and export / raw .npy (1.0 = the export costs no more than the baseline).
Results: bench/results/export-<date>.json (bench/record.py).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)

VARIANTS = (("webdataset", "ring"), ("webdataset", "view"), ("hf", "ring"), ("hf", "view"))


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=4, help="rings in the store")
    ap.add_argument("--size", type=int, default=256, help="detector size (px), 120 views")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of every measurement")
    ap.add_argument("--rings-per-shard", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/xwin_bench_export", help="store and export folders (kept: the store)")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("export", args)

    from xwin.storage import open_store
    from xwin.storage.interchange import export_rings
    from xwin.training.data.bench import make_bench_store

    work = Path(args.workdir)
    src = make_bench_store(work / f"store-{args.size}", n_volumes=args.volumes, size=args.size, backend="joseph")
    ds = open_store(src.url).dataset(src.cohort, src.spec, create=False)
    ids = sorted(ds.volume_ids())[: args.volumes]
    V = ds.spec.n_views
    nbytes = sum(ds.read_views(v, np.arange(V), dtype=None)[0].nbytes for v in ids)  # also warms the page cache

    def read_all() -> float:
        fresh = open_store(src.url).dataset(src.cohort, src.spec, create=False)  # no opened-ring cache
        t = time.perf_counter()
        for v in ids:
            fresh.read_views(v, np.arange(V), dtype=None)
        return time.perf_counter() - t

    def raw_npy(out: Path) -> float:  # the floor of any export to files: read each ring, np.save it
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        fresh = open_store(src.url).dataset(src.cohort, src.spec, create=False)
        t = time.perf_counter()
        for v in ids:
            np.save(out / f"{v}.npy", fresh.read_views(v, np.arange(V), dtype=None)[0])
        return time.perf_counter() - t

    read_s: list[float] = []
    raw_s: list[float] = []
    export_s: dict[str, list[float]] = {f"{f}_{p}": [] for f, p in VARIANTS}
    out_bytes: dict[str, int] = {}
    for r in range(args.repeats):
        read_s.append(read_all())
        raw_s.append(raw_npy(work / "out-raw-npy"))
        for fmt, per in VARIANTS:
            out = work / f"out-{fmt}-{per}"
            shutil.rmtree(out, ignore_errors=True)
            fresh = open_store(src.url).dataset(src.cohort, src.spec, create=False)
            t = time.perf_counter()
            export_rings(fresh, out, fmt, per=per, rings_per_shard=args.rings_per_shard, volume_ids=ids)
            export_s[f"{fmt}_{per}"].append(time.perf_counter() - t)
            out_bytes[f"{fmt}_{per}"] = dir_bytes(out)
        print(
            f"repeat {r + 1}/{args.repeats}: read {read_s[-1]:.2f} s, "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in export_s.items())
        )
    mib = nbytes / 2**20
    summary = {
        "views_mib": mib,
        "read_mib_per_s": mib / min(read_s),
        "raw_npy_mib_per_s": mib / min(raw_s),
        **{f"{k}_mib_per_s": mib / min(v) for k, v in export_s.items()},
        **{f"{k}_over_read": min(read_s) / min(v) for k, v in export_s.items()},
        **{f"{k}_over_raw_npy": min(raw_s) / min(v) for k, v in export_s.items()},
    }
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    rec.save(
        samples={
            "rings": len(ids),
            "views_per_ring": V,
            "detector": [ds.spec.height, ds.spec.width],
            "store_dtype": ds.spec.store_dtype,
            "views_bytes": nbytes,
            "read_s": read_s,
            "raw_npy_s": raw_s,
            "export_s": export_s,
            "output_bytes": out_bytes,
        },
        summary=summary,
    )


if __name__ == "__main__":
    main()
