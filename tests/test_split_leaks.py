"""Splits that cannot leak: volumes bound by content, not only by the subject id they arrived with
(docs/training-data.md, "Splits").

A cohort ingested twice (raw, then de-identified), one CT under two patient ids, and a second reconstruction of one
acquisition under another subject: in each case the copies must land in one split. The subjects are made from the
bundled CT by different in-plane scalings and a left-right mirror (one real CT ships with the package), so that
unrelated subjects differ in anatomy as much as their descriptors show; the test checks that too.
"""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from xwin.pipeline.splits import VolumeFacts, assign_splits, split_for, unit_hash
from xwin.schemas.cohort import SplitPolicy
from xwin.storage import open_store

HALF = SplitPolicy(fractions={"train": 0.5, "test": 0.5})


def _cli(*args, env=None):
    from typer.testing import CliRunner

    from xwin.flows.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def subject_ct(hu: np.ndarray, k: int) -> np.ndarray:
    """Subject ``k``'s CT: the bundled one scaled in-plane by 0.8 + 0.08 k (same grid, air outside), mirrored
    left-right for odd ``k``."""
    f = 0.8 + 0.08 * k
    z = ndi.zoom(hu.astype(np.float32), (f, f, 1.0), order=1, cval=-1000.0)
    out = np.full(hu.shape, -1000.0, np.float32)
    n = min(hu.shape[0], z.shape[0])
    a, b = (hu.shape[0] - n) // 2, (z.shape[0] - n) // 2
    out[a : a + n, a : a + n] = z[b : b + n, b : b + n]
    if k % 2:
        out = out[::-1]
    return np.rint(out).astype(np.int32)


def exam(hu: np.ndarray, t: int) -> np.ndarray:
    """Exam ``t`` of a subject: the body one slice higher per exam (breathing, positioning)."""
    return np.roll(hu, t, axis=2)


def sharp(hu: np.ndarray, seed: int) -> np.ndarray:
    """The same acquisition reconstructed with a sharper kernel: +-15 HU of noise inside the scan."""
    rng = np.random.default_rng(seed)
    out = hu + np.rint(rng.normal(0, 15, hu.shape)).astype(np.int32)
    out[hu <= -1000] = hu[hu <= -1000]
    return out


@pytest.fixture(scope="module")
def small_hu(small_ct_path):
    img = nib.load(str(small_ct_path))
    return np.asarray(img.dataobj).astype(np.int32), img.affine


@pytest.fixture(scope="module")
def nbia15(tmp_path_factory, small_hu):
    """15 series of 6 subjects (2, 3, 2, 3, 2, 2 exams a year apart; the first exam of subject 0 also
    reconstructed with a sharper kernel) written as DICOM; folders root/S<k>/T<t>[-B50f]."""
    from dicom_fixtures import write_ct_series

    hu, A = small_hu
    root = tmp_path_factory.mktemp("nbia15")
    dates = ["19990102", "20000110", "20010115"]
    for k, n_exams in enumerate((2, 3, 2, 3, 2, 2)):
        base = subject_ct(hu, k)
        for t in range(n_exams):
            write_ct_series(root / f"S{k}" / f"T{t}", exam(base, t), A, patient_id=f"2000{k}", study_date=dates[t],
                            seed=t)  # fmt: skip
    write_ct_series(root / "S0" / "T0-B50f", sharp(subject_ct(hu, 0), 9), A, patient_id="20000",
                    study_date=dates[0], kernel="B50f", seed=9)  # fmt: skip
    return root


def _by_source(store_url: str, cohort: str, volumes: dict) -> tuple[dict[str, set], dict[str, set]]:
    """Splits of each source series (folder) and each source subject (S<k>) over all its ingests."""
    series: dict[str, set] = {}
    subjects: dict[str, set] = {}
    for r in open_store(store_url).list_volumes(cohort):
        key = r.source.rstrip("/").split("/")
        series.setdefault("/".join(key[-2:]), set()).add(volumes[r.volume_id]["split"])
        subjects.setdefault(key[-2], set()).add(volumes[r.volume_id]["split"])
    return series, subjects


