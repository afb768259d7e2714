"""Material bases and radiograph looks: what the bases add to a ring's render time and bytes, and what a look costs
per view, against the views alone (and the minmax look of the views) in the same run.

The bundled CT (512 x 512 x 133) as ingest stores it, ``--views`` views of the X-WIN ring at ``--size``², joseph on
the CPU. Views, bases (``render_materials``: both bases in one joseph pass) and the baseline of the bases projected
one after the other (the per-basis loop every other backend runs: the same densities, ``render_views`` once per
basis) are rendered in turn for ``--rounds`` rounds, and the fused bases checked equal to the loop's; the ring is
then written to a temporary store with its bases (float16, the default codec) and the stored bytes of each array are
counted. A look's cost is timed on one frontal view's bases at ``--look-size``² (``--repeats`` calls each, after one
warm call that builds the lookup table, whose cost is timed separately): the lookup table alone (noiseless
transmission), a full look (Poisson + electronic noise, blur, scatter, display window) and the full look with the
console's unsharp mask (``processed``). The lookup table's largest
relative error against the per-energy sum on those bases is recorded too.

    .venv/bin/python bench/bench_appearance.py                       # 256², 8 views, 3 rounds; looks at 512²
"""

from __future__ import annotations

import argparse
import tempfile
import time

import nibabel as nib
import numpy as np
import record

from xwin.pipeline import radiograph as R
from xwin.pipeline.example import example_ct_path
from xwin.pipeline.geometry import ring_for_volume
from xwin.pipeline.ingest.volume import canonical_ras
from xwin.pipeline.materials import MATERIAL_MODEL, hu_to_densities, render_materials
from xwin.pipeline.render import appearance, render_views
from xwin.schemas import RenderSpec
from xwin.schemas.look import Look
from xwin.storage import open_store

LOOKS = {
    "lut": Look(kvp=80, filtration_mm_al=2.5),
    "full": Look(
        kvp=110,
        filtration_mm_al=3.0,
        photons_per_pixel=3e4,
        electronic_noise=5.0,
        blur_mm=0.4,
        scatter_fraction=0.3,
        output="display",
    ),
}
# the full look with the console's structure enhancement (an unsharp mask of the log image, 10 mm)
LOOKS["processed"] = LOOKS["full"].model_copy(update={"enhance_amount": 1.0, "enhance_mm": 10.0})


def _stored_bytes(ds, vid: str, array: str) -> int:
    c = ds.scope.get_commit(vid)
    b = ds.store.backend
    return sum(b.size(k) for k in b.list(f"{c.path}/{array}") if not k.endswith("zarr.json"))


