"""Reconstruction benchmark + full-size acceptance run (docs/benchmarks.md#reconstruction).

Bundled CT (canonical RAS), default RenderSpec (120 views over 360 deg, 512^2 at 1 mm, SID 700, SDD 1020),
rendered with the Joseph projector; FDK onto the default grid (256 x 256 x 133, 1.406 mm in-plane, 2.5 mm axial).
Times our CPU FDK (numba) against RTK's CPU FDK in the same run (same projections, same grid, same Ram-Lak
filter) and scores both against the projected volume (PSNR/SSIM protocol of docs/reconstruction.md): SSIM inside
the patient's body (the strict figure), inside the field-of-view mask, and over the whole volume (the protocol's).

Both backends are warmed before timing: numba's compiled kernels loaded, ITK/RTK imported and its FDK pipeline built
once, each on a 2-view reconstruction. ``--repeats`` rounds interleave the backends; every round's seconds are
recorded (bench/record.py).

    .venv/bin/python bench/bench_reconstruct.py [--repeats 2] [--proj cache.npy] [--skip-rtk]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import nibabel as nib
import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)

from xwin.pipeline.example import example_ct_path
from xwin.pipeline.geometry import ring_for_volume
from xwin.pipeline.reconstruct import default_grid, reconstruct
from xwin.pipeline.reconstruct.metrics import body_on_grid, reference_mu, score, validation_mask
from xwin.pipeline.render import render_views
from xwin.schemas.render import RenderSpec

RUNS = [("numba", "hann", None), ("numba", "ram-lak", 1.0), ("rtk", "ram-lak", 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proj", default=None, help="cache the rendered projections in this .npy file")
    ap.add_argument("--skip-rtk", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the backends (each round times each once)")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("reconstruct", args)
    spec = RenderSpec()
    img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
    hu, A = np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    views = ring_for_volume(spec, A, hu.shape)
    if args.proj and os.path.exists(args.proj):
        proj = np.load(args.proj)
    else:
        t = time.perf_counter()
        proj = render_views(hu, A, views, spec.mu_water_per_mm, backend="joseph")
        print(f"render (joseph) {len(views)} x {spec.height}^2: {time.perf_counter() - t:.1f} s")
        if args.proj:
            np.save(args.proj, proj)
    grid = default_grid(A, hu.shape)
    ref = reference_mu(hu, A, grid, spec.mu_water_per_mm)
    body = body_on_grid(hu, A, grid)
    runs = [r for r in RUNS if not (args.skip_rtk and r[0] == "rtk")]
    # warm-up of every backend, not timed: numba's kernels (cached on disk after the first run), ITK's lazy modules
    # and RTK's FDK pipeline (a first RTK call in a process spends seconds importing and instantiating templates)
    warm = {}
    for backend in sorted({b for b, _, _ in runs}):
        t = time.perf_counter()
        reconstruct(proj[:2], views.subset([0, 60]), grid, backend, short_scan=False)
        warm[backend] = time.perf_counter() - t
        print(f"warm-up {backend}: {warm[backend]:.1f} s", flush=True)
    seconds: dict[str, list[float]] = {}
    scores: dict[str, dict] = {}
    for _ in range(max(1, args.repeats)):
        for backend, window, cutoff in runs:
            r = reconstruct(proj, views, grid, backend, window=window, cutoff=cutoff)
            key = f"{backend}/{window}" + ("" if cutoff == 1.0 else f"@{r.info['cutoff']:.3f}")
            seconds.setdefault(key, []).append(r.seconds)
            if key not in scores:  # the result is deterministic: scored once
                m = score(ref, r.mu, validation_mask(grid, r.orbit), body)
                scores[key] = {
                    k: m[k] for k in ("psnr_db", "psnr_in_body_db", "ssim", "ssim_in_mask", "ssim_in_body")
                } | {"mask_voxels": m["mask_voxels"], "body_voxels": m["body_voxels"]}
            print(key, f"{r.seconds:.2f} s", json.dumps(scores[key]), flush=True)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    summary: dict = {"median_s": med, "scores": scores}
    if "rtk/ram-lak" in med:
        speedup = summary["speedup_rtk_over_numba_ram_lak"] = med["rtk/ram-lak"] / med["numba/ram-lak"]
        print(f"speed-up numba vs RTK FDK (same filter, same run, medians): {speedup:.1f}x")
    rec.save(
        samples={"seconds": seconds, "warmup_s": warm},
        summary=summary,
        grid=list(grid.shape),
        views=len(views),
        detector=[spec.height, spec.width],
    )


if __name__ == "__main__":
    main()
