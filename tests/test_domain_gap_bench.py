"""bench/bench_domain_gap.py in miniature (the plumbing, not the figures): real radiographs through prepare-cxr, a
cohort with material bases, two tiny models (one with domain actions), every (encoder, views, real set) row through
``xwin eval domain-gap`` (plain views and two looks),
and the docs/benchmarks.md region that bench/report.py makes of it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from bench_modules import load_bench

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _write_cr(path: Path, arr: np.ndarray) -> None:
    """A computed radiograph as pydicom-data's are stored: CR, 16-bit, MONOCHROME1 (low values bright)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # computed radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 14, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.slow
def test_domain_gap_bench_miniature(tmp_path):
    bench = load_bench("bench_domain_gap")
    report = load_bench("report")
    src = tmp_path / "dicom"
    src.mkdir()
    yy, xx = np.mgrid[0:300, 0:260]
    chest = 20000 - 12000 * np.exp(-(((xx - 130) / 60.0) ** 2)) * (yy > 40)  # a bright band on a dark field
    _write_cr(src / "RG1_UNCR.dcm", chest)
    _write_cr(src / "RG1_J2KI.dcm", chest)  # the same picture under the lossy set's name: the same figures
    _write_cr(src / "RG3_UNCR.dcm", 20000 - 15000 * (np.abs(xx - 60) < 15))  # a thin vertical bar
    out = bench.main(["--ci", "--work", str(tmp_path / "work"), "--real-dicom", str(src), "--no-record"])
    smp, summ = out["samples"], out["summary"]
    rows = smp["rows"]
    assert [(r["encoder"], r["views"], r["real"]) for r in rows] == [
        (e, v, k) for e in bench.ENCODERS for v in bench.VIEWS for k in bench.REAL_SETS
    ]
    from xwin.storage import open_store

    splits = open_store(str(tmp_path / "work" / "store")).read_splits("phantoms")
    n_test = sum(a.split == "test" for a in splits.volumes.values())
    assert n_test > 0 and summ["n_simulated"] == n_test
    assert summ["n_real"] == dict.fromkeys(bench.REAL_SETS, 1)
    for r in rows:
        assert r["n_real"] == 1 and r["n_simulated"] == n_test and r["volumes"] == n_test
        assert -1 <= r["cosine_similarity"] <= 1 and math.isfinite(r["l2_distance"]) and r["l2_distance"] > 0
        assert r["real_skipped"] == {} and r["seed"] == 0
        assert len(r["per_volume"]) == n_test and all(math.isfinite(v["l2_distance"]) for v in r["per_volume"])
    cell = {(r["encoder"], r["views"], r["real"]): r for r in rows}
    for e in bench.ENCODERS:
        for v in bench.VIEWS:
            same, other = cell[e, v, "chest"], cell[e, v, "chest-j2k-lossy"]
            assert other["l2_distance"] == pytest.approx(same["l2_distance"], rel=1e-6)
            assert cell[e, v, "tibia"]["l2_distance"] != pytest.approx(same["l2_distance"], rel=1e-3)
        # the realistic DRRs are the look's radiographs, not the stored views
        assert cell[e, "realistic", "chest"]["l2_distance"] != pytest.approx(
            cell[e, "plain", "chest"]["l2_distance"], rel=1e-4
        )
        assert cell[e, "processed", "chest"]["l2_distance"] != pytest.approx(
            cell[e, "realistic", "chest"]["l2_distance"], rel=1e-4
        )
    # the two models trained their steps, the looks model with domain actions
    assert {k: t["steps"] for k, t in smp["train"].items()} == {"plain/0": 3, "looks/0": 3}
    assert smp["train"]["looks/0"]["looks"] and not smp["train"]["plain/0"]["looks"]
    # the region of docs/benchmarks.md renders from these samples
    fake = {
        "_file": "domain-gap-2000-01-01.json",
        "bench": "domain-gap",
        "script": "bench/bench_domain_gap.py",
        "argv": ["--ci"],
        "date": "2000-01-01",
        "started_at": "2000-01-01T00:00:00+00:00",
        "params": out["params"],
        "summary": summ,
        "samples": smp,
        "machine": {"cores": 2, "cpu": "x", "memory_gb": 1.0, "gpus": []},
        "git": {"commit": "0" * 40, "dirty": False},
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [1.0, 1.0, 1.0],
    }
    md = report.domain_gap([fake])
    assert md.count("\n| random-init |") == 3 and md.count("\n| looks |") == 3
    assert f"{n_test} simulated" in md and "chest 1, chest-j2k-lossy 1, tibia 1" in md
    c = cell["looks", "realistic", "tibia"]
    assert f"{c['cosine_similarity']:.4f} / {c['l2_distance']:.3f}" in md
    assert md.count(f"of {n_test} volume × seed pairs") == 2 * len(bench.ENCODERS)