def test_reingest_with_and_without_the_deid_salt_keeps_each_series_in_one_split(nbia15, tmp_path):
    """The cohort backfilled as it is, then again with a de-identification salt, into one cohort: the copies are
    bound by their exact content; mixing raw and hashed subject ids is refused unless asked for."""
    from xwin.pipeline.ingest import IngestConfig, ingest_sources

    url = str(tmp_path / "s")
    st = open_store(url)
    sources = sorted(str(p) for p in nbia15.glob("*/*"))
    assert len(sources) == 15
    for cfg in (IngestConfig(), IngestConfig(deid_salt="secret")):
        summary = ingest_sources(sources, "nbia", st, cfg)
        assert len(summary.done) == 15 and not summary.rejected, summary
    recs = st.list_volumes("nbia")
    assert len(recs) == 30 and len({r.subject_id for r in recs}) == 12
    # the raw and the de-identified copy of a series hold the same voxels: one exact fingerprint
    fp: dict[str, set] = {}
    for r in recs:
        assert r.fingerprint is not None, r.volume_id
        fp.setdefault(r.source, set()).add(r.fingerprint.exact)
    assert all(len(s) == 1 for s in fp.values()) and len({next(iter(s)) for s in fp.values()}) == 15
    # refused before anything is stored: raw and hashed ids of one person cannot be told apart by id
    frac = "train=0.34,val=0.33,test=0.33"
    res = _cli("splits", "assign", "--store", url, "--cohort", "nbia", "--fractions", frac)
    assert res.exit_code == 2, res.output
    assert "de-identified" in res.output and "--allow-mixed-subject-ids" in res.output
    assert "Traceback" not in res.output and st.read_splits("nbia") is None
    res = _cli("splits", "assign", "--store", url, "--cohort", "nbia", "--fractions", frac, "--json",
               "--allow-mixed-subject-ids")  # fmt: skip
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    series, subjects = _by_source(url, "nbia", body["volumes"])
    assert len(series) == 15 and all(len(s) == 1 for s in series.values()), series
    assert len(subjects) == 6 and all(len(s) == 1 for s in subjects.values()), subjects
    # what was bound and why: each raw subject with its hashed id, by exact copies of its series
    binds = body["bindings"]
    assert len(binds) == 6
    for b in binds:
        assert len(b["subjects"]) == 2 and sum(s.startswith("s-") for s in b["subjects"]) == 1
        assert {link["how"] for link in b["links"]} == {"exact"} and b["conflict"] is None
    # the stored assignment says the same, and the text report names the bindings
    shown = _cli("splits", "show", "--store", url, "--cohort", "nbia")
    assert shown.exit_code == 0 and "6 group(s) bind 12 subjects, one split each" in shown.output, shown.output


def test_one_ct_under_two_patient_ids_is_in_one_split(small_hu, tmp_path):
    """A site re-export: one series under a second patient id (new study and series UIDs). The two ids hash to
    different splits; the copy follows the first id's split, and excluding either id excludes both."""
    from dicom_fixtures import write_ct_series

    from xwin.pipeline.ingest import IngestConfig, ingest_sources

    hu, A = small_hu
    first = "PAT-A"
    other = next(f"PAT-A-{i}" for i in range(100) if split_for(unit_hash(HALF.salt, f"PAT-A-{i}"), HALF.fractions)
                 != split_for(unit_hash(HALF.salt, first), HALF.fractions))  # fmt: skip
    root = tmp_path / "dcm"
    write_ct_series(root / "a", subject_ct(hu, 1), A, patient_id=first)
    write_ct_series(root / "a-export", subject_ct(hu, 1), A, patient_id=other, seed=3)
    write_ct_series(root / "b", subject_ct(hu, 4), A, patient_id="PAT-B")
    url = str(tmp_path / "s")
    st = open_store(url)
    summary = ingest_sources(sorted(str(p) for p in root.iterdir()), "c", st, IngestConfig())
    assert len(summary.done) == 3, summary
    ids = {r.subject_id: r.volume_id for r in st.list_volumes("c")}
    res = _cli("splits", "assign", "--store", url, "--cohort", "c", "--fractions", "train=0.5,test=0.5", "--json")
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    vols = body["volumes"]
    assert vols[ids[first]]["split"] == vols[ids[other]]["split"]
    assert body["subjects"][other] == body["subjects"][first]
    (b,) = body["bindings"]
    assert b["subjects"] == sorted([first, other])
    assert [(sorted(x["volumes"]), x["how"], x["score"]) for x in b["links"]] == [
        (sorted([ids[first], ids[other]]), "exact", 1.0)
    ]
    # keeping one id out of every split keeps its copy out too
    ex = tmp_path / "exclude.txt"
    ex.write_text(f"{first}\n")
    res = _cli("splits", "assign", "--store", url, "--cohort", "c", "--exclude", str(ex), "--json")
    assert res.exit_code == 0, res.output
    vols = json.loads(res.stdout)["volumes"]
    assert vols[ids[first]]["split"] == vols[ids[other]]["split"] == "excluded"
    assert vols[ids["PAT-B"]]["split"] != "excluded"


