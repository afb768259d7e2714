"""DICOM ingest: round trip from the bundled CT, series choice, and one reason code per kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import slab
from dicom_fixtures import (
    LPS,
    STRAY_KINDS,
    rewrite_coronal,
    series_from_nifti,
    write_ct_series,
    write_localizer,
    write_stray,
)
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from xwin.pipeline.ingest import IngestConfig, IngestError, load_candidate, plan_inputs
from xwin.pipeline.ingest.dicom_headers import fast_header, header_from_dataset, read_header
from xwin.schemas.ingest import RejectReason as R
from xwin.schemas.ingest import VolumeRecord

COHORT = "test"


def ingest_one(src, cfg: IngestConfig | None = None):
    cands, rej = plan_inputs([str(src)], COHORT, cfg)
    assert not rej, rej
    assert len(cands) == 1
    return (cands[0], *load_candidate(cands[0]))


def reason_of(src, cfg: IngestConfig | None = None) -> tuple[R, str]:
    """The single rejection reason of ``src``, whether raised at plan or at load."""
    cands, rej = plan_inputs([str(src)], COHORT, cfg)
    if rej:
        assert len(rej) == 1 and not cands, (cands, rej)
        return rej[0].reason, rej[0].detail
    assert len(cands) == 1
    with pytest.raises(IngestError) as ei:
        load_candidate(cands[0])
    return ei.value.reason, ei.value.detail


def world(affine, idx):
    return (np.asarray(affine) @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]


# ---------------------------------------------------------------- acceptance: full-resolution round trip
def test_full_resolution_series_matches_nifti(tmp_path, bundled_ct_path):
    """The 133-slice series written from the bundled CT ingests to the NIfTI's HU values and world geometry."""
    series_from_nifti(bundled_ct_path, tmp_path / "s", kernel="B30f", intercept=-1024.0)
    write_localizer(tmp_path / "s", study_uid=pydicom.dcmread(next((tmp_path / "s").glob("IM*.dcm"))).StudyInstanceUID)
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    _c, rec, hu = ingest_one(tmp_path / "s")
    ref_img = nib.as_closest_canonical(nib.load(str(bundled_ct_path)))  # independent reference: nibabel
    assert rec.kind.value == "dicom" and rec.shape == (512, 512, 133) and hu.dtype == np.int16
    # world geometry: affines equal within 1e-4 mm over the whole grid (corners suffice for an affine)
    corners = np.array([[i, j, k] for i in (0, 511) for j in (0, 511) for k in (0, 132)], float)
    assert np.abs(world(rec.affine, corners) - world(ref_img.affine, corners)).max() < 1e-4
    assert nib.aff2axcodes(np.asarray(rec.affine)) == ("R", "A", "S")
    # voxels: padding (-2048 in the NIfTI) is air; everything else identical
    raw = np.asarray(ref_img.dataobj)
    outside = raw > -2000
    assert outside.sum() > 0.5 * raw.size and (~outside).sum() > 0
    np.testing.assert_array_equal(hu[outside], raw[outside].astype(np.int16))
    assert np.all(hu[~outside] == -1000)
    assert rec.hu.min == -1024 and rec.hu.max == raw.max() and rec.hu.air_fraction > (~outside).mean()
    # the series choice is recorded: chosen axial series, localizer excluded with its reason
    chosen = [s for s in rec.series_choices if s.chosen]
    assert len(chosen) == 1 and chosen[0].n_slices == 133 and chosen[0].kernel == "B30f"
    assert any(s.reason.startswith("localizer") for s in rec.series_choices if not s.chosen)
    assert rec.provenance.input_files == 133 and len(rec.provenance.input_checksum) == 64


# ---------------------------------------------------------------- small series and their variants
@pytest.fixture(scope="module")
def base(small_ct_path):
    """(hu (128, 128, 20) with a circular -2048 FOV padding, RAS affine) from the downsampled CT."""
    hu, aff = slab(small_ct_path, 20, 40)
    yy, xx = np.mgrid[:128, :128]
    hu[((xx - 63.5) ** 2 + (yy - 63.5) ** 2 > 62**2).T] = -2048
    return hu, aff


@pytest.fixture(scope="module")
def expected(base, tmp_path_factory):
    """Reference canonical volume: the same voxels through the NIfTI path (nibabel)."""
    hu, aff = base
    p = tmp_path_factory.mktemp("ref") / "ref.nii.gz"
    nib.save(nib.Nifti1Image(hu, aff), str(p))
    return ingest_one(p)[1:]


