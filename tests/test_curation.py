"""Subject-level splits, quality checks and table removal (docs/training-data.md "Splits", docs/ingest.md "Quality
checks", docs/render.md "Table removal")."""

from __future__ import annotations

import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
from test_storage import SPEC, make_ring, make_volume

from xwin.pipeline.splits import VolumeFacts, assign_splits, split_for, unit_hash
from xwin.schemas.cohort import SplitPolicy
from xwin.schemas.ingest import Acquisition
from xwin.storage import open_store


# ---- assignment ---------------------------------------------------------------------------------------------------
def _facts(n_subjects: int, start: int = 0, seed: int = 0) -> list[VolumeFacts]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(start, start + n_subjects):
        for t in range(int(rng.integers(1, 4))):  # 1-3 exams
            for r in range(int(rng.integers(1, 3))):  # 1-2 reconstructions each
                out.append(
                    VolumeFacts(
                        volume_id=f"v{s:04d}-{t}-{r}",
                        subject=f"pid{s:06d}",
                        study_date=f"{1999 + t}0{1 + t}1{r}",
                        manufacturer=["SIEMENS", "GE", "TOSHIBA", "PHILIPS"][s % 4],
                    )
                )
    return out


def test_splits_by_subject_fractions_and_stability():
    facts = _facts(600)
    pol = SplitPolicy()
    doc, moved = assign_splits("c", facts, pol)
    assert moved == []
    by_subject: dict[str, set[str]] = {}
    for v in doc.volumes.values():
        by_subject.setdefault(v.subject, set()).add(v.split)
    assert all(len(s) == 1 for s in by_subject.values())  # no subject in two splits
    share = Counter(doc.subjects.values())
    assert sum(share.values()) == 600
    for name, f in pol.fractions.items():  # binomial: 3 sigma of 600 draws is < 0.05
        assert abs(share[name] / 600 - f) < 0.05, (name, share)
    # deterministic, and independent of the order volumes come in
    again, _ = assign_splits("c", list(reversed(facts)), pol)
    assert again.subjects == doc.subjects and again.volumes == doc.volumes
    # timepoints: the order of each subject's exam dates, offsets in days since the first exam
    v = doc.volumes["v0000-0-0"]
    assert v.timepoint == 0 and v.study_offset_days == 0
    later = [x for vid, x in doc.volumes.items() if vid.startswith("v0000-") and not vid.startswith("v0000-0")]
    assert all(x.timepoint and x.study_offset_days > 300 for x in later)
    # later subjects are added; no assigned subject ever moves, even under another policy
    more, _ = assign_splits("c", facts + _facts(100, start=600, seed=1), SplitPolicy(salt="other"), doc)
    assert {s: more.subjects[s] for s in doc.subjects} == doc.subjects
    assert len(more.subjects) == 700 and more.policy == pol  # the cohort keeps its first policy
    # an excluded subject leaves every split, with all its volumes, and is reported when it had a split
    victim = "pid000003"
    ex, moved = assign_splits("c", facts, pol, doc, exclude=[victim])
    assert moved == [victim] and ex.subjects[victim] == "excluded" and ex.excluded == [victim]
    assert all(x.split == "excluded" for x in ex.volumes.values() if x.subject == victim)


def test_splits_grouped_by_manufacturer_and_subjectless_volumes():
    facts = _facts(200)
    doc, _ = assign_splits("c", facts, SplitPolicy(group_by="manufacturer", salt="s1"))
    per_vendor: dict[str, set[str]] = {}
    for f in facts:
        per_vendor.setdefault(f.manufacturer or "", set()).add(doc.volumes[f.volume_id].split)
    assert all(len(s) == 1 for s in per_vendor.values()) and len(doc.groups) == 4
    # a volume without a subject id is its own subject
    solo, _ = assign_splits("c", [VolumeFacts("nifti-1", None), VolumeFacts("nifti-2", None)], SplitPolicy())
    assert set(solo.subjects) == {"volume:nifti-1", "volume:nifti-2"}


def test_split_hash_is_the_documented_function():
    import hashlib

    h = hashlib.sha256(b"salt:pid1").digest()
    assert unit_hash("salt", "pid1") == (int.from_bytes(h[:8], "big") >> 12) / 2**52
    assert split_for(0.0, {"a": 0.5, "b": 0.5}) == "a" and split_for(0.5, {"a": 0.5, "b": 0.5}) == "b"
    assert split_for(0.9999999999, {"a": 0.5, "b": 0.5}) == "b"
    with pytest.raises(ValueError, match="sum to 1"):
        SplitPolicy(fractions={"train": 0.8, "test": 0.1})