def test_near_duplicate_reconstruction_across_subjects(small_hu, tmp_path):
    """A second reconstruction (sharper kernel, other voxels) of one acquisition under another subject is bound to
    the first by its near-duplicate descriptor; different subjects are not bound."""
    from dicom_fixtures import write_ct_series

    from xwin.pipeline.ingest import IngestConfig, ingest_sources

    hu, A = small_hu
    first = "PAT-N"
    other = next(f"PAT-M-{i}" for i in range(100) if split_for(unit_hash(HALF.salt, f"PAT-M-{i}"), HALF.fractions)
                 != split_for(unit_hash(HALF.salt, first), HALF.fractions))  # fmt: skip
    root = tmp_path / "dcm"
    base = subject_ct(hu, 2)
    write_ct_series(root / "n", base, A, patient_id=first)
    write_ct_series(root / "n-sharp", sharp(base, 5), A, patient_id=other, kernel="B50f", seed=5)
    for k in (0, 1, 3, 4, 5):  # other people
        write_ct_series(root / f"p{k}", subject_ct(hu, k), A, patient_id=f"PAT-{k}", seed=k)
    url = str(tmp_path / "s")
    st = open_store(url)
    summary = ingest_sources(sorted(str(p) for p in root.iterdir()), "c", st, IngestConfig())
    assert len(summary.done) == 7, summary
    recs = {r.subject_id: r for r in st.list_volumes("c")}
    assert recs[first].fingerprint.exact != recs[other].fingerprint.exact  # not the same voxels
    res = _cli("splits", "assign", "--store", url, "--cohort", "c", "--fractions", "train=0.5,test=0.5", "--json")
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    vols = body["volumes"]
    assert vols[recs[first].volume_id]["split"] == vols[recs[other].volume_id]["split"]
    (b,) = body["bindings"]  # only the two reconstructions: the other people stay apart
    assert b["subjects"] == sorted([first, other])
    (link,) = b["links"]
    assert link["how"] == "near" and link["score"] >= 0.97
    # the HU of the two reconstructions correlate as one acquisition's do (an independent measure)
    from xwin.pipeline.ingest.qc import duplicate_score

    (_, hu_a), (_, hu_b) = st.read_volume(recs[first].volume_id), st.read_volume(recs[other].volume_id)
    assert duplicate_score(hu_a, np.asarray(recs[first].affine), hu_b, np.asarray(recs[other].affine)) > 0.95


