"""End-to-end backfill throughput vs its stages run alone (how well ingest, render and write overlap).

Cohort: ``--n-series`` variants of the bundled example chest CT (the same scan with a few HU added inside the body,
so each has its own content id), rendered with the X-WIN spec (512x512, 120 views) by default.

Baselines, measured in the same run on the same series, before and after the E2E run (A-B-A, averaged):
    ingest   xwin.pipeline.ingest.load_candidate + store.write_volume
    render   store.read_volume + xwin.pipeline.render.render_ring
    write    dataset.write_ring
E2E: the backfill flow body on a fresh store (``--mode local``: xwin.flows.backfill.run_local, i.e. LocalStages;
``--mode prefect``: the Prefect flow against a temporary server, server start excluded).

Prints series/hour for each stage alone, for the sequential sum of the stages, for the E2E run, and the ratios
  e2e / slowest stage   (goal >= 0.9: the pipeline runs at the pace of its bottleneck)
  e2e / sequential sum  (> 1 when stages overlap)

    .venv/bin/python bench/bench_e2e.py                   # 3 series, X-WIN spec, local mode
    .venv/bin/python bench/bench_e2e.py --n-series 2 --mode both

Every stage time of both baseline passes and every E2E wall time go to bench/results/e2e-<date>.json
(bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)

from xwin.pipeline.example import example_ct_path
from xwin.schemas.render import RenderSpec


def make_cohort(d: Path, n: int) -> list[Path]:
    img = nib.load(str(example_ct_path()))
    a = np.asarray(img.dataobj).astype(np.int16)
    out = []
    for k in range(n):
        b = np.where(a > -500, a + k, a).astype(np.int16)
        p = d / f"example_{k}.nii.gz"
        nib.save(nib.Nifti1Image(b, img.affine), str(p))
        out.append(p)
    return out


def stages_alone(paths: list[Path], spec: RenderSpec, backend: str, root: Path) -> dict[str, list[float]]:
    from xwin.pipeline.ingest import load_candidate, plan_inputs
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store

    store = open_store(str(root))
    ds = store.dataset("bench", spec)
    t: dict[str, list[float]] = {"ingest": [], "render": [], "write": []}
    cands, _ = plan_inputs([str(p) for p in paths], "bench")
    # warm the render JIT outside the timings (the E2E run is warmed the same way below)
    rec0, hu0 = load_candidate(cands[0])
    render_ring(
        hu0[::8, ::8, ::4],
        np.asarray(rec0.affine) @ np.diag([8, 8, 4, 1]),
        spec.model_copy(update={"n_views": 2}),
        backend,
    )
    for c in cands:
        t0 = time.perf_counter()
        rec, hu = load_candidate(c)
        store.write_volume(rec, hu)
        t1 = time.perf_counter()
        rec, hu = store.read_volume(rec.volume_id)
        views, geom = render_ring(hu, np.asarray(rec.affine), spec, backend)
        t2 = time.perf_counter()
        ds.write_ring(rec.volume_id, views, geom.view_meta(), {"bench": True})
        t3 = time.perf_counter()
        t["ingest"].append(t1 - t0)
        t["render"].append(t2 - t1)
        t["write"].append(t3 - t2)
    return t


def e2e(paths: list[Path], spec: RenderSpec, backend: str, root: Path, mode: str) -> float:
    from xwin.flows.backfill import run_local
    from xwin.flows.params import BackfillParams

    params = BackfillParams(
        cohort="bench",
        store=str(root / f"e2e-{mode}"),
        source=[str(p) for p in paths],
        spec=spec,
        backend=backend,
        verify="none",
        previews=4,
    )
    t0 = time.perf_counter()
    if mode == "local":
        s = run_local(params)
    else:
        from xwin.flows.backfill import backfill_cohort

        s = backfill_cohort(**params.model_dump(exclude={"spec"}), spec=spec)
    wall = time.perf_counter() - t0
    assert len(s.done) == len(paths), s.counts()
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-series", type=int, default=3)
    ap.add_argument("--backend", default="joseph")
    ap.add_argument("--mode", choices=["local", "prefect", "both"], default="local")
    ap.add_argument("--small", action="store_true", help="128x128, 24 views (quick check)")
    ap.add_argument("--keep", action="store_true")
    record.add_args(ap)
    a = ap.parse_args()
    rec = record.start("e2e" + ("-small" if a.small else ""), a)
    spec = RenderSpec(height=128, width=128, pixel_mm=4.0, n_views=24, yaw_step_deg=15.0) if a.small else RenderSpec()
    root = Path(tempfile.mkdtemp(prefix="xwin-bench-e2e-"))
    try:
        paths = make_cohort(root, a.n_series)
        # A-B-A: stages alone before and after the E2E runs (this machine is shared; drift hits both sides)
        alone = stages_alone(paths, spec, a.backend, root / "a1")
        walls: dict[str, float] = {}
        modes = ["local", "prefect"] if a.mode == "both" else [a.mode]
        for m in modes:
            if m == "prefect":
                from prefect.testing.utilities import prefect_test_harness

                with prefect_test_harness(server_startup_timeout=180):
                    walls[m] = e2e(paths, spec, a.backend, root, m)
            else:
                walls[m] = e2e(paths, spec, a.backend, root, m)
        alone2 = stages_alone(paths, spec, a.backend, root / "a2")
        passes = {"before": alone, "after": alone2}
        alone = {k: alone[k] + alone2[k] for k in alone}
        mean = {k: statistics.mean(v) for k, v in alone.items()}
        rate = {k: 3600.0 / v for k, v in mean.items()}
        seq = 3600.0 / sum(mean.values())
        slow = min(rate, key=rate.get)
        res = {
            "n_series": a.n_series,
            "spec": f"{spec.height}x{spec.width}x{spec.n_views}",
            "backend": a.backend,
            "cpus": os.cpu_count(),
            "stage_s": mean,
            "stage_series_per_h": rate,
            "sequential_series_per_h": seq,
            "slowest_stage": slow,
            "stage_s_runs": alone,
        }
        for m in modes:
            wall = walls[m]
            r = 3600.0 * a.n_series / wall
            res[f"e2e_{m}"] = {
                "wall_s": wall,
                "series_per_h": r,
                "vs_slowest_stage": r / rate[slow],
                "vs_sequential": r / seq,
            }
        print(json.dumps(res, indent=1))
        print("\nstages alone (s/series): " + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
        print("series/hour: " + ", ".join(f"{k} {v:.0f}" for k, v in rate.items()) + f", sequential sum {seq:.0f}")
        for m in modes:
            e = res[f"e2e_{m}"]
            print(
                f"e2e {m}: {e['series_per_h']:.0f} series/h = {e['vs_slowest_stage']:.2f} x slowest stage "
                f"({slow}), {e['vs_sequential']:.2f} x sequential sum"
            )
        rec.save(
            samples={"stage_s": passes, "e2e_wall_s": walls},
            summary={k: v for k, v in res.items() if k != "stage_s_runs"},
            spec=spec.model_dump(mode="json"),
        )
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