# ---- stored, CLI and streams -------------------------------------------------------------------------------------
@pytest.fixture()
def split_store(tmp_path):
    """A store with 12 volumes of 6 subjects (two exams each) and their rings in one dataset."""
    url = str(tmp_path / "s")
    st = open_store(url)
    ds = st.dataset("c1", SPEC)
    for i in range(12):
        subject, exam = f"pid{i // 2:03d}", i % 2
        rec, hu = make_volume(f"vol{i:02d}", seed=i, shape=(8, 8, 6))
        rec = rec.model_copy(update={"subject_id": subject, "acquisition": Acquisition(study_date=f"20{exam:02d}0101")})
        st.write_volume(rec, hu)
        ds.write_ring(f"vol{i:02d}", *make_ring(i), {})
    return url


def _cli(*args):
    from typer.testing import CliRunner

    from xwin.flows.cli import app

    return CliRunner().invoke(app, list(args))


def test_splits_cli_and_split_streams(split_store, tmp_path):
    res = _cli("splits", "assign", "--store", split_store, "--cohort", "c1", "--fractions", "train=0.5,test=0.5",
               "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert set(body["volumes"]) == {f"vol{i:02d}" for i in range(12)}
    per_subject: dict[str, set[str]] = {}
    for v in body["volumes"].values():
        per_subject.setdefault(v["subject"], set()).add(v["split"])
    assert len(per_subject) == 6 and all(len(s) == 1 for s in per_subject.values())
    assert sum(body["counts"]["volumes"].values()) == 12 and set(body["counts"]["volumes"]) <= {"train", "test"}
    assert {v["timepoint"] for v in body["volumes"].values()} == {0, 1}
    shown = _cli("splits", "show", "--store", split_store, "--cohort", "c1", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["volumes"] == body["volumes"]
    # the streams: a split sees only its own volumes
    from xwin.training.data import StoreSource, XWinSampling, XWinStream

    test_ids = {vid for vid, v in body["volumes"].items() if v["split"] == "test"}
    assert 0 < len(test_ids) < 12
    src = StoreSource(split_store, "c1", SPEC, split="test")
    reader = src.open()
    assert set(reader.volume_ids()) == test_ids and {r.volume_id for r in reader.catalog()} == test_ids
    other = next(iter(set(body["volumes"]) - test_ids))
    with pytest.raises(KeyError):
        reader.read_views(other, [0])
    stream = XWinStream(src, sampling=XWinSampling(n_targets=2, step_deg=30.0, max_abs_deg=90.0), image_size=16, seed=0)
    seen = {s["volume_id"] for s in stream}
    assert seen == test_ids
    # errors in words: a split the cohort lacks, a cohort never assigned, a bad fractions option
    with pytest.raises(ValueError, match="no split 'val'"):
        StoreSource(split_store, "c1", SPEC, split="val").open()
    bad = _cli("splits", "show", "--store", split_store, "--cohort", "c2")
    assert bad.exit_code == 2 and "no split assignment" in bad.output
    bad = _cli("splits", "assign", "--store", split_store, "--cohort", "c1", "--fractions", "train=0.5,test=0.4")
    assert bad.exit_code == 2 and "sum to 1" in bad.output and "Traceback" not in bad.output


# ---- table removal -----------------------------------------------------------------------------------------------
def test_body_mask_removes_the_table_and_nothing_else(small_ct_path):
    from xwin.pipeline.body import body_mask
    from xwin.pipeline.ingest.qc import quality_checks
    from xwin.pipeline.render import hu_to_mu, render_ring, render_views
    from xwin.schemas import RenderSpec

    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj).astype(np.int16), img.affine
    spacing = tuple(float(s) for s in np.sqrt((A[:3, :3] ** 2).sum(0)))
    checks = {c.name: c for c in quality_checks(hu, spacing)}
    assert checks["table"].flagged and checks["table"].value > 150  # the bundled CT lies on a table
    assert not checks["truncated"].flagged
    spec = RenderSpec(height=48, width=48, pixel_mm=10.0, n_views=4, yaw_step_deg=90.0)
    plain, views = render_ring(hu, A, spec, backend="joseph")
    masked, _ = render_ring(hu, A, spec.model_copy(update={"body_mask": True}), backend="joseph")
    assert spec.model_copy(update={"body_mask": True}).spec_hash != spec.spec_hash
    # what was removed, projected alone: the DRR loses exactly that (the projector is linear in mu). It is the
    # table and the outside "air", whose CT values (about -950 HU: noise and beam hardening) carry a little mu
    from xwin.pipeline.body import components, table_parts

    mu = hu_to_mu(hu.astype(np.float32), spec.mu_water_per_mm)
    keep = body_mask(hu, spacing)
    lab, sizes = components(hu > -400)
    table = np.isin(lab, table_parts(lab, sizes, spacing)[0])
    assert table.sum() > 1000 and not (keep & table).any()
    t_proj = render_views(np.where(table, mu, 0).astype(np.float32), A, views, backend="joseph", is_mu=True)
    air = render_views(np.where(~keep & ~table, mu, 0).astype(np.float32), A, views, backend="joseph", is_mu=True)
    diff = plain - masked
    np.testing.assert_allclose(diff, t_proj + air, atol=1e-4 * float(plain.max()))
    assert float(t_proj.max()) > 1.0 and float(air.max()) < float(t_proj.max())
    # at yaw 90 (lateral) the table, posterior and running along z, is a narrow vertical band beside the body
    cols = (t_proj[1] > 0.05).any(axis=0)
    assert 0 < cols.sum() < 0.25 * cols.size, cols.astype(int)


# ---- an NBIA-like cohort in DICOM: metadata, timepoints, quality checks, duplicates ------------------------------
@pytest.fixture(scope="module")
def nbia_cohort(tmp_path_factory, small_ct_path):
    """Three subjects written as DICOM from the (downsampled) bundled CT: A with two exams, the first exam also
    reconstructed a second time under its own study (a sharper kernel), B with three exams, C with two, the
    second cropped by the field of view. Exams are a year apart."""
    from dicom_fixtures import write_ct_series

    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj).astype(np.int32), img.affine
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("nbia")
    dates = ["19990102", "20000110", "20010115"]
    acq = {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "LightSpeed16", "KVP": "120",
           "InstitutionName": "Site 7"}  # fmt: skip
    layout = {"A": [0, 1], "B": [0, 1, 2], "C": [0, 1]}
    for subj, exams in layout.items():
        for t in exams:
            vol, aff = hu, A
            if subj == "C" and t == 1:  # a field of view cutting through the chest
                vol = hu[28:-28]
                aff = A.copy()
                aff[:3, 3] = A[:3, 3] + A[:3, 0] * 28
            write_ct_series(root / subj / f"T{t}", vol, aff, patient_id=f"1000{ord(subj)}", study_date=dates[t],
                            seed=t, extra=acq)  # fmt: skip
    sharp = hu + np.rint(rng.normal(0, 15, hu.shape)).astype(np.int32)  # the same scan, another kernel
    sharp[hu <= -1024] = hu[hu <= -1024]
    write_ct_series(root / "A" / "T0-B50f", sharp, A, patient_id=f"1000{ord('A')}", study_date=dates[0],
                    kernel="B50f", description="1.25mm B50f", seed=9, extra=acq)  # fmt: skip
    return root