# ---- the fingerprint itself -----------------------------------------------------------------------------------
def test_exact_fingerprint_is_sha256_of_shape_spacing_and_voxels(small_hu):
    from xwin.pipeline.ingest.fingerprint import content_fingerprint, similarity

    hu, A = small_hu
    vol = subject_ct(hu, 3).astype(np.int16)
    fp = content_fingerprint(vol, A)
    spacing = np.sqrt((np.asarray(A)[:3, :3] ** 2).sum(0))
    h = hashlib.sha256()
    h.update(json.dumps([list(vol.shape), [round(float(s), 4) for s in spacing]]).encode())
    h.update(np.ascontiguousarray(vol, dtype="<i2").tobytes())
    assert fp.exact == "sha256:" + h.hexdigest()
    # one voxel changed: another exact fingerprint, the same near-duplicate descriptor within rounding
    vol2 = vol.copy()
    vol2[10, 10, 10] += 1
    fp2 = content_fingerprint(vol2, A)
    assert fp2.exact != fp.exact and similarity(fp2, fp) > 0.999
    # another subject is far below the threshold; a 5 mm -> 10 mm slice reconstruction of the same scan is not
    other = content_fingerprint(subject_ct(hu, 4).astype(np.int16), A)
    assert similarity(other, fp) < 0.9
    thick = vol[:, :, : vol.shape[2] // 2 * 2].reshape(*vol.shape[:2], -1, 2).mean(-1).round().astype(np.int16)
    A2 = np.asarray(A, float).copy()
    A2[:3, 3] = A2[:3, 3] + 0.5 * A2[:3, 2]
    A2[:3, 2] *= 2
    assert similarity(content_fingerprint(thick, A2), fp) > 0.98
    # a volume too small for the descriptor grid, or uniform, has none (exact matches only)
    assert content_fingerprint(np.zeros((8, 8, 6), np.int16), np.diag([2.0, 2, 3, 1])).near is None


def test_exact_fingerprint_of_an_oblique_grid_is_the_same_from_a_float32_affine():
    """One volume on an oblique grid of 0.78125 mm pixels (a 400 mm field of 512), its affine in float64 (as the
    DICOM reader builds it) and rounded to float32 (as a NIfTI sform stores it): one exact fingerprint."""
    from scipy.spatial.transform import Rotation

    from xwin.pipeline.ingest.fingerprint import content_fingerprint

    vol = np.random.default_rng(0).integers(-1000, 1500, (16, 16, 8)).astype(np.int16)
    rng = np.random.default_rng(1)
    differ = 0
    for _ in range(40):
        A = np.eye(4)
        A[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-0.2, 0.2, 3)).as_matrix() @ np.diag(
            [0.78125, 0.78125, 1.25]
        )
        A32 = A.astype(np.float32).astype(np.float64)
        s64, s32 = (np.sqrt((a[:3, :3] ** 2).sum(0)) for a in (A, A32))
        differ += [round(float(x), 4) for x in s64] != [round(float(x), 4) for x in s32]
        assert content_fingerprint(vol, A).exact == content_fingerprint(vol, A32).exact
    assert differ > 10  # what a single rounding of the spacing to 1e-4 mm would have split


def test_records_without_a_fingerprint_stay_valid():
    from test_storage import make_volume

    from xwin.schemas.ingest import VolumeRecord

    rec, _ = make_volume("old")
    legacy = json.loads(rec.model_dump_json())
    legacy.pop("fingerprint", None)
    assert VolumeRecord.model_validate(legacy).fingerprint is None


# ---- assignment with content groups (pure) -------------------------------------------------------------------
def _unit(rng, d=1728):
    v = rng.normal(size=d)
    return v / np.linalg.norm(v)


def _q(v):
    return np.clip(np.rint(v / v.std() * 32), -127, 127).astype(np.int8)


def test_assignment_binds_groups_and_the_assigned_split_wins():
    rng = np.random.default_rng(0)
    base = [_unit(rng) for _ in range(12)]
    near = base[0] + 0.1 * _unit(rng)  # correlation ~0.995 with base[0]
    facts = [VolumeFacts(f"v{i}", f"P{i}", exact=f"e{i}", near=_q(b)) for i, b in enumerate(base)]
    facts.append(VolumeFacts("w6", "Q6", exact="x6", near=_q(near)))  # near-duplicate of v0 under Q6
    facts.append(VolumeFacts("w7", "Q7", exact="e3", near=_q(base[3])))  # exact copy of v3 under Q7
    first, _ = assign_splits("c", facts[:12], HALF)
    doc, _ = assign_splits("c", facts, HALF, first)
    assert doc.subjects["Q6"] == first.subjects["P0"] and doc.subjects["Q7"] == first.subjects["P3"]
    assert {tuple(b.subjects) for b in doc.bindings} == {("P0", "Q6"), ("P3", "Q7")}
    assert {b.links[0].how for b in doc.bindings} == {"near", "exact"}
    # a new volume that duplicates two subjects assigned to different splits: they keep their splits (an
    # assignment never changes), the new subject takes one of them, and the conflict is reported
    free = [f"P{i}" for i in (1, 2, 4, 5, 6, 7, 8, 9, 10, 11)]
    a, b = next((x, y) for x in free for y in free if first.subjects[x] != first.subjects[y])
    fa, fb = (next(f for f in facts if f.subject == s) for s in (a, b))
    both = [*facts, VolumeFacts("w8", "R8", exact=fa.exact), VolumeFacts("w9", "R8", exact=fb.exact)]
    doc2, _ = assign_splits("c", both, HALF, doc)
    assert doc2.subjects[a] == first.subjects[a] and doc2.subjects[b] == first.subjects[b]
    (bind,) = [x for x in doc2.bindings if "R8" in x.subjects]
    assert bind.conflict and a in bind.conflict and b in bind.conflict
    assert doc2.subjects["R8"] in (first.subjects[a], first.subjects[b])


