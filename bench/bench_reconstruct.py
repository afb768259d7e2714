"""Reconstruction benchmark + full-size acceptance run (docs/benchmarks.md#reconstruction).

Bundled CT (canonical RAS), default RenderSpec (120 views over 360 deg, 512^2 at 1 mm, SID 700, SDD 1020),
rendered with the Joseph projector; FDK onto the default grid (256 x 256 x 133, 1.406 mm in-plane, 2.5 mm axial).
Times our CPU FDK (numba) against RTK's CPU FDK in the same run (same projections, same grid, same Ram-Lak
filter) and scores both against the projected volume (PSNR/SSIM protocol of docs/reconstruction.md).

    .venv/bin/python bench/bench_reconstruct.py [--proj cache.npy] [--skip-rtk]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import nibabel as nib
import numpy as np

from xwin.pipeline.example import example_ct_path
from xwin.pipeline.geometry import ring_for_volume
from xwin.pipeline.reconstruct import default_grid, reconstruct
from xwin.pipeline.reconstruct.metrics import reference_mu, score, validation_mask
from xwin.pipeline.render import render_views
from xwin.schemas.render import RenderSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proj", default=None, help="cache the rendered projections in this .npy file")
    ap.add_argument("--skip-rtk", action="store_true")
    args = ap.parse_args()
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
    # warm-up: numba compilation (cached on disk after the first run) is not part of the timing
    reconstruct(proj[:2], views.subset([0, 60]), grid, "numba", short_scan=False)
    rows = {}
    runs = [("numba", "hann", None), ("numba", "ram-lak", 1.0)]
    if not args.skip_rtk:
        runs += [("rtk", "ram-lak", 1.0)]
    for backend, window, cutoff in runs:
        r = reconstruct(proj, views, grid, backend, window=window, cutoff=cutoff)
        m = score(ref, r.mu, validation_mask(grid, r.orbit))
        key = f"{backend}/{window}" + ("" if cutoff == 1.0 else f"@{r.info['cutoff']:.3f}")
        rows[key] = {
            "seconds": round(r.seconds, 2),
            "psnr_db": round(m["psnr_db"], 2),
            "ssim": round(m["ssim"], 4),
            "ssim_in_mask": round(m["ssim_in_mask"], 4),
        }
        print(key, json.dumps(rows[key]), flush=True)
    if "rtk/ram-lak" in rows:
        ratio = rows["rtk/ram-lak"]["seconds"] / rows["numba/ram-lak"]["seconds"]
        print(f"speed-up numba vs RTK FDK (same job, same run): {ratio:.1f}x")
    print(
        json.dumps(
            {"grid": list(grid.shape), "views": len(views), "detector": [spec.height, spec.width], "results": rows}
        )
    )


if __name__ == "__main__":
    main()
