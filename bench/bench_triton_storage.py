"""Error of the ``triton`` renderer's half-precision volume storage, against the float32 ``joseph`` render of the same
views in the same run (docs/benchmarks.md, GPU rendering). Accuracy only: on the CPU the kernel runs in Triton's
interpreter, whose speed means nothing.

Bundled CT (512 x 512 x 133), mu = 0.02 * max(0, 1 + HU/1000), 256^2 detector at 2 mm, SID 700 / SDD 1020, yaw 0
and 90 (``--yaws``). About 2-7 min per storage type on 2 CPU cores under the interpreter; seconds on a GPU.

    TRITON_INTERPRET=1 .venv/bin/python bench/bench_triton_storage.py [--size 256] [--yaws 0 90] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import nibabel as nib
import numpy as np
import record
import torch

from xwin.pipeline.example import example_ct_path
from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.pipeline.render import hu_to_mu, render_views
from xwin.pipeline.render.triton_joseph import VOLUME_DTYPES, interpreting
from xwin.schemas import RenderSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--yaws", type=float, nargs="+", default=[0.0, 90.0])
    ap.add_argument("--json", action="store_true")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("triton_storage", args)
    img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
    hu, A = np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    mu = hu_to_mu(hu)
    spec = RenderSpec(height=args.size, width=args.size, pixel_mm=512.0 / args.size, n_views=1)
    parts = [ring_for_volume(spec.model_copy(update={"yaw_start_deg": y}), A, hu.shape) for y in args.yaws]
    views = ConeBeamViews.from_cone_vecs(
        np.concatenate([p.cone_vecs for p in parts]), spec.height, spec.width, np.asarray(args.yaws)
    )
    ref = render_views(mu, A, views, backend="joseph", is_mu=True)  # the baseline, same run
    mode = "interpreter" if interpreting() else ("cuda" if torch.cuda.is_available() else "none")
    rows = []
    for dt in VOLUME_DTYPES:
        t = time.perf_counter()
        out = render_views(mu, A, views, backend="triton", is_mu=True, volume_dtype=dt)
        err = [float(np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])) for k in range(len(views))]
        rows.append(
            {
                "volume_dtype": dt,
                "rel_l2_per_view": err,
                "max_abs": float(np.abs(out - ref).max()),
                "ref_max": float(ref.max()),
                "seconds": time.perf_counter() - t,
            }
        )
        print(f"{dt:9s} rel L2 {' / '.join(f'{e:.1e}' for e in err)}  max abs {rows[-1]['max_abs']:.1e}", flush=True)
    rec.save(samples={"rows": rows}, summary={"size": args.size, "yaws": args.yaws, "triton_mode": mode})
    if args.json:
        print(json.dumps({"size": args.size, "yaws": args.yaws, "triton_mode": mode, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