def test_near_duplicate_search_finds_what_all_pairs_find():
    """The bucketed search against the all-pairs correlation matrix on 3,000 descriptors with 150 planted
    near-duplicates (correlation 0.975-0.999) and a shared anatomy component (unrelated pairs ~0.35)."""
    from xwin.pipeline.neardup import NEAR_MIN, near_pairs

    rng = np.random.default_rng(1)
    n, d = 3000, 1728
    common = _unit(rng, d)
    x = np.stack([0.6 * common + 0.8 * _unit(rng, d) for _ in range(n)])
    src = rng.choice(n, 150, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 150, replace=False)
    for s, t in zip(src, dst):
        rho = rng.uniform(0.975, 0.999)
        x[t] = rho * x[s] + np.sqrt(1 - rho**2) * _unit(rng, d) * np.linalg.norm(x[s])
    q = np.stack([_q(v) for v in x])
    u = q.astype(np.float64)
    u -= u.mean(1, keepdims=True)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = u @ u.T
    iu = np.triu_indices(n, 1)
    truth = {(int(i), int(j)) for i, j in zip(*iu) if c[i, j] >= NEAR_MIN}
    assert len(truth) >= 150
    found = near_pairs(q)
    assert {(i, j) for i, j, _ in found} == truth
    assert all(abs(s - c[i, j]) < 1e-4 for i, j, s in found)


# ---- the card ------------------------------------------------------------------------------------------------
def test_card_reads_the_latest_run_by_time_and_reports_bindings(tmp_path):
    """Two runs of one input: first rejected in a Prefect run (a UUID id), then done in a command-line run (a
    timestamp id, which sorts before the UUID). The card counts the later run's outcome; without a finished_at
    (reports written before it was recorded) the files' modification times order the runs."""
    import os

    from test_storage import make_volume

    from xwin.flows import reports as rep
    from xwin.flows.card import build_card
    from xwin.pipeline.ingest.fingerprint import content_fingerprint, decode_near
    from xwin.pipeline.splits import content_links
    from xwin.schemas.ingest import Rejection, RunEntry, RunSummary

    url = str(tmp_path / "s")
    st = open_store(url)
    for i, subject in enumerate(("P1", "P2", "P3")):
        rec, hu = make_volume(f"v{i}", seed=i % 2)  # v2 holds v0's voxels
        st.write_volume(rec.model_copy(update={"subject_id": subject}), hu)
    reports = rep.reports_url(url)
    rejected = RunSummary(rejected=[Rejection(input="/data/x", reason="qc_truncated", detail="cut")])
    done = RunSummary(done=[RunEntry(input="/data/x", volume_id="v0")])
    prefect_id, cli_id = "f3b1c2d4-9a8e-4c1b-8d7e-0a1b2c3d4e5f", "20260103T120000Z-ab12cd"
    assert cli_id < prefect_id  # string order puts the command-line run first
    rep.write_run_report(reports, prefect_id, rejected, "", {"run_id": prefect_id, "cohort": "c1",
                         "finished_at": "2026-01-02T12:00:00+00:00"})  # fmt: skip
    rep.write_run_report(reports, cli_id, done, "", {"run_id": cli_id, "cohort": "c1",
                         "finished_at": "2026-01-03T12:00:00+00:00"})  # fmt: skip
    assert build_card(st, "c1")["rejections"] == {}
    # the other way round: the UUID run is the later one
    rep.write_run_report(reports, prefect_id, rejected, "", {"run_id": prefect_id, "cohort": "c1",
                         "finished_at": "2026-01-04T12:00:00+00:00"})  # fmt: skip
    assert build_card(st, "c1")["rejections"] == {"qc_truncated": 1}
    # reports without finished_at: by modification time
    for rid, summary, t in ((prefect_id, rejected, 1_700_000_000), (cli_id, done, 1_700_000_100)):
        j, _ = rep.write_run_report(reports, rid, summary, "", {"run_id": rid, "cohort": "c1"})
        os.utime(j, (t, t))
    assert build_card(st, "c1")["rejections"] == {}
    # the bindings of the assignment: v0 and v2 hold one CT under P1 and P3
    facts = []
    for r in st.list_volumes("c1"):
        rec, hu = st.read_volume(r.volume_id)
        fp = content_fingerprint(hu, np.asarray(rec.affine))
        facts.append(VolumeFacts(r.volume_id, r.subject_id, exact=fp.exact, near=decode_near(fp)))
    assert [link.how for link in content_links(facts)] == ["exact"]
    res = _cli("splits", "assign", "--store", url, "--cohort", "c1")
    assert res.exit_code == 0 and "1 group(s) bind 2 subjects" in res.output, res.output
    card = build_card(st, "c1")
    assert card["content_bindings"] == {"groups": 1, "subjects": 2, "exact_links": 1, "near_links": 0,
                                        "conflicts": []}  # fmt: skip
    res = _cli("card", "--store", url, "--cohort", "c1", "--out", str(tmp_path / "card"))
    assert res.exit_code == 0, res.output
    assert "**Bound by content**: 1 group(s) of 2 subjects" in (tmp_path / "card" / "card.md").read_text()


