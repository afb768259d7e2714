"""Phantom cohort (pipeline/phantoms.py, `xwin phantoms`): determinism, nodules where and as large as recorded."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from xwin.pipeline.phantoms import (
    LUNG_LEFT,
    LUNG_RIGHT,
    NODULE_ID,
    PhantomConfig,
    load_anatomy,
    make_phantom,
    nodule_subjects,
    read_truth,
    write_cohort,
)

DS = (4, 4, 2)  # 128 x 128 x 66 voxels of 2.8 x 2.8 x 5 mm: a few seconds per subject


@pytest.fixture(scope="module")
def anatomy():
    return load_anatomy(DS)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, anatomy):
    out = tmp_path_factory.mktemp("phantoms") / "cohort"
    cfg = PhantomConfig(n=4, seed=3, downsample=DS)
    rows = write_cohort(out, cfg, anatomy)
    return out, cfg, rows


def test_half_the_subjects_have_a_nodule():
    for n in (4, 5, 48):
        cfg = PhantomConfig(n=n, seed=1)
        k = nodule_subjects(cfg)
        assert len(k) == round(n / 2) and k <= set(range(n))
    assert nodule_subjects(PhantomConfig(n=48, seed=1)) != nodule_subjects(PhantomConfig(n=48, seed=2))
    assert nodule_subjects(PhantomConfig(n=10, nodule_fraction=0.0)) == set()


def test_deterministic_from_the_seed(anatomy):
    cfg = PhantomConfig(n=2, seed=7, downsample=DS)
    a = make_phantom(anatomy, 1, cfg, True)
    b = make_phantom(anatomy, 1, cfg, True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = make_phantom(anatomy, 1, PhantomConfig(n=2, seed=8, downsample=DS), True)
    assert not np.array_equal(a[0], c[0]) and a[2]["scale_x"] != c[2]["scale_x"]
    d = make_phantom(anatomy, 0, cfg, True)  # another subject of the same cohort
    assert not np.array_equal(a[0], d[0])


def test_variations_change_the_anatomy_within_their_ranges(anatomy):
    cfg = PhantomConfig(n=1, seed=0, downsample=DS)
    hu, labels, row = make_phantom(anatomy, 0, cfg, False)
    base_body = (anatomy.hu > -500).sum()
    body = (hu > -500).sum()
    # the body's cross-section scales with scale_x * scale_y (the body axis: scale_z, cut at the volume's ends)
    assert body / base_body == pytest.approx(row["scale_x"] * row["scale_y"], rel=0.12)
    assert 0.9 <= row["scale_x"] <= 1.1 and abs(row["rotation_deg"]) <= 4 and abs(row["breath_mm"]) <= 8
    # the liver's HU moves by the recorded offset (its voxels, eroded away from the edges, before and after)
    from scipy.ndimage import binary_erosion

    liver0 = binary_erosion(anatomy.labels == 5, iterations=2)
    liver1 = binary_erosion(labels == 5, iterations=2)
    shift = float(np.median(hu[liver1])) - float(np.median(anatomy.hu[liver0]))
    assert shift == pytest.approx(row["liver_hu"], abs=6.0)
    assert NODULE_ID not in labels and row["nodule"] == 0 and row["nodule_diameter_mm"] == ""


def test_nodules_sit_inside_the_lung_at_the_recorded_place_and_size(cohort):
    out, _cfg, _rows = cohort
    truth = read_truth(out / "truth.csv")
    assert [r["subject"] for r in truth] == ["s000", "s001", "s002", "s003"]
    assert sum(int(r["nodule"]) for r in truth) == 2
    meta = json.loads((out / "cohort.json").read_text())
    assert "not a population" in meta["what"] and meta["with_nodule"] == 2
    for r in truth:
        ct = nib.load(str(out / r["ct"]))
        lab_img = nib.load(str(out / r["labels"]))
        hu = np.asarray(ct.dataobj)
        lab = np.asarray(lab_img.dataobj)
        assert hu.dtype == np.int16 and lab.dtype == np.uint8 and np.allclose(ct.affine, lab_img.affine)
        if r["nodule"] == "0":
            assert not (lab == NODULE_ID).any() and r["nodule_side"] == ""
            continue
        ijk = np.array([int(r["nodule_i"]), int(r["nodule_j"]), int(r["nodule_k"])])
        xyz = np.array([float(r["nodule_x_mm"]), float(r["nodule_y_mm"]), float(r["nodule_z_mm"])])
        np.testing.assert_allclose(ct.affine[:3, :3] @ ijk + ct.affine[:3, 3], xyz, atol=1e-3)
        assert lab[tuple(ijk)] == NODULE_ID
        assert abs(int(hu[tuple(ijk)]) - float(r["nodule_hu"])) <= 1
        # every voxel labelled nodule lies within the recorded radius of the recorded centre, and the labelled
        # volume is the ball's (voxel counting: within 25% at 2.8 x 2.8 x 5 mm voxels)
        sp = np.sqrt((ct.affine[:3, :3] ** 2).sum(0))
        idx = np.argwhere(lab == NODULE_ID)
        dist = np.sqrt((((idx - ijk) * sp) ** 2).sum(1))
        rad = float(r["nodule_diameter_mm"]) / 2
        assert dist.max() <= rad + 1e-6
        assert len(idx) * np.prod(sp) == pytest.approx(4 / 3 * math.pi * rad**3, rel=0.25)
        # inside the lung of the recorded side: a shell 1-2 mm outside the ball is all that lung's labels, air-dark
        g = np.argwhere(np.ones(lab.shape, bool)[tuple(slice(max(i - 12, 0), i + 13) for i in ijk)])
        g = g + np.maximum(ijk - 12, 0)
        dg = np.sqrt((((g - ijk) * sp) ** 2).sum(1))
        shell = g[(dg > rad + 1.0) & (dg <= rad + 2.0)]
        assert len(shell) > 0
        side_ids = LUNG_LEFT if r["nodule_side"] == "left" else LUNG_RIGHT
        assert np.isin(lab[tuple(shell.T)], side_ids).all()
        assert np.median(hu[tuple(shell.T)]) < -500 and float(r["nodule_diameter_mm"]) >= 10 * 0.8**3


def test_write_cohort_files_and_refuses_an_existing_cohort(cohort, anatomy):
    out, cfg, _rows = cohort
    lines = (out / "labels.csv").read_text().splitlines()
    assert lines[0] == "input,labels" and len(lines) == 5 and lines[1].endswith("labels/s000.nii.gz")
    table = (out / "labels" / "s001.csv").read_text().splitlines()
    assert table[0] == "group,original_idx,structure,id" and table[-1] == f"lesions,{NODULE_ID},lung_nodule,{NODULE_ID}"
    with pytest.raises(FileExistsError):
        write_cohort(out, cfg, anatomy)


def test_cli_phantoms(tmp_path):
    from typer.testing import CliRunner

    from xwin.flows.cli import app

    res = CliRunner().invoke(app, ["phantoms", "--n", "2", "--seed", "0", "--downsample", "4,4,2", "--out",
                                   str(tmp_path / "c"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["subject"] for r in rep["subjects"]] == ["s000", "s001"] and sum(
        r["nodule"] for r in rep["subjects"]
    ) == 1
    again = CliRunner().invoke(app, ["phantoms", "--n", "2", "--downsample", "4,4,2", "--out", str(tmp_path / "c")])
    assert again.exit_code == 2 and "already holds a phantom cohort" in again.output
    bad = CliRunner().invoke(app, ["phantoms", "--n", "2", "--downsample", "4,x", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "--downsample" in bad.output and not (tmp_path / "d").exists()