def test_domain_gap_region_pairs_volumes_by_id_and_seed():
    """The region's paired counts match each volume with itself in the same seed, whatever order the rows and the
    per-volume lists come in: here the processed rows list the seeds and the volumes in reverse, and every volume's
    processed DRRs are closer than its plain ones (by 0.1) though farther than the plain ones of the others."""

    def row(seed, enc, views, real, l2s):
        pv = [{"volume_id": f"v{i}", "cosine_similarity": 0.9, "l2_distance": x} for i, x in enumerate(l2s)]
        if views == "processed":
            pv = pv[::-1]
        l2 = sum(l2s) / len(l2s)
        return {"seed": seed, "encoder": enc, "views": views, "real": real, "cosine_similarity": 0.9,
                "l2_distance": l2, "n_simulated": 3, "n_real": 1, "volumes": 3, "per_volume": pv}  # fmt: skip

    plain_l2 = {0: [1.0, 2.0, 3.0], 1: [1.5, 2.5, 3.5]}
    rows = []
    for views, seeds in (("plain", (0, 1)), ("processed", (1, 0))):
        for s in seeds:
            l2s = [x - 0.1 if views == "processed" else x for x in plain_l2[s]]
            rows.append(row(s, "plain", views, "chest", l2s))
            rows.append(row(s, "plain", views, "tibia", [x + 10 for x in l2s]))
    res = {
        "_file": "domain-gap-2000-01-01.json",
        "bench": "domain-gap",
        "script": "bench/bench_domain_gap.py",
        "argv": [],
        "date": "2000-01-01",
        "started_at": "2000-01-01T00:00:00+00:00",
        "params": {"detector": 32, "pixel_mm": 16.0},
        "summary": {"n_real": {"chest": 1, "tibia": 1}},
        "samples": {"rows": rows, "train": {"plain/0": {"steps": 3, "seconds": 60.0}}},
        "machine": {"cores": 2, "cpu": "x", "memory_gb": 1.0, "gpus": []},
        "git": {"commit": "0" * 40, "dirty": False},
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [1.0, 1.0, 1.0],
    }
    md = load_bench("report").domain_gap([res])
    assert "processed (0.96×, closer for 6 of 6 volume × seed pairs)" in md, md
    assert "farther than the chest for every view kind and seed under: plain." in md, md


def test_domain_gap_bench_checks_the_real_radiographs_first(tmp_path):
    """A real-radiograph folder without one of the three files ends the bench with one line naming it, before the
    work folder is made or anything copied into it."""
    bench = load_bench("bench_domain_gap")
    src = tmp_path / "dicom"
    src.mkdir()
    for name in ("RG1_UNCR.dcm", "RG1_J2KI.dcm"):
        (src / name).write_bytes(b"")
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"RG3_UNCR\.dcm: no such file"):
        bench.main(["--ci", "--work", str(work), "--real-dicom", str(src), "--no-record"])
    assert not work.exists()