def test_a_thousand_subjects_reingested_under_a_salt_share_their_splits():
    """The cohort at 1,000 subjects, ingested raw and again de-identified (hashed ids, new volume ids, the same
    voxels): every copy lands in its original's split (by subject id alone about a third would not)."""
    from xwin.pipeline.ingest.deid import hashed_subject

    raw = [VolumeFacts(f"v{i:04d}", f"{100000 + i // 2}", exact=f"sha256:{i:04d}") for i in range(2000)]
    salted = [
        VolumeFacts(f"w{i:04d}", hashed_subject(f.subject or "", "salt"), exact=f.exact) for i, f in enumerate(raw)
    ]
    doc, _ = assign_splits("c", raw + salted, SplitPolicy())
    assert all(doc.volumes[a.volume_id].split == doc.volumes[b.volume_id].split for a, b in zip(raw, salted))
    assert len(doc.bindings) == 1000 and all(len(b.subjects) == 2 for b in doc.bindings)
    by_id, _ = assign_splits("c", raw + salted, SplitPolicy(), links=[])
    apart = {
        a.subject for a, b in zip(raw, salted) if by_id.volumes[a.volume_id].split != by_id.volumes[b.volume_id].split
    }
    assert 280 < len(apart) < 400  # what binding prevents: 1 - (0.8^2 + 0.1^2 + 0.1^2) = 34% of the subjects


def test_a_volume_stored_under_a_new_subject_id_brings_the_subject_into_its_split():
    """A volume assigned under one subject id and stored again (same volume id) under another keeps its split; the
    new subject's other volumes, arriving with it or later, join that split instead of the new id's own hash."""
    first, _ = assign_splits("c", [VolumeFacts("v0", "A", exact="e0")], HALF)
    # a new subject id whose own hash puts it in the other split
    new = next(
        f"B{i}" for i in range(100) if split_for(unit_hash(HALF.salt, f"B{i}"), HALF.fractions) != first.subjects["A"]
    )
    rekeyed = [VolumeFacts("v0", new, exact="e0"), VolumeFacts("v1", new, exact="e1")]
    doc, moved = assign_splits("c", rekeyed, HALF, first)
    assert moved == []
    assert doc.volumes["v0"].split == first.subjects["A"] and doc.volumes["v0"].subject == "A"
    assert doc.subjects[new] == first.subjects["A"] and doc.volumes["v1"].split == first.subjects["A"]
    # and a later exam of that subject follows
    later, _ = assign_splits("c", [*rekeyed, VolumeFacts("v2", new, exact="e2")], HALF, doc)
    assert later.volumes["v2"].split == first.subjects["A"]
    # without the earlier assignment the new id would have gone to the other split
    alone, _ = assign_splits("c", rekeyed, HALF)
    assert alone.volumes["v1"].split != first.subjects["A"]
    # excluding the subject by its new id takes out the volume kept under the old one too
    out, moved = assign_splits("c", rekeyed, HALF, first, exclude=[new])
    assert out.volumes["v0"].split == "excluded" and out.volumes["v1"].split == "excluded" and moved == [new]


