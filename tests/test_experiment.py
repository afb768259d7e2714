"""The experiment of bench/bench_experiment.py: its miniature end to end (the plumbing, not the figures), and
docs/results.md equal to what the recorded results generate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from bench_modules import load_bench

BENCH = Path(__file__).resolve().parents[1] / "bench"


exp = load_bench("bench_experiment")


def test_docs_results_md_is_generated_from_the_results():
    report = load_bench("report")
    doc = (BENCH.parent / "docs" / "results.md").read_text()
    assert doc == exp.results_markdown(report.load_all()), "docs/results.md is stale: bench_experiment.py --doc-only"
    assert "not a\npopulation" in doc


@pytest.mark.slow
def test_experiment_miniature(tmp_path):
    out = exp.main(["--preset", "ci", "--work", str(tmp_path / "work"), "--no-record", "--json"])
    smp, summ = out["samples"], out["summary"]
    # the cohort went through ingest, render and the subject-level split
    n = exp.PRESETS["ci"]["n"]
    assert len(smp["subjects"]) == n and smp["with_nodule"] == n // 2
    counts = smp["split_counts"]
    assert counts["train"] > 0 and counts["test"] > 0 and counts["train"] + counts["test"] == n
    test_vols = {v for v, s in smp["subjects"].items() if s["split"] == "test"}
    # (a) only held-out volumes are evaluated, every (context, offset) once, every figure finite
    assert {r["volume_id"] for r in smp["views"]} == test_vols
    assert len(smp["views"]) == len(test_vols) * len(exp.CONTEXTS) * len(exp.OFFSETS)
    for r in smp["views"]:
        assert ("mirror_psnr_db" in r) == (abs(r["offset_deg"]) == 180)
        assert all(math.isfinite(v) for k, v in r.items() if k.endswith(("_db", "_ssim")))
    # the context baseline against the rendered view, recomputed from the store by the PSNR definition
    from xwin.training.data import StoreSource

    ds = StoreSource(str(tmp_path / "work" / "store"), "phantoms", None, split="test").open()
    r = smp["views"][0]
    idx = [ds.spec.view_index(r["context_deg"]), ds.spec.view_index((r["context_deg"] + r["offset_deg"]) % 360)]
    (ctx, ref), _ = ds.read_views(r["volume_id"], np.asarray(idx))
    ctx, ref = np.asarray(ctx, np.float64), np.asarray(ref, np.float64)
    psnr = 10 * math.log10((ref.max() - ref.min()) ** 2 / np.mean((ctx - ref) ** 2))
    assert r["context_psnr_db"] == pytest.approx(psnr, rel=1e-6)
    # the rendered 180-degree view is close to the frontal view reversed left-right (cone beam: not exactly)
    at180 = summ["per_offset"]["180"]
    assert at180["mirror"]["psnr_db"]["mean"] > at180["context"]["psnr_db"]["mean"] + 3
    assert at180["best_baseline"] == "mirror"
    assert set(summ["per_offset"]) == {"15", "30", "60", "90", "180"}
    # (b) probes of each label from the three feature sets, on disjoint subjects
    runs = smp["probes"]["runs"]
    assert set(runs) == {f"{f}/{k}" for f in exp.FEATURES for k in exp.LABELS}
    for f in exp.FEATURES:
        ok = [r for r in runs[f"{f}/nodule"] if "error" not in r]
        assert ok and all(0 <= r["all"] <= 1 for r in ok)
    assert len(smp["probes"]["subjects"]) == n  # the ci preset probes every subject (too few held out)
    # (c) the 3-D loop on a held-out volume, with its oracle row
    rc = smp["recon3d"]
    assert len(rc["volumes"]) == 1 and rc["volumes"][0]["volume_id"] in test_vols
    assert rc["arc"]["n_views"] == 61
    v = rc["volumes"][0]
    assert math.isfinite(v["volume_psnr_db"]) and v["oracle_volume_psnr_db"] > v["volume_psnr_db"]
    assert smp["train"]["steps"] == 3 and smp["decoder"]["steps"] == 4
    # the report renders from these samples
    fake = {
        "bench": "experiment",
        "started_at": "2000-01-01T00:00:00",
        "date": "2000-01-01",
        "params": {**out["params"], "preset": "ci", "seed": 0},
        "summary": summ,
        "samples": smp,
        "machine": {"cores_usable": 2},
        "git": {"commit": "0" * 40},
        "load_before": [1.0, 1.0, 1.0],
        "wall_s": 60.0,
    }
    md = exp.results_markdown([fake])
    assert "## Preset `ci`" in md and "| 180° |" in md and "trained 3 steps" in md
