"""Cohort runs: NBIA metadata.csv planning, ingest_sources into a real store (done/skipped/rejected), the CLI."""

from __future__ import annotations

import csv
import json
import pickle

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import slab
from dicom_fixtures import write_ct_series, write_localizer
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.pipeline.ingest import IngestError, ingest_sources, load_candidate, plan_inputs, plan_manifest
from xwin.schemas.ingest import RejectReason as R
from xwin.schemas.ingest import RunSummary

HEADER = [
    "Series UID",
    "Collection",
    "3rd Party Analysis",
    "Data Description URI",
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series Description",
    "Manufacturer",
    "Modality",
    "SOP Class Name",
    "SOP Class UID",
    "Number of Images",
    "File Size",
    "File Location",
    "Download Timestamp",
]


@pytest.fixture(scope="module")
def small(small_ct_path):
    return slab(small_ct_path, 24, 36)


def _row(series_uid, subject, study_uid, loc, modality="CT", n=12, desc="1,OPA,GE,HSQX,STANDARD,350,2.5,120,40"):
    return {
        "Series UID": series_uid,
        "Collection": "NLST",
        "3rd Party Analysis": "NO",
        "Data Description URI": "",
        "Subject ID": subject,
        "Study UID": study_uid,
        "Study Description": "NLST-LSS",
        "Study Date": "01-02-1999",
        "Series Description": desc,
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "Modality": modality,
        "SOP Class Name": "CT Image Storage",
        "SOP Class UID": "1.2.840.10008.5.1.4.1.1.2",
        "Number of Images": str(n),
        "File Size": "1,234,567",
        "File Location": loc,
        "Download Timestamp": "2026-11-01T10:00:00.000",
    }


@pytest.fixture(scope="module")
def cohort(small, tmp_path_factory):
    """An NBIA download: metadata.csv + ./NLST/<subject>/<study>/<series>/ folders, good and bad studies."""
    hu, aff = small
    root = tmp_path_factory.mktemp("nbia")
    rows = []
    # A: localizer + good axial series
    sA = pydicom.uid.generate_uid()
    a_dir = "./NLST/100012/01-02-1999-NA-NLST-LSS-12345/2.000000-1OPAGEHSQXSTANDARD-67890"
    good = write_ct_series(root / a_dir, hu, aff, study_uid=sA, patient_id="100012")
    loc_dir = "./NLST/100012/01-02-1999-NA-NLST-LSS-12345/1.000000-0OPASCOUT-11111"
    loc = write_localizer(root / loc_dir, study_uid=sA, patient_id="100012")
    rows += [
        _row(pydicom.dcmread(loc[0]).SeriesInstanceUID, "100012", sA, loc_dir, n=1, desc="0,OPA,SCOUT"),
        _row(pydicom.dcmread(good[0]).SeriesInstanceUID, "100012", sA, a_dir),
    ]
    # B: folder missing
    rows.append(_row("1.2.3.4.5", "100013", "1.2.3.4", "./NLST/100013/missing/series"))
    # C: gap in the only series (Windows-style location)
    sC = pydicom.uid.generate_uid()
    c_dir = "NLST/100014/01-02-2000-NA-NLST-LSS-2/3.000000-1OPAGEHSQXLUNG-3"
    gap = write_ct_series(root / c_dir, hu, aff, study_uid=sC, patient_id="100014")
    gap[6].unlink()
    rows.append(_row(pydicom.dcmread(gap[0]).SeriesInstanceUID, "100014", sC, ".\\" + c_dir.replace("/", "\\")))
    # D: only an MR row
    rows.append(_row("1.2.3.9", "100015", "1.2.3.8", "./NLST/100015/x/y", modality="MR"))
    # E: malformed row (no File Location)
    rows.append(_row("1.2.3.10", "100016", "1.2.3.11", ""))
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        w.writerows(rows)
    return root, sA, sC


def test_plan_manifest(cohort):
    root, sA, sC = cohort
    cands, rej = plan_manifest(root / "metadata.csv", "nlst")
    assert [c.study_uid for c in cands] == [sA]
    reasons = sorted(r.reason.value for r in rej)
    assert reasons == sorted(["not_found", "missing_slices", "no_usable_series", "manifest_error"])
    gap = next(r for r in rej if r.reason == R.missing_slices)
    assert gap.input.endswith(f"metadata.csv#{sC}")
    a = cands[0]
    assert a.input.endswith(f"metadata.csv#{sA}") and a.subject_id == "100012" and len(a.paths) == 12
    assert any(s.reason.startswith("localizer") for s in a.series_choices)
    # plan_inputs dispatches a .csv source to plan_manifest
    c2, r2 = plan_inputs([str(root / "metadata.csv")], "nlst")
    assert [c.volume_id for c in c2] == [a.volume_id] and len(r2) == len(rej)