def test_a_bound_subject_taken_out_of_its_site_groups_split_is_reported():
    """Grouped by site: a new subject whose volume copies an assigned subject's joins that subject's split, away
    from its own site's split; the binding says so instead of breaking the site grouping silently."""
    pol = SplitPolicy(fractions={"train": 0.5, "test": 0.5}, group_by="site")
    first, _ = assign_splits("c", [VolumeFacts("v0", "A", site="S0", exact="e0")], pol)
    other = next(
        f"S{i}"
        for i in range(1, 100)
        if split_for(unit_hash(pol.salt, f"site=S{i}"), pol.fractions) != first.subjects["A"]
    )
    facts = [VolumeFacts("v0", "A", site="S0", exact="e0"), VolumeFacts("w0", "B", site=other, exact="e0")]
    doc, _ = assign_splits("c", facts, pol, first)
    assert doc.subjects["B"] == first.subjects["A"]
    (bind,) = doc.bindings
    assert bind.conflict is not None and "B" in bind.conflict and other in bind.conflict
    # a copy from a site of the same split is no conflict
    same = next(
        f"S{i}"
        for i in range(1, 100)
        if split_for(unit_hash(pol.salt, f"site=S{i}"), pol.fractions) == first.subjects["A"]
    )
    doc2, _ = assign_splits("c", [facts[0], VolumeFacts("w0", "B", site=same, exact="e0")], pol, first)
    assert doc2.bindings[0].conflict is None and doc2.subjects["B"] == first.subjects["A"]


def test_near_search_uses_a_copy_with_a_descriptor_when_the_first_has_none():
    """Exact copies where only a later one (by id) carries a descriptor (the first fingerprinted on an older
    descriptor grid): that copy stands for them in the near-duplicate search."""
    from xwin.pipeline.splits import content_links

    rng = np.random.default_rng(3)
    base = _unit(rng)
    facts = [
        VolumeFacts("a0", "P", exact="e0", near=None),
        VolumeFacts("a1", "Q", exact="e0", near=_q(base)),
        VolumeFacts("b0", "R", exact="e1", near=_q(base + 0.05 * _unit(rng))),
    ]
    links = {(x.volumes, x.how) for x in content_links(facts)}
    assert (("a0", "a1"), "exact") in links and (("a1", "b0"), "near") in links
    doc, _ = assign_splits("c", facts, HALF)
    assert len({doc.volumes[v].split for v in ("a0", "a1", "b0")}) == 1 and len(doc.bindings) == 1


def test_near_duplicate_search_in_a_small_cohort():
    """Two or a few descriptors: the pair is found (centring on the mean of two makes them opposite, which the
    hashing alone never pairs), pairs within one group are not, and the scores are the correlations."""
    from xwin.pipeline.neardup import near_pairs

    rng = np.random.default_rng(5)
    a = _unit(rng)
    b = a + 0.05 * _unit(rng)
    q = np.stack([_q(a), _q(b)])
    (pair,) = near_pairs(q)
    x, y = (v.astype(np.float64) - v.mean() for v in q)
    assert pair[:2] == (0, 1) and abs(pair[2] - x @ y / np.linalg.norm(x) / np.linalg.norm(y)) < 1e-5
    assert near_pairs(q, groups=np.array([7, 7])) == []
    more = np.stack([_q(a), _q(_unit(rng)), _q(b), _q(_unit(rng))])
    assert [p[:2] for p in near_pairs(more)] == [(0, 2)]
