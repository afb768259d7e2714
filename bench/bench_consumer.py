"""Consumer benchmark (docs/benchmarks.md, Consumer): the X-WIN stream over a Zarr projection dataset vs a WebDataset
tar of the same views, same DataLoader, same read-ahead threads per process (``xwin.training.data.bench.run_bench``).

    .venv/bin/python bench/bench_consumer.py --store '/tmp/cons96#bench' [--samples 384] [--worker-counts 0,2,4]
        [--repeats 3] [--dtype bfloat16 --tag bfloat16] [--io-threads 0]
    .venv/bin/python bench/bench_consumer.py --make-store /tmp/cons96 --volumes 96   # render it first (kept)

``xwin bench consumer`` runs the same measurement from the CLI; this script also records every round of every
configuration to bench/results/consumer[-<tag>]-<date>.json (bench/record.py).
"""

from __future__ import annotations

import argparse
import json

import record  # bench/record.py (the script's folder is on sys.path)

from xwin.training.data import StoreSource
from xwin.training.data.bench import make_bench_store, run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="dataset URL '<store url>#<cohort>[/<spec hash>]'")
    ap.add_argument("--make-store", default=None, help="render the bundled CT into this store first (cohort 'bench')")
    ap.add_argument("--volumes", type=int, default=96, help="rings in the made store (--make-store)")
    ap.add_argument("--size", type=int, default=512, help="detector size of the made store (--make-store)")
    ap.add_argument("--worker-counts", default="0,2,4")
    ap.add_argument("--samples", type=int, default=384, help="samples timed per configuration (after the first batch)")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--appearance", default="minmax")
    ap.add_argument("--dtype", default="float32", help="output image dtype: float32 | float16 | bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all configurations")
    ap.add_argument("--no-fresh", action="store_true", help="skip the stream with fresh (not reused) batch buffers")
    ap.add_argument(
        "--io-threads", type=int, default=None, help="read-ahead threads per process, both readers (default: 2)"
    )
    ap.add_argument("--wds-dir", default=None, help="WebDataset tar cache (default $TMPDIR/xwin-wds-<content key>)")
    record.add_args(ap)
    args = ap.parse_args()
    if (args.store is None) == (args.make_store is None):
        ap.error("give --store URL#cohort or --make-store PATH")
    rec = record.start("consumer", args)
    if args.make_store:
        src = make_bench_store(args.make_store, n_volumes=args.volumes, size=args.size)
    else:
        src = StoreSource.parse(args.store)
    res = run_bench(
        src,
        workers=tuple(int(x) for x in args.worker_counts.split(",") if x.strip()),
        samples=args.samples,
        batch_size=args.batch_size,
        appearance=args.appearance,
        dtype=args.dtype,
        fresh_buffers=not args.no_fresh,
        repeats=args.repeats,
        io_threads=args.io_threads,
        wds_dir=args.wds_dir,
    )
    for r in res["rows"]:
        print(
            f"workers {r['workers']}: stream {r['samples_per_s']:.1f} samples/s (runs {r['runs']['stream']}), "
            f"WebDataset {r['baseline_samples_per_s']:.1f} (runs {r['runs']['wds']}), ratio {r['ratio']:.2f}",
            flush=True,
        )
    measures = {str(r["workers"]): r["measures"] for r in res["rows"]}
    summary = {k: v for k, v in res.items() if k not in ("rows", "gpu_need")}
    summary["rows"] = [{k: v for k, v in r.items() if k != "measures"} for r in res["rows"]]
    rec.save(samples={"measures": measures}, summary=summary, gpu_need=res["gpu_need"])
    print(json.dumps({"ratio": res["ratio"], "keeps_up_ratio": res["keeps_up_ratio"]}))


if __name__ == "__main__":
    main()