def per_basis_loop(hu: np.ndarray, A: np.ndarray, geom) -> np.ndarray:
    """The baseline: the (soft, bone) densities projected one after the other through ``render_views`` (joseph)."""
    soft, bone = hu_to_densities(hu)
    out = np.empty((2, len(geom), geom.height, geom.width), np.float32)
    for m, dens in enumerate((soft, bone)):
        out[m] = render_views(dens, A, geom, backend="joseph", is_mu=True)
        out[m] *= np.float32(0.1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--look-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("appearance", args)

    img = nib.load(str(example_ct_path()))
    hu, A = canonical_ras(np.asarray(img.dataobj), np.asarray(img.affine))
    hu = np.rint(hu).astype(np.int16)  # as ingest stores it: int16 HU (nibabel scales to float64), Fortran order
    spec = RenderSpec(height=args.size, width=args.size, pixel_mm=512.0 / args.size, n_views=args.views,
                      materials=True)  # fmt: skip
    geom = ring_for_volume(spec, A, hu.shape)
    render_views(hu, A, geom, backend="joseph")  # compile once
    render_materials(hu, A, geom, backend="joseph")
    t_views, t_bases, t_loop = [], [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        views = render_views(hu, A, geom, backend="joseph")
        t_views.append(time.perf_counter() - t)
        t = time.perf_counter()
        bases = render_materials(hu, A, geom, backend="joseph")
        t_bases.append(time.perf_counter() - t)
        t = time.perf_counter()
        loop = per_basis_loop(hu, A, geom)
        t_loop.append(time.perf_counter() - t)
    loop_max_abs_diff = float(np.abs(bases - loop).max())
    assert loop_max_abs_diff == 0.0, f"fused bases differ from the per-basis loop by {loop_max_abs_diff}"
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_store(tmp).dataset("bench", spec)
        ds.write_ring("ct", views, geom.view_meta(), {}, materials=bases, material_model=MATERIAL_MODEL)
        views_bytes, bases_bytes = _stored_bytes(ds, "ct", "views"), _stored_bytes(ds, "ct", "materials")

    S = args.look_size
    one = RenderSpec(height=S, width=S, pixel_mm=512.0 / S, n_views=1)
    frontal = render_materials(hu, A, ring_for_volume(one, A, hu.shape), backend="joseph")
    p = render_views(hu, A, ring_for_volume(one, A, hu.shape), backend="joseph")[0]
    soft, bone = frontal[0, 0], frontal[1, 0]
    look_ms: dict[str, list[float]] = {}
    build_s: dict[str, float] = {}
    for name, lk in LOOKS.items():
        t = time.perf_counter()
        R.lut(lk)
        build_s[name] = time.perf_counter() - t
        R.radiograph_view(soft, bone, lk, one.pixel_mm)
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            R.radiograph_view(soft, bone, lk, one.pixel_mm)
            ts.append((time.perf_counter() - t) * 1e3)
        look_ms[name] = ts
    out = np.empty_like(p)
    mm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        appearance.minmax_into(p, out)
        mm.append((time.perf_counter() - t) * 1e3)
    lut_err = {}
    for kvp in (70.0, 120.0):
        lk = Look(kvp=kvp)
        lut_err[str(kvp)] = float(
            np.abs(R.lut(lk)(soft, bone) / R.transmission_direct(soft, bone, R.beam(lk)) - 1).max()
        )
    tv, tb, tl = float(np.median(t_views)), float(np.median(t_bases)), float(np.median(t_loop))
    summary = {
        "views_s": tv,
        "bases_s": tb,
        "bases_loop_s": tl,
        "bases_over_views_time": tb / tv,
        "bases_over_loop_time": tb / tl,
        "loop_over_views_time": tl / tv,
        "fused_minus_loop_max_abs": loop_max_abs_diff,
        "views_bytes": views_bytes,
        "bases_bytes": bases_bytes,
        "bases_over_views_bytes": bases_bytes / views_bytes,
        "look_ms_median": {k: float(np.median(v)) for k, v in look_ms.items()},
        "lut_build_s": build_s,
        "minmax_ms_median": float(np.median(mm)),
        "lut_max_rel_error": lut_err,
    }
    print(
        f"{args.views} views {args.size}^2: views {tv:.2f} s, bases in one pass {tb:.2f} s ({tb / tv:.2f}x the views, "
        f"{tb / tl:.2f}x the per-basis loop's {tl:.2f} s, equal to it); stored bytes: views "
        f"{views_bytes}, bases {bases_bytes} ({bases_bytes / views_bytes:.2f}x)\n"
        f"look per {S}^2 view: lut {np.median(look_ms['lut']):.1f} ms, full {np.median(look_ms['full']):.1f} ms, "
        f"processed {np.median(look_ms['processed']):.1f} ms "
        f"(minmax of the views {np.median(mm):.2f} ms); table build {build_s}; LUT max rel error {lut_err}"
    )
    rec.save(
        samples={"views_s": t_views, "bases_s": t_bases, "bases_loop_s": t_loop, "look_ms": look_ms, "minmax_ms": mm},
        summary=summary,
    )


if __name__ == "__main__":
    main()
