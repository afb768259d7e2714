"""Real-CXR stream: directory and MIMIC-CXR-JPG layouts, DICOM LUT/MONOCHROME1 handling, bad files skipped."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xwin.training.data import RealCXRStream, read_radiograph


def _phantom(h=96, w=80, seed=0):
    """A chest-like 8-bit image: dark lungs, bright spine, plus noise."""
    rng = np.random.default_rng(seed)
    _y, x = np.mgrid[0:h, 0:w]
    img = 60 + 20 * rng.random((h, w))
    img[np.abs(x - w / 2) < w / 10] = 220  # spine: bright
    return img.astype(np.uint8)


def _write_dicom(path, arr, photometric="MONOCHROME2", window=None):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _ref(arr, size):
    """Independent reference: centre crop, antialiased resize, min-max."""
    h, w = arr.shape
    s = min(h, w)
    a = arr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s].astype(np.float32)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(a)[None, None], size=(size, size), mode="bilinear", antialias=True
    )[0]
    return (t - t.min()) / (t.max() - t.min())


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cxr")
    good = {}
    a = _phantom(seed=1)
    Image.fromarray(a).save(d / "a.png")
    good["a.png"] = a
    b16 = _phantom(seed=2).astype(np.uint16) * 257
    Image.fromarray(b16).save(d / "b16.png")
    good["b16.png"] = b16
    (d / "sub").mkdir()
    c = _phantom(seed=3)
    Image.fromarray(np.stack([c, c, c], -1)).save(d / "sub" / "c_rgb_grey.jpg", quality=100)
    good["sub/c_rgb_grey.jpg"] = None  # lossy: checked for range/shape only
    m = _phantom(seed=4).astype(np.uint16) * 16  # 12-bit
    _write_dicom(d / "m2.dcm", m)
    good["m2.dcm"] = m
    _write_dicom(d / "m1.dcm", 4095 - m, photometric="MONOCHROME1")  # same picture, inverted encoding
    good["m1.dcm"] = m
    # bad ones
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(300))
    (d / "empty.jpg").write_bytes(b"")
    full = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 3])
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(d / "colour.png")
    Image.fromarray(_phantom(20, 30)).save(d / "tiny.png")
    Image.fromarray(np.full((96, 96), 7, np.uint8)).save(d / "blank.png")
    (d / "garbage.dcm").write_bytes(b"not a dicom file at all" * 10)
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d, good


def test_directory_stream_skips_bad_images(cxr_dir, caplog):
    d, good = cxr_dir
    ds = RealCXRStream(d, image_size=32, seed=0)
    with caplog.at_level(logging.WARNING, logger="xwin.training.data.real_cxr"):
        out = list(ds)
    assert sorted(s["path"] for s in out) == sorted(good)
    assert dict(ds.skipped) == {"unreadable": 4, "wrong_channels": 1, "too_small": 1, "blank": 1}
    for name in ("corrupt.png", "empty.jpg", "truncated.png", "colour.png", "tiny.png", "blank.png", "garbage.dcm"):
        assert any(name in r.getMessage() for r in caplog.records), name
    for s in out:
        img = s["image"]
        assert img.shape == (1, 32, 32) and img.dtype == torch.float32
        assert float(img.min()) == 0.0 and float(img.max()) == 1.0
        ref = good[s["path"]]
        if ref is not None:
            torch.testing.assert_close(img, _ref(ref, 32), atol=1e-5, rtol=0)
    # positions of skipped files are consumed too: the epoch still covers all 12 units, state advanced
    assert ds.state_dict()["epoch"] == 1


def test_dicom_luts_and_monochrome1(tmp_path):
    m = _phantom(seed=5).astype(np.uint16) * 16
    _write_dicom(tmp_path / "m1.dcm", 4095 - m, photometric="MONOCHROME1")
    _write_dicom(tmp_path / "w.dcm", m, window=(1000, 1000))
    a = read_radiograph(tmp_path / "m1.dcm")
    # bone (the bright spine in m) must be bright after reading a MONOCHROME1 file
    np.testing.assert_allclose(a - a.min(), m - m.min())
    w = read_radiograph(tmp_path / "w.dcm")
    lin = np.clip((m.astype(np.float64) - (1000 - 0.5)) / 999 + 0.5, 0, 1)  # DICOM linear VOI window, 0..1
    lin = (lin - lin.min()) / (lin.max() - lin.min())
    np.testing.assert_allclose((w - w.min()) / (w.max() - w.min()), lin, atol=2e-3)
    assert np.all(w[m >= 1500] == w.max())  # saturated above the window, like the spine


def test_mimic_layout_filters_views_and_resumes(tmp_path):
    rows = [
        ("d1", "10000032", "50414267", "PA"),
        ("d2", "10000032", "50414267", "LATERAL"),
        ("d3", "10000764", "57375967", "AP"),
        ("d4", "10000764", "57375967", "PA"),
        ("d5", "10000898", "50771383", "AP"),  # listed but its file is missing
        ("d6", "10000898", "50771383", ""),
    ]
    with open(tmp_path / "mimic-cxr-2.0.0-metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows"])
        for i, (dcm, subj, study, view) in enumerate(rows):
            w.writerow([dcm, subj, study, "CHEST", view, 96])
            if dcm != "d5":
                p = tmp_path / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{dcm}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_phantom(seed=10 + i)).save(p)
    full = [(s["position"], s["path"]) for s in RealCXRStream(tmp_path, image_size=16, seed=4)]
    assert sorted(p.rsplit("/", 1)[1] for _, p in full) == ["d1.jpg", "d3.jpg", "d4.jpg"]
    assert all(p.startswith("files/p10/p1000") for _, p in full)
    ds = RealCXRStream(tmp_path, image_size=16, seed=4, views=("AP",))
    assert [s["path"].rsplit("/", 1)[1] for s in ds] == ["d3.jpg"] and ds.skipped["missing"] == 1
    # resume after one sample in a fresh stream: the union is the uninterrupted stream
    ds1 = RealCXRStream(tmp_path, image_size=16, seed=4)
    it = iter(ds1)
    head = [(s["position"], s["path"]) for s in [next(it)]]
    it.close()
    ds2 = RealCXRStream(tmp_path, image_size=16, seed=4)
    ds2.load_state_dict(ds1.state_dict())
    assert head + [(s["position"], s["path"]) for s in ds2] == full
    # a prepared copy keeps the layout: CSV copied, same paths, the missing file reported
    from xwin.training.data.real_prepare import prepare_real_cxr

    rep = prepare_real_cxr(tmp_path, tmp_path / "prep", size=16, workers=1)
    assert (rep["written"], rep["skip_reasons"]) == (3, {"missing": 1})
    assert (tmp_path / "prep" / "mimic-cxr-2.0.0-metadata.csv").is_file()
    assert [
        (s["position"], s["path"]) for s in RealCXRStream(tmp_path / "prep", image_size=16, seed=4, min_size=16)
    ] == full
    with pytest.raises(ValueError, match="jpeg"):
        prepare_real_cxr(tmp_path, tmp_path / "prep_png", size=16, fmt="png")


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_reuse_buffers_without_changing_what_the_consumer_holds(cxr_dir, workers):
    """Real batches are stacked into reused buffers (training/data/buffers.py); batches shortened by skipped images
    included. Every batch, held or not, equals the stream that stacks into fresh memory."""
    from xwin.training.data import make_loader

    d, _ = cxr_dir
    kw = {"image_size": 32, "seed": 0, "batch_size": 2}
    ref = []
    for e in range(3):
        fresh = RealCXRStream(d, reuse_buffers=False, **kw)
        fresh.set_epoch(e)
        ref += [(b["image"].clone(), b["path"]) for b in fresh]
    loader = make_loader(RealCXRStream(d, **kw), num_workers=workers)
    got = [(b["image"].clone(), b["path"]) for b in loader]  # epoch 0: one batch at a time
    held = list(loader) + list(loader)  # epochs 1 and 2: every batch kept
    assert len(got) + len(held) == len(ref) and {len(p) for _, p in ref} == {1, 2}  # some batches are short
    for (img, paths), (rimg, rpaths) in zip(got + [(b["image"], b["path"]) for b in held], ref):
        assert paths == rpaths and torch.equal(img, rimg)
    assert len({b["image"].data_ptr() for b in held}) == len(held)


def test_large_jpegs_decode_at_reduced_scale(tmp_path):
    """A JPEG much larger than the model resolution is decoded at 1/2-1/8 scale (libjpeg DCT scaling), never below
    the requested side; the image equals the full-resolution decode + resize to within JPEG-level differences."""
    big = np.asarray(Image.fromarray(_phantom(250, 210, seed=5)).resize((840, 1000), Image.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    full = read_radiograph(tmp_path / "big.jpg")
    assert full.shape == (1000, 840)
    small = read_radiograph(tmp_path / "big.jpg", min_side=200)
    assert small.shape == (250, 210)  # 1/4: the largest reduction keeping both sides >= 200
    assert read_radiograph(tmp_path / "big.jpg", min_side=300).shape == (500, 420)  # 1/2
    ds = RealCXRStream(tmp_path, image_size=200, seed=0)
    img = ds.sample_at(0)["image"]
    diff = (img - _ref(full, 200)).abs()  # the noisy phantom's pixel noise is near the new Nyquist: filters differ
    assert float(diff.max()) < 0.06 and float(diff.mean()) < 0.01  # (a DRR-like 2544x3056 JPEG at 512²: 0.008 / 0.001)


@pytest.mark.parametrize("fmt,atol", [("png", 1e-4), ("jpeg", 0.05)])
def test_prepared_copy_gives_the_same_images(cxr_dir, tmp_path, fmt, atol):
    """``xwin prepare-cxr``: every image the stream would use, written at S² (16-bit PNG: lossless up to 1/65535;
    8-bit JPEG: quantisation + JPEG error); the images the stream skips are reported with the stream's reasons;
    a rerun keeps what is there."""
    import json

    from typer.testing import CliRunner

    from xwin.flows.cli import app

    d, good = cxr_dir
    dst = tmp_path / "prep"
    res = CliRunner().invoke(app, ["prepare-cxr", str(d), str(dst), "--size", "32", "--format", fmt, "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert (rep["images"], rep["written"], rep["kept"]) == (12, 5, 0)
    assert rep["skip_reasons"] == {"unreadable": 4, "wrong_channels": 1, "too_small": 1, "blank": 1}
    assert json.loads((dst / "prepare-report.json").read_text()) == rep
    src = {s["path"]: s["image"] for s in RealCXRStream(d, image_size=32, seed=0)}
    prep = {s["path"]: s["image"] for s in RealCXRStream(dst, image_size=32, seed=0, min_size=32)}  # S² images
    suffix = ".png" if fmt == "png" else ".jpg"
    assert sorted(prep) == sorted(str(Path(k).with_suffix(suffix)) for k in good)
    for k, img in src.items():
        got = prep[str(Path(k).with_suffix(suffix))]
        assert got.shape == img.shape and float((got - img).abs().max()) < atol
    again = CliRunner().invoke(app, ["prepare-cxr", str(d), str(dst), "--size", "32", "--format", fmt, "--json"])
    assert (json.loads(again.stdout)["written"], json.loads(again.stdout)["kept"]) == (0, 5)