def test_candidates_pickle_and_load(cohort):
    root, sA, _ = cohort
    cands, _ = plan_manifest(root / "metadata.csv", "nlst")
    c2 = pickle.loads(pickle.dumps(cands[0]))
    rec, hu = load_candidate(c2)
    assert rec.volume_id == cands[0].volume_id and rec.study_uid == sA and hu.shape == (128, 128, 12)
    err = pickle.loads(pickle.dumps(IngestError(R.missing_slices, "x", "1.2")))
    assert err.reason == R.missing_slices and err.detail == "x" and err.series_uid == "1.2"


def test_ingest_sources_mixed_cohort_into_store(cohort, small, tmp_path, bundled_ct_path):
    from xwin.storage import open_store

    root, sA, _ = cohort
    bad_nii = tmp_path / "nan.nii"
    a = small[0].astype(np.float32)
    a[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(a, small[1]), str(bad_nii))
    good_nii = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(small[0], small[1]), str(good_nii))
    store = open_store(str(tmp_path / "store"))
    sources = [str(bad_nii), str(good_nii), str(tmp_path / "absent"), str(good_nii)]
    s1 = ingest_sources(sources, "nlst", store, manifests=[root / "metadata.csv"])
    n_inputs = len(sources) + 5  # manifest: A, B, C, D, E
    assert len(s1.done) + len(s1.skipped) + len(s1.rejected) == n_inputs
    assert [e.input for e in s1.done] == [str(good_nii), f"{root / 'metadata.csv'}#{sA}"]
    assert [e.input for e in s1.skipped] == [str(good_nii)]  # the same input twice in one run
    assert {r.reason for r in s1.rejected} >= {R.non_finite_values, R.not_found, R.missing_slices}
    for e in s1.done:
        rec, hu = store.read_volume(e.volume_id)
        assert rec.cohort == "nlst" and hu.dtype == np.int16 and hu.shape == tuple(rec.shape)
    s2 = ingest_sources(sources, "nlst", store, manifests=[root / "metadata.csv"])
    assert not s2.done and len(s2.skipped) == 3 and len(s2.rejected) == len(s1.rejected)


def test_cli_json_and_exit_codes(cohort, small, tmp_path):
    root, _sA, _ = cohort
    good_nii = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(small[0], small[1]), str(good_nii))
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    args = [
        "ingest",
        str(good_nii),
        str(tmp_path / "empty"),
        "--store",
        str(tmp_path / "st"),
        "--cohort",
        "c1",
        "--manifest",
        str(root / "metadata.csv"),
        "--json",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # stdout is exactly one JSON object
    summary = RunSummary.model_validate(out)
    assert len(summary.done) == 2 and all(e.volume_id for e in summary.done)
    assert {x["reason"] for x in out["rejected"]} >= {"empty_input", "not_found", "missing_slices"}
    r2 = runner.invoke(app, args)
    again = RunSummary.model_validate_json(r2.stdout)
    assert r2.exit_code == 0 and not again.done and len(again.skipped) == 2
    human = runner.invoke(app, ["ingest", str(good_nii), "--store", str(tmp_path / "st"), "--cohort", "c1"])
    assert human.exit_code == 0 and "1 skipped" in human.stdout
    (tmp_path / "afile").write_text("x")  # a store that cannot be opened: the run itself fails
    bad = runner.invoke(app, ["ingest", str(good_nii), "--store", str(tmp_path / "afile" / "st"), "--json"])
    assert bad.exit_code != 0 and bad.stdout == ""


def test_ingest_sources_falls_back_to_next_ranked_series(small, tmp_path):
    """A study whose chosen series has truncated pixel data: the run stores the next-ranked series under its own
    volume id, with the failure in its record; a rerun tries the chosen series again and skips the stored one."""
    from xwin.storage import open_store

    hu, aff = small
    study = pydicom.uid.generate_uid()
    d = tmp_path / "study"
    soft = write_ct_series(d, hu, aff, study_uid=study, kernel="B30f", prefix="SOFT", patient_id="P9")
    sharp = write_ct_series(d, hu, aff, study_uid=study, kernel="B70f", prefix="SHARP", patient_id="P9")
    soft[3].write_bytes(soft[3].read_bytes()[:-4000])
    soft_uid, sharp_uid = (pydicom.dcmread(f[0]).SeriesInstanceUID for f in (soft, sharp))
    [cand], _ = plan_inputs([str(d)], "nlst")
    store = open_store(str(tmp_path / "store"))
    s1 = ingest_sources([str(d), str(d)], "nlst", store)  # the second time in one run: skipped, same volume
    assert not s1.rejected
    [e] = s1.done
    assert (e.input, e.series_uid, e.volume_id) == (str(d), sharp_uid, cand.fallbacks[0].volume_id)
    assert [(x.volume_id, x.series_uid) for x in s1.skipped] == [(e.volume_id, sharp_uid)]
    assert not store.has_volume(cand.volume_id)
    rec, stored = store.read_volume(e.volume_id)
    np.testing.assert_array_equal(stored, load_candidate(cand.fallbacks[0])[1])
    assert next(s for s in rec.series_choices if s.series_uid == soft_uid).reason.startswith("failed to load")
    s2 = ingest_sources([str(d)], "nlst", store)
    assert not s2.done and not s2.rejected and [x.volume_id for x in s2.skipped] == [e.volume_id]
