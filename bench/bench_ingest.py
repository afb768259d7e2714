"""Ingest speed: our DICOM ingest (plan + load) vs SimpleITK's ImageSeriesReader on the same files, same run.

The 133-slice full-resolution series is written from the bundled chest CT (512 x 512 x 133, Explicit VR Little
Endian, one file per slice). Both sides read from the page cache (a warm-up pass of each runs first); each
repeat times both, alternating, and the medians are compared. Ours runs as ingest runs it (default IngestConfig,
with the quality checks of ``xwin.pipeline.ingest.qc``) and, in the same repeats, without the quality checks: the
like-for-like comparison with a reader that only reads (SimpleITK). Prints one JSON line with the ratio
(goal: ours / SimpleITK <= 1.2) and writes every repeat's seconds to bench/results/ (bench/record.py).

    .venv/bin/python bench/bench_ingest.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import record  # noqa: E402  (bench/record.py)
from dicom_fixtures import series_from_nifti  # noqa: E402

from xwin.pipeline.example import example_ct_path  # noqa: E402
from xwin.pipeline.ingest import IngestConfig, load_candidate, plan_inputs  # noqa: E402


def ours(folder: str, cfg: IngestConfig) -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    cands, rej = plan_inputs([folder], "bench", cfg)
    t1 = time.perf_counter()
    assert not rej and len(cands) == 1, rej
    _, hu = load_candidate(cands[0])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, hu


def simpleitk(folder: str) -> tuple[float, sitk.Image]:
    t0 = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(folder)
    reader.SetFileNames(names)
    img = reader.Execute()
    t1 = time.perf_counter()
    return t1 - t0, img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("ingest", args)
    cfg = IngestConfig()
    no_qc = dataclasses.replace(cfg, qc=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "series")
        series_from_nifti(example_ct_path(), folder)
        _, _, hu = ours(folder, cfg)  # warm-up: page cache, numba cache load
        _t_sitk, img = simpleitk(folder)
        arr = sitk.GetArrayFromImage(img)  # (z, y, x) copy
        # same voxels: SimpleITK (z, y, x) in LPS file order vs ours (x, y, z) RAS: compare after flips
        assert np.array_equal(np.where(arr < -1500, -1000, arr).transpose(2, 1, 0)[::-1, ::-1, :], hu)
        ours(folder, no_qc)
        plan_t, load_t, sitk_t, noqc_t = [], [], [], []
        for _ in range(args.repeats):
            p, l_, _ = ours(folder, cfg)
            s, _ = simpleitk(folder)
            p2, l2, _ = ours(folder, no_qc)
            plan_t.append(p)
            load_t.append(l_)
            sitk_t.append(s)
            noqc_t.append(p2 + l2)
    ours_t = [p + l_ for p, l_ in zip(plan_t, load_t)]
    ours_med, sitk_med = statistics.median(ours_t), statistics.median(sitk_t)
    summary = {
        "series": "bundled chest CT as DICOM, 512x512x133, explicit VR LE",
        "repeats": args.repeats,
        "ours_plan_s": round(statistics.median(plan_t), 4),
        "ours_load_s": round(statistics.median(load_t), 4),
        "ours_total_s": round(ours_med, 4),
        "simpleitk_s": round(sitk_med, 4),
        "ratio_median": round(ours_med / sitk_med, 3),
        "ratio_best": round(min(ours_t) / min(sitk_t), 3),
        "ours_without_qc_s": round(statistics.median(noqc_t), 4),
        "ratio_without_qc_median": round(statistics.median(noqc_t) / sitk_med, 3),
        "goal": "<= 1.2",
    }
    print(json.dumps(summary))
    rec.save(
        samples={"ours_plan_s": plan_t, "ours_load_s": load_t, "simpleitk_s": sitk_t, "ours_without_qc_s": noqc_t},
        summary=summary,
        baseline=f"SimpleITK {sitk.Version.VersionString()} ImageSeriesReader",
    )


if __name__ == "__main__":
    main()