def test_nbia_like_cohort_metadata_splits_qc_duplicates(nbia_cohort, tmp_path):
    from xwin.pipeline.ingest import IngestConfig, ingest_sources

    url = str(tmp_path / "s")
    st = open_store(url)
    sources = sorted(str(p) for p in nbia_cohort.glob("*/*"))
    summary = ingest_sources(sources, "nbia", st, IngestConfig(deid_salt="secret"))
    assert len(summary.done) == 8 and not summary.rejected, summary
    recs = {r.source.split("/nbia")[-1]: r for r in st.list_volumes("nbia")}
    rec_b2 = next(r for k, r in recs.items() if k.endswith("B/T2"))
    a = rec_b2.acquisition
    assert (a.manufacturer, a.model, a.kvp, a.site, a.kernel) == ("GE MEDICAL SYSTEMS", "LightSpeed16", 120.0,
                                                                 "Site 7", "B30f")  # fmt: skip
    # de-identified: hashed subject, dates shifted by one per-subject amount (intervals kept)
    assert rec_b2.subject_id.startswith("s-") and "1000" not in rec_b2.subject_id
    b_dates = sorted(r.acquisition.study_date for k, r in recs.items() if "/B/" in k)
    assert b_dates[0] != "19990102" and len(set(b_dates)) == 3
    # quality checks with their values: the cropped exam is truncated, the others are not; all lie on a table
    for k, r in recs.items():
        q = {c.name: c for c in r.qc}
        assert q["table"].flagged and q["table"].value > 150, k
        assert q["truncated"].flagged == k.endswith("C/T1"), (k, q["truncated"])
        assert not q["hu_air"].flagged and not q["hu_tissue"].flagged
    # splits: subjects whole, timepoints by date, the second reconstruction flagged as a duplicate of the first
    res = _cli("splits", "assign", "--store", url, "--cohort", "nbia", "--fractions", "train=0.34,val=0.33,test=0.33",
               "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    vols = json.loads(res.stdout)["volumes"]
    by_subject: dict[str, set] = {}
    for v in vols.values():
        by_subject.setdefault(v["subject"], set()).add(v["split"])
    assert len(by_subject) == 3 and all(len(s) == 1 for s in by_subject.values())
    tp = {k: vols[r.volume_id]["timepoint"] for k, r in recs.items()}
    assert tp[next(k for k in tp if k.endswith("B/T2"))] == 2 and tp[next(k for k in tp if k.endswith("A/T1"))] == 1
    offs = sorted(vols[r.volume_id]["study_offset_days"] for k, r in recs.items() if "/B/" in k)
    assert offs == [0, 373, 744]  # 1999-01-02 -> 2000-01-10 -> 2001-01-15
    # the two reconstructions of exam A/T0: the later of the two by volume id is marked a duplicate of the other
    pair = sorted(recs[next(k for k in recs if k.endswith(name))].volume_id for name in ("A/T0", "A/T0-B50f"))
    assert vols[pair[1]]["duplicate_of"] == pair[0] and vols[pair[1]]["duplicate_score"] > 0.95
    assert all(v["duplicate_of"] is None for vid, v in vols.items() if vid != pair[1])
    # two exams of one person a year apart (here: the same CT) are never compared: they are not one exam
    assert all(v["duplicate_score"] is None for vid, v in vols.items() if vid not in pair)
    # a rejecting QC policy: the truncated exam ends rejected with the check as its reason
    st2 = open_store(str(tmp_path / "s2"))
    rej = ingest_sources([str(nbia_cohort / "C" / "T1")], "nbia", st2, IngestConfig(qc_reject=("truncated",)))
    assert [r.reason.value for r in rej.rejected] == ["qc_truncated"] and "truncated" in rej.rejected[0].detail


def test_dataset_card(split_store, tmp_path):
    assert _cli("splits", "assign", "--store", split_store, "--cohort", "c1", "--json").exit_code == 0
    res = _cli("card", "--store", split_store, "--cohort", "c1", "--out", str(tmp_path / "card"), "--json",
               "--licence", "CC BY 4.0")  # fmt: skip
    assert res.exit_code == 0, res.output
    card = json.loads(res.stdout)
    assert card["volumes"] == 12 and card["subjects"] == 6 and card["licence"] == "CC BY 4.0"
    assert sum(card["splits"]["volumes"].values()) == 12 and card["by_timepoint"] == {"0": 6, "1": 6}
    assert card["datasets"][0]["rings"] == 12 and card["datasets"][0]["spec_hash"] == SPEC.spec_hash
    md = (tmp_path / "card" / "card.md").read_text()
    assert "Volumes per split" in md and "CC BY 4.0" in md and "preview.png" in md
    from PIL import Image

    assert Image.open(tmp_path / "card" / "preview.png").size[0] > 4 * 100
    # the known cohort's licence comes without asking
    from xwin.flows.card import KNOWN_COHORTS

    assert "CC BY 3.0" in KNOWN_COHORTS["nlst"][0]


def test_a_volume_never_changes_split_when_its_subject_id_changes():
    """A volume assigned under one subject key and seen again under another (re-ingested with another
    de-identification) keeps its split; the new key is not attached to it."""
    pol = SplitPolicy(fractions={"a": 0.5, "b": 0.5})
    first, _ = assign_splits("c", [VolumeFacts("v1", "P3")], pol)
    renamed = next(f"s-{i}" for i in range(1000) if split_for(unit_hash(pol.salt, f"s-{i}"), pol.fractions)
                   != first.volumes["v1"].split)  # fmt: skip
    again, _ = assign_splits("c", [VolumeFacts("v1", renamed)], pol, first)
    assert again.volumes["v1"] == first.volumes["v1"]


def test_real_image_subjects():
    from xwin.training.data.real_cxr import real_subject

    key = "files/p10/p10000032/s50414267/02aa804e.jpg"
    assert real_subject(key, mimic=True) == real_subject(key, mimic=False) == "10000032"  # CSV or not
    assert real_subject("patient7/img1.png", mimic=False) == "patient7"
    with pytest.raises(ValueError, match="one folder per subject"):
        real_subject("img1.png", mimic=False)
