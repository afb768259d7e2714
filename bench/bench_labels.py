"""Label projection cost: the render time each label channel adds to a ring, against the views alone in the same run.

The bundled CT (512 x 512 x 133) with its bundled TotalSegmentator labelmap, the default label groups
(``xwin.pipeline.labels.LabelSpec``: 10 channels), ``--views`` views of the X-WIN ring at ``--size``², joseph on
the CPU. Views and labels are timed alternately for ``--rounds`` rounds; the ratio is labels time / views time per
channel (1.0 = a channel costs as much as the views).

    .venv/bin/python bench/bench_labels.py                     # 256², 8 views, 3 rounds
    .venv/bin/python bench/bench_labels.py --size 512 --views 4
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np
import record

from xwin.pipeline.example import example_ct_path, example_mask_path
from xwin.pipeline.geometry import ring_for_volume
from xwin.pipeline.ingest.volume import canonical_ras
from xwin.pipeline.labels import LabelSpec, align_labels, read_labelmap, render_labels
from xwin.pipeline.render import render_views
from xwin.schemas import RenderSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("labels", args)

    img = nib.load(str(example_ct_path()))
    hu, A = canonical_ras(np.asarray(img.dataobj), np.asarray(img.affine))  # as ingest stores it
    lab, laff, names = read_labelmap(example_mask_path())
    lab, _ = align_labels(lab, laff, hu.shape, A)
    spec = RenderSpec(height=args.size, width=args.size, pixel_mm=512.0 / args.size, n_views=args.views)
    views = ring_for_volume(spec, A, hu.shape)
    ls = LabelSpec()
    render_views(hu, A, views, backend="joseph")  # compile / warm both paths once
    render_labels(lab, names, A, views, LabelSpec(groups={"heart": ["heart"]}), backend="joseph")
    t_views, t_labels = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        render_views(hu, A, views, backend="joseph")
        t_views.append(time.perf_counter() - t)
        t = time.perf_counter()
        render_labels(lab, names, A, views, ls, backend="joseph")
        t_labels.append(time.perf_counter() - t)
    C = len(ls.channels)
    tv, tl = float(np.median(t_views)), float(np.median(t_labels))
    summary = {
        "channels": C,
        "views_s": tv,
        "labels_s": tl,
        "per_channel_over_views": tl / C / tv,
        "views_per_s": args.views / tv,
    }
    print(
        f"{args.views} views {args.size}^2: views {tv:.2f} s, {C} label channels {tl:.2f} s "
        f"= {tl / C / tv:.2f} x the views' time per channel"
    )
    rec.save(samples={"views_s": t_views, "labels_s": t_labels}, summary=summary)


if __name__ == "__main__":
    main()