@pytest.fixture(scope="module")
def good_dir(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    write_ct_series(d, *base)
    return d


def copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def files_by_position(d: Path) -> list[Path]:
    fs = sorted(d.glob("IM*.dcm"))
    return sorted(fs, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def test_small_series_matches_nifti_and_padding_is_air(good_dir, expected, base):
    _c, rec, hu = ingest_one(good_dir)
    ref_rec, ref = expected
    np.testing.assert_array_equal(hu, ref)
    np.testing.assert_allclose(rec.affine, ref_rec.affine, atol=1e-4)
    assert (hu == -1000).sum() >= (base[0] == -2048).sum()  # padding -> air
    assert hu.min() >= -1024


def test_volume_id_deterministic_and_cheap(good_dir, tmp_path):
    a, _ = plan_inputs([str(good_dir)], COHORT)
    b, _ = plan_inputs([str(good_dir)], COHORT)
    other, _ = plan_inputs([str(good_dir)], "other")
    moved = copy_series(good_dir, tmp_path / "moved")  # same UIDs elsewhere: same series, same id
    m, _ = plan_inputs([str(moved)], COHORT)
    assert a[0].volume_id == b[0].volume_id == m[0].volume_id != other[0].volume_id
    spaced, _ = plan_inputs([str(good_dir)], COHORT, IngestConfig(spacing_mm=(3.0, 3.0, 5.0)))
    assert spaced[0].volume_id != a[0].volume_id  # output settings are part of the identity


def test_fast_header_walker_equals_pydicom(good_dir):
    from pydicom.data import get_testdata_file

    paths = [
        next(good_dir.glob("IM*.dcm")),
        Path(get_testdata_file("CT_small.dcm")),
        Path(get_testdata_file("MR_small_implicit.dcm")),
        Path(get_testdata_file("nested_priv_SQ.dcm")),
        Path(get_testdata_file("rtplan.dcm")),
    ]
    for p in paths:
        ds = pydicom.dcmread(p)
        if "SeriesInstanceUID" not in ds:
            continue
        ref = header_from_dataset(ds, str(p))
        fast, parsed = fast_header(p.read_bytes(), str(p), False)
        assert fast == ref, p.name
        assert read_header(str(p)) == ref, p.name  # header-only read (prefix of the file)
        if "PixelData" in ds:
            raw = p.read_bytes()
            assert raw[parsed.pixel_offset : parsed.pixel_offset + parsed.pixel_length] == ds.PixelData


def test_missing_slice(good_dir, tmp_path):
    d = copy_series(good_dir, tmp_path / "gap")
    files_by_position(d)[9].unlink()
    reason, detail = reason_of(d)
    assert reason == R.missing_slices and "1 slice(s) missing" in detail


def test_duplicate_slices_are_dropped(good_dir, tmp_path, expected):
    d = copy_series(good_dir, tmp_path / "dup")
    fs = files_by_position(d)
    shutil.copy(fs[5], d / "copy_of_slice.dcm")  # the same SOP instance twice
    ds = pydicom.dcmread(fs[7])  # the same position under a new SOP instance UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(d / "dup_position.dcm", enforce_file_format=True)
    c, rec, hu = ingest_one(d)
    np.testing.assert_array_equal(hu, expected[1])
    assert len(c.paths) == 20 and any("duplicat" in n for n in rec.provenance.notes)


def test_localizer_mixed_in_and_localizer_only(good_dir, tmp_path, expected):
    d = copy_series(good_dir, tmp_path / "loc")
    study = pydicom.dcmread(next(d.glob("IM*.dcm"))).StudyInstanceUID
    write_localizer(d, study_uid=study, n=2)
    _c, rec, hu = ingest_one(d)
    np.testing.assert_array_equal(hu, expected[1])
    excluded = [s for s in rec.series_choices if not s.chosen]
    assert len(excluded) == 1 and excluded[0].reason.startswith("localizer")
    only = tmp_path / "loc_only"
    write_localizer(only, study_uid=study, n=2)
    assert reason_of(only)[0] == R.localizer


# ---------------------------------------------------------------- stray images inside a series
STRAY_REASON = {
    "localizer": "localizer",
    "secondary_capture": "not_ct_image",
    "dose_sr": "not_ct_image",
    "coronal": "orientation",
    "size": "size",
}


@pytest.fixture(scope="module")
def good_loaded(good_dir):
    """(candidate, record, hu) of the series without any stray image."""
    return ingest_one(good_dir)


@pytest.mark.parametrize("kind", STRAY_KINDS)
def test_stray_image_left_out_and_recorded(good_dir, good_loaded, expected, tmp_path, kind):
    """An image sharing the SeriesInstanceUID but not in the axial stack (written as the series' first file) is
    left out with its reason; the volume is the one ingested without it, voxel for voxel."""
    d = copy_series(good_dir, tmp_path / kind)
    stray = write_stray(d, kind, like=files_by_position(d)[7])
    assert pydicom.dcmread(stray).SeriesInstanceUID == pydicom.dcmread(files_by_position(d)[0]).SeriesInstanceUID
    c, rec, hu = ingest_one(d)
    ref_c, ref_rec, ref_hu = good_loaded
    np.testing.assert_array_equal(hu, ref_hu)
    np.testing.assert_array_equal(hu, expected[1])  # and the NIfTI reference
    assert rec.shape == ref_rec.shape == (128, 128, 20) and rec.affine == ref_rec.affine
    assert rec.volume_id == ref_rec.volume_id  # identity: the stack's SOP instances only
    assert rec.provenance.input_checksum == ref_rec.provenance.input_checksum and rec.provenance.input_files == 20
    assert str(stray) not in c.paths and sorted(c.paths) == sorted(str(d / Path(p).name) for p in ref_c.paths)
    [ex] = rec.excluded_images
    assert (ex.file, ex.reason.value, ex.sop_uid) == (
        str(stray),
        STRAY_REASON[kind],
        pydicom.dcmread(stray).SOPInstanceUID,
    )
    assert ref_rec.excluded_images == []
    [chosen] = [s for s in rec.series_choices if s.chosen]
    assert chosen.n_slices == 20 and f"1 stray image(s) left out (1 {STRAY_REASON[kind]})" in chosen.reason
    assert any("stray" in n for n in rec.provenance.notes)
    # the record round-trips; a record written before excluded_images existed still validates
    assert VolumeRecord.model_validate_json(rec.model_dump_json()) == rec
    old = rec.model_dump(mode="json")
    del old["excluded_images"]
    assert VolumeRecord.model_validate(old).excluded_images == []


def test_every_stray_kind_at_once_and_details(good_dir, good_loaded, tmp_path):
    d = copy_series(good_dir, tmp_path / "all")
    like = files_by_position(d)[3]
    strays = {k: write_stray(d, k, like=like) for k in STRAY_KINDS}
    _c, rec, hu = ingest_one(d)
    np.testing.assert_array_equal(hu, good_loaded[2])
    got = {e.file: (e.reason.value, e.detail) for e in rec.excluded_images}
    assert [e.file for e in rec.excluded_images] == sorted(got)  # file order
    assert got == {
        str(strays["coronal"]): ("orientation", got[str(strays["coronal"])][1]),
        str(strays["dose_sr"]): (
            "not_ct_image",
            "SOP class X-Ray Radiation Dose SR Storage (1.2.840.10008.5.1.4.1.1.88.67)",
        ),
        str(strays["localizer"]): ("localizer", got[str(strays["localizer"])][1]),
        str(strays["secondary_capture"]): (
            "not_ct_image",
            "SOP class Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)",
        ),
        str(strays["size"]): ("size", "Rows x Columns 64x64 vs the stack's 128x128"),
    }
    assert got[str(strays["coronal"])][1].startswith("ImageOrientationPatient [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]")
    assert "ImageType ORIGINAL/PRIMARY/LOCALIZER" in got[str(strays["localizer"])][1]


def test_axial_stack_wins_over_more_reformats_and_jitter_is_not_a_stray(good_dir, good_loaded, tmp_path):
    """25 coronal reformats sharing the UID of a 20-slice axial series: the axial stack is ingested, the reformats
    recorded. A slice whose orientation is off by only 1e-3 is not a stray: the series stays inconsistent."""
    d = copy_series(good_dir, tmp_path / "reformats")
    slices = files_by_position(d)
    for i in range(25):
        write_stray(d, "coronal", like=slices[i % 20], name=f"COR{i:02d}.dcm")
    _c, rec, hu = ingest_one(d)
    np.testing.assert_array_equal(hu, good_loaded[2])
    assert [e.reason.value for e in rec.excluded_images] == ["orientation"] * 25
    j = copy_series(good_dir, tmp_path / "jitter")
    f = files_by_position(j)[6]
    ds = pydicom.dcmread(f)
    ds.ImageOrientationPatient = [
        f"{float(v) + (1e-3 if i == 1 else 0):.8f}" for i, v in enumerate(ds.ImageOrientationPatient)
    ]
    ds.save_as(f, enforce_file_format=True)
    reason, detail = reason_of(j)
    assert reason == R.inconsistent_geometry and "ImageOrientationPatient differs" in detail


def test_series_of_only_stray_images_is_rejected(good_dir, tmp_path):
    """A same-series localizer pair, or only a screen capture and a dose report: no stack, rejected with why."""
    like = files_by_position(good_dir)[0]
    loc = tmp_path / "loc"
    loc.mkdir()
    write_stray(loc, "localizer", like=like, name="L1.dcm")
    write_stray(loc, "localizer", like=like, name="L2.dcm")
    reason, detail = reason_of(loc)
    assert reason == R.localizer and "ORIGINAL/PRIMARY/LOCALIZER" in detail
    sc = tmp_path / "sc"
    sc.mkdir()
    write_stray(sc, "secondary_capture", like=like)
    write_stray(sc, "dose_sr", like=like)
    reason, detail = reason_of(sc)
    assert reason == R.wrong_modality and "2 stray image(s) (2 not_ct_image; e.g. SOP class" in detail
    write_stray(sc, "localizer", like=like)
    write_stray(sc, "localizer", like=like, name="L2.dcm")
    reason, detail = reason_of(sc)  # as many localizers as other strays: a scout series
    assert reason == R.localizer and "no image of an axial CT stack: 4 stray image(s) (" in detail
    assert "2 localizer" in detail and "2 not_ct_image" in detail and "e.g. localizer/scout (ImageType" in detail
    sc_only = tmp_path / "sc_only"
    sc_only.mkdir()
    for i in range(12):
        write_stray(sc_only, "secondary_capture", like=like, name=f"SC{i}.dcm")
    reason, detail = reason_of(sc_only)
    assert reason == R.wrong_modality and "12 stray image(s) (12 not_ct_image" in detail


def test_chosen_series_fails_to_load_next_ranked_is_ingested(base, tmp_path):
    """The best series (soft kernel) has a slice with truncated pixel data, which only loading finds: the study
    ingests its next-ranked series (sharp kernel), records why, and names both series when both fail."""
    hu, aff = base
    study = pydicom.uid.generate_uid()
    d = tmp_path / "study"
    sharp_hu = np.where(hu > -2000, np.clip(hu + 30, -1024, 3000), hu).astype(np.int16)
    soft = write_ct_series(d, hu, aff, study_uid=study, kernel="B30f", prefix="SOFT")
    sharp = write_ct_series(d, sharp_hu, aff, study_uid=study, kernel="B70f", prefix="SHARP", series_number=3)
    soft_uid, sharp_uid = (pydicom.dcmread(f[0]).SeriesInstanceUID for f in (soft, sharp))
    alone = tmp_path / "sharp_alone"  # the reference: the sharp series by itself
    alone.mkdir()
    for f in sharp:
        shutil.copy(f, alone / f.name)
    ref_c, ref_rec, ref_hu = ingest_one(alone)
    soft[4].write_bytes(soft[4].read_bytes()[:-5000])  # header intact: planning still chooses the soft series

    cands, rej = plan_inputs([str(d)], COHORT)
    assert not rej and cands[0].series_uid == soft_uid
    rec, out = load_candidate(cands[0])  # before: IngestError unreadable_file (pixel data truncated)
    assert [f.series_uid for f in cands[0].fallbacks] == [sharp_uid]
    np.testing.assert_array_equal(out, ref_hu)
    assert (rec.series_uid, rec.volume_id) == (sharp_uid, ref_c.volume_id) and rec.volume_id != cands[0].volume_id
    assert rec.affine == ref_rec.affine and rec.source == str(d)
    why = {s.series_uid: s for s in rec.series_choices}
    assert why[sharp_uid].chosen and not why[soft_uid].chosen
    assert why[soft_uid].reason.startswith("failed to load unreadable_file") and "truncated" in why[soft_uid].reason
    assert any(soft_uid in n and "failed to load" in n for n in rec.provenance.notes)

    sharp[9].write_bytes(sharp[9].read_bytes()[:-5000])  # now both fail: rejected, every series named
    with pytest.raises(IngestError) as ei:
        load_candidate(cands[0])
    assert ei.value.reason == R.unreadable_file and ei.value.series_uid == soft_uid
    assert "(2 tried)" in ei.value.detail and soft_uid in ei.value.detail and sharp_uid in ei.value.detail
    assert ei.value.detail.count("truncated") == 2


def test_two_series_soft_kernel_wins(base, tmp_path, expected):
    d = tmp_path / "two"
    hu, aff = base
    study = pydicom.uid.generate_uid()
    sharp = write_ct_series(
        d,
        np.clip(hu + 30, -2048, 3000).astype(np.int16),
        aff,
        study_uid=study,
        kernel="B70f",
        prefix="SHARP",
        description="lung",
    )
    soft = write_ct_series(d, hu, aff, study_uid=study, kernel="B30f", prefix="SOFT", series_number=3)
    c, rec, out = ingest_one(d)
    assert c.series_uid == pydicom.dcmread(soft[0]).SeriesInstanceUID
    np.testing.assert_array_equal(out, expected[1])
    lower = [s for s in rec.series_choices if not s.chosen]
    assert lower[0].series_uid == pydicom.dcmread(sharp[0]).SeriesInstanceUID and "sharp kernel" in lower[0].reason


def test_thin_slices_beat_more_slices_and_broken_best_falls_back(base, tmp_path):
    """Thin (<= 2.5 mm) first even with fewer slices; a best series with a gap falls back to the next."""
    hu, aff = base
    study = pydicom.uid.generate_uid()
    d = tmp_path / "thin"
    thick = write_ct_series(d, hu, aff, study_uid=study, slice_thickness=5.0, prefix="THICK")  # 20 slices, 5 mm
    thin_aff = aff.copy()
    thin_aff[:3, 2] = aff[:3, 2] / 2.5  # 2 mm steps
    thin = write_ct_series(d, hu[:, :, :12], thin_aff, study_uid=study, prefix="THIN", slice_thickness=2.0)
    c, _ = plan_inputs([str(d)], COHORT)
    assert c[0].series_uid == pydicom.dcmread(thin[0]).SeriesInstanceUID
    thin[5].unlink()  # now the thin series has a gap: the thick one is chosen, the failure recorded
    c, _ = plan_inputs([str(d)], COHORT)
    assert c[0].series_uid == pydicom.dcmread(thick[0]).SeriesInstanceUID
    assert any(s.reason.startswith("failed validation missing_slices") for s in c[0].series_choices)


def test_gantry_tilt_resampled_or_rejected(base, tmp_path, expected):
    """Slice k shifted by k rows (positions sheared along the column direction): resampling restores the volume."""
    from dicom_fixtures import standard_orientation

    hu, aff = base

    shu, saff = standard_orientation(hu, aff)
    slps = LPS @ saff
    c_dir = slps[:3, 1] / np.linalg.norm(slps[:3, 1])
    dr = np.linalg.norm(slps[:3, 1])
    Z = hu.shape[2]
    tilted = np.full_like(shu, -2048)
    for k in range(Z):  # written slice k row i = true slice k row i + k
        tilted[:, : hu.shape[1] - k, k] = shu[:, k:, k]
    pos = np.array([slps[:3, 3] + k * slps[:3, 2] + k * dr * c_dir for k in range(Z)])
    d = tmp_path / "tilt"
    write_ct_series(
        d, tilted, saff, positions_lps=pos, gantry_tilt=float(np.degrees(np.arctan(dr / 5.0))), standard=False
    )
    _c, rec, out = ingest_one(d)
    ref_rec, ref = expected
    np.testing.assert_allclose(rec.affine, ref_rec.affine, atol=1e-4)
    # rows that stayed inside the written field of view are exact; the rest is air
    canon_valid = np.zeros(hu.shape, bool)
    for k in range(Z):
        canon_valid[:, k:, k] = True  # true rows >= k were inside the written slice (standard LPS row order)
    canon_valid = canon_valid[::-1, ::-1, :]  # standard orientation -> RAS canonical flips x and y
    np.testing.assert_array_equal(out[canon_valid], ref[canon_valid])
    assert any("gantry tilt" in n for n in rec.provenance.notes)
    assert (out[~canon_valid] == -1000).mean() > 0.9  # shifted-out rows are air (linear edge aside)
    assert reason_of(d, IngestConfig(tilt="reject"))[0] == R.gantry_tilt


def test_nonuniform_spacing(base, tmp_path):
    hu, aff = base
    lps = LPS @ aff
    steps = np.where(np.arange(hu.shape[2]) % 2 == 0, 4.5, 5.5)
    zs = np.concatenate([[0.0], np.cumsum(steps[:-1])])
    pos = np.array([lps[:3, 3] + z * lps[:3, 2] / np.linalg.norm(lps[:3, 2]) for z in zs])
    d = tmp_path / "nonuni"
    write_ct_series(d, hu, aff, positions_lps=pos, standard=False)
    assert reason_of(d)[0] == R.nonuniform_spacing


def test_truncated_files(good_dir, tmp_path):
    d = copy_series(good_dir, tmp_path / "trunc_pixels")
    f = files_by_position(d)[4]
    f.write_bytes(f.read_bytes()[:-5000])  # header intact, pixel data cut
    reason, detail = reason_of(d)
    assert reason == R.unreadable_file and "truncated" in detail
    d2 = copy_series(good_dir, tmp_path / "trunc_header")
    f = files_by_position(d2)[4]
    f.write_bytes(f.read_bytes()[:300])  # cut inside the header: that slice is lost
    assert reason_of(d2)[0] == R.unreadable_file


def test_wrong_modality_and_not_axial(base, tmp_path):
    d = tmp_path / "mr"
    write_ct_series(d, *base, modality="MR")
    assert reason_of(d)[0] == R.wrong_modality
    d2 = tmp_path / "cor"
    rewrite_coronal(write_ct_series(d2, *base))
    assert reason_of(d2)[0] == R.not_axial


def test_undecodable_transfer_syntaxes(base, tmp_path):
    hu, aff = base
    d = tmp_path / "jls"  # JPEG-LS: no decoder installed -> rejected while planning, before any pixel
    write_ct_series(d, hu, aff, transfer_syntax=JPEGLSLossless, garbage_pixels=True)
    cands, rej = plan_inputs([str(d)], COHORT)
    assert not cands and rej[0].reason == R.undecodable_pixels and "JPEG-LS" in rej[0].detail
    d2 = tmp_path / "j2k_garbage"  # JPEG 2000 has a decoder, the codestream is garbage -> rejected at load
    write_ct_series(d2, hu, aff, transfer_syntax=JPEG2000Lossless, garbage_pixels=True)
    assert reason_of(d2)[0] == R.undecodable_pixels


def test_real_jpeg2000_series_decodes(base, tmp_path, expected):
    d = tmp_path / "j2k"
    write_ct_series(d, *base, transfer_syntax=JPEG2000Lossless)
    assert pydicom.dcmread(next(d.glob("*.dcm"))).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(ingest_one(d)[2], expected[1])


def test_unscaled_values_are_not_hu(base, tmp_path):
    hu, aff = base
    d = tmp_path / "norescale"  # stored = HU + 1024 but RescaleIntercept 0: no air anywhere
    write_ct_series(d, (hu + 1024).clip(0).astype(np.int16), aff, intercept=0.0, padding_hu=0)
    assert reason_of(d)[0] == R.hu_out_of_range


def test_rescale_slope_and_unsigned_storage(base, tmp_path, expected):
    hu, aff = base
    d = tmp_path / "slope"  # stored = (HU + 2048) / 0.5, unsigned, PixelPaddingValue 0
    write_ct_series(d, hu, aff, slope=0.5, intercept=-2048.0)
    ds = pydicom.dcmread(next(d.glob("*.dcm")))
    assert ds.PixelRepresentation == 0 and ds.PixelPaddingValue == 0
    np.testing.assert_array_equal(ingest_one(d)[2], expected[1])


def test_empty_junk_missing_and_two_studies(base, tmp_path):
    (tmp_path / "empty").mkdir()
    assert reason_of(tmp_path / "empty")[0] == R.empty_input
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    (tmp_path / "junk" / "IMG0001").write_bytes(b"\x00" * 1000)
    assert reason_of(tmp_path / "junk")[0] == R.empty_input
    assert reason_of(tmp_path / "nope")[0] == R.not_found
    d = tmp_path / "studies"
    hu, aff = base
    write_ct_series(d / "a", hu, aff, patient_id="P1")
    write_ct_series(d / "b", hu, aff, patient_id="P2", intercept=-1000.0)
    cands, rej = plan_inputs([str(d)], COHORT)
    assert not rej and len(cands) == 2 and all("#" in c.input for c in cands)
    assert {c.subject_id for c in cands} == {"P1", "P2"} and len({c.volume_id for c in cands}) == 2
