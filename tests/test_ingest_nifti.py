"""NIfTI ingest: canonical RAS frame (vs nibabel), obliquity kept, bad volumes rejected, resampling, stats."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from xwin.pipeline.ingest import IngestConfig, IngestError, hu_stats, load_candidate, plan_inputs
from xwin.schemas.ingest import RejectReason as R

COHORT = "test"


def ingest(path, cfg=None):
    cands, rej = plan_inputs([str(path)], COHORT, cfg)
    assert not rej, rej
    return load_candidate(cands[0])


def reason_of(path, cfg=None):
    cands, rej = plan_inputs([str(path)], COHORT, cfg)
    if rej:
        return rej[0].reason
    with pytest.raises(IngestError) as ei:
        load_candidate(cands[0])
    return ei.value.reason


def rot(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture(scope="module")
def vol():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, (24, 20, 16)).astype(np.int16)
    hu[:3] = -2048  # padding sentinel
    return hu


@pytest.mark.parametrize("codes", ["LAS", "PSR", "IRP", "RAS"])
def test_canonical_matches_nibabel_and_keeps_obliquity(tmp_path, vol, codes):
    """Any axis order/sign, oblique: same voxels and affine as nibabel.as_closest_canonical (padding -> air)."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff

    ornt = axcodes2ornt(codes)
    aff = inv_ornt_aff(ornt, vol.shape)  # voxel -> a frame with these axis codes
    aff = np.diag([0.8, 0.9, 2.0, 1.0]) @ aff
    aff[:3, :3] = rot(12.0, -7.0) @ aff[:3, :3]
    aff[:3, 3] += [10.0, -20.0, 30.0]
    p = tmp_path / f"{codes}.nii.gz"
    nib.save(nib.Nifti1Image(vol, aff), str(p))
    rec, hu = ingest(p)
    ref = nib.as_closest_canonical(nib.load(str(p)))
    np.testing.assert_allclose(rec.affine, ref.affine, atol=1e-5)
    exp = np.asarray(ref.dataobj).astype(np.int16)
    exp[exp <= -2000] = -1000
    np.testing.assert_array_equal(hu, exp)
    assert nib.aff2axcodes(np.asarray(rec.affine)) == ("R", "A", "S")
    np.testing.assert_allclose(
        rec.spacing_mm,
        [0.8, 0.9, 2.0][:3] if codes in ("LAS", "RAS") else np.sqrt((ref.affine[:3, :3] ** 2).sum(0)),
        atol=1e-6,
    )


def test_float_nifti_with_nan_inf_rejected(tmp_path, vol):
    a = vol.astype(np.float32)
    a[5, 5, 5] = np.nan
    a[6, 6, 6] = np.inf
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "nan.nii"))
    assert reason_of(tmp_path / "nan.nii") == R.non_finite_values
    a[5, 5, 5] = a[6, 6, 6] = -500.4
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "ok.nii"))
    _rec, hu = ingest(tmp_path / "ok.nii")
    assert hu.dtype == np.int16 and hu[5, 5, 5] == -500


def test_truncated_and_garbage_nifti(tmp_path, bundled_ct_path, small_ct_path):
    raw = Path(small_ct_path).read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    assert reason_of(tmp_path / "trunc.nii.gz") == R.unreadable_file
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    assert reason_of(tmp_path / "garbage.nii.gz") == R.unreadable_file


def test_shapes(tmp_path, vol):
    nib.save(nib.Nifti1Image(np.stack([vol, vol], -1), np.eye(4)), str(tmp_path / "4d.nii"))
    assert reason_of(tmp_path / "4d.nii") == R.bad_shape
    nib.save(nib.Nifti1Image(vol[..., None], np.eye(4)), str(tmp_path / "4d1.nii"))
    assert ingest(tmp_path / "4d1.nii")[0].shape == vol.shape
    nib.save(nib.Nifti1Image(vol[:, :, 0], np.eye(4)), str(tmp_path / "2d.nii"))
    assert reason_of(tmp_path / "2d.nii") == R.bad_shape


def test_hu_sanity(tmp_path, vol):
    nib.save(nib.Nifti1Image((vol + 1500).astype(np.int16), np.eye(4)), str(tmp_path / "noair.nii"))
    assert reason_of(tmp_path / "noair.nii") == R.hu_out_of_range
    low = vol.copy()
    low[10, 10, 10] = -1500  # below -1200 and not a padding sentinel
    nib.save(nib.Nifti1Image(low, np.eye(4)), str(tmp_path / "low.nii"))
    assert reason_of(tmp_path / "low.nii") == R.hu_out_of_range


def test_resample_to_spacing_linear_field(tmp_path):
    """A field linear in world coordinates resamples exactly (up to rounding) at the new grid's world points."""
    shape = (40, 36, 20)
    aff = np.diag([0.7, 0.7, 2.5, 1.0])
    aff[:3, 3] = [-14.0, -12.0, -25.0]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    field = lambda p: 3.0 * p[:, 0] - 2.0 * p[:, 1] + 5.0 * p[:, 2]  # noqa: E731
    hu = np.rint(field(xyz)).reshape(shape).astype(np.int16)
    hu[0, 0, 0] = -1000  # some air
    nib.save(nib.Nifti1Image(hu, aff), str(tmp_path / "ramp.nii"))
    rec, out = ingest(tmp_path / "ramp.nii", IngestConfig(spacing_mm=(1.4, 1.4, 1.25)))
    assert out.shape == (20, 18, 40)
    np.testing.assert_allclose(rec.spacing_mm, (1.4, 1.4, 1.25))
    A = np.asarray(rec.affine)
    # same field of view centre
    np.testing.assert_allclose(
        A[:3, :3] @ ((np.array(out.shape) - 1) / 2) + A[:3, 3],
        aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3],
        atol=1e-5,
    )  # float32 sform
    ijk2 = np.stack(np.meshgrid(*[np.arange(1, s - 1) for s in out.shape], indexing="ij"), -1).reshape(-1, 3)
    want = field(ijk2 @ A[:3, :3].T + A[:3, 3])
    got = out[tuple(ijk2.T)].astype(float)
    assert np.abs(got - want).max() <= 1.0


def test_hu_stats_exact(vol):
    rng = np.random.default_rng(1)
    a = np.asfortranarray(rng.integers(-1100, 3000, (30, 20, 10)).astype(np.int16))
    s = hu_stats(a)
    assert s.min == a.min() and s.max == a.max()
    assert s.mean == pytest.approx(a.mean()) and s.std == pytest.approx(a.std())
    assert s.p01 == np.percentile(a, 1, method="lower") and s.p99 == np.percentile(a, 99, method="lower")
    assert s.air_fraction == pytest.approx((a <= -950).mean())


def test_example_source(bundled_ct_path):
    cands, rej = plan_inputs(["example"], COHORT)
    assert not rej and cands[0].kind.value == "example"
    rec, _hu = load_candidate(cands[0])
    assert (
        rec.shape == (512, 512, 133) and rec.hu.min == -1024 and nib.aff2axcodes(np.asarray(rec.affine)) == tuple("RAS")
    )
