"""Forward-projected CT labels (pipeline/labels.py): anatomy in the right place, thickness bounded by the body and
equal to an independent projector's, misaligned labelmaps refused, stored with the ring in one commit."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from xwin.pipeline.labels import LabelError, LabelSpec, align_labels, read_labelmap, render_labels
from xwin.schemas import RenderSpec


@pytest.fixture(scope="module")
def ct_and_labels(small_ct_path, bundled_mask_path):
    """The downsampled bundled CT and the bundled TotalSegmentator labelmap on its grid (resampled nearest)."""
    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj).astype(np.int16), img.affine
    lab, laff, names = read_labelmap(bundled_mask_path)
    from xwin.pipeline.ingest.volume import canonical_ras

    hu, A = canonical_ras(hu, A)
    aligned, how = align_labels(lab, laff, hu.shape, A)
    assert how == "resampled"  # the labelmap's grid is the full-resolution one
    return hu, A, aligned, names


def _views(spec, A, shape):
    from xwin.pipeline.geometry import ring_for_volume

    return ring_for_volume(spec, A, shape)


def test_anatomy_lands_where_it_should(ct_and_labels):
    hu, A, lab, names = ct_and_labels
    spec = RenderSpec(height=64, width=64, pixel_mm=7.0, n_views=4, yaw_step_deg=90.0)
    views = _views(spec, A, hu.shape)
    ls = LabelSpec(groups={"liver": ["liver"], "heart": ["heart"], "lungs": ["lung_*"]})
    maps = render_labels(lab, names, A, views, ls, backend="joseph")
    assert maps.shape == (3, 4, 64, 64) and maps.dtype == np.float32
    cols = np.arange(64)

    def centroid_col(m):
        return float((m.sum(0) * cols).sum() / m.sum())

    liver, heart = maps[0], maps[1]
    # yaw 0, frontal, radiological display: the patient's right (liver) on the image's left, the heart to its right
    assert centroid_col(liver[0]) < 32 < centroid_col(heart[0]) + 8
    assert centroid_col(liver[0]) + 5 < centroid_col(heart[0])
    # yaw 90, lateral: left and right project onto each other, so liver and heart overlap in x
    lx, hx = (liver[1].sum(0) > 0.5), (heart[1].sum(0) > 0.5)
    assert (lx & hx).sum() >= 0.5 * min(lx.sum(), hx.sum())
    # lungs are tens of centimetres of tissue at most, and a thickness is never negative
    assert 50 < float(maps[2].max()) < 400 and float(maps.min()) >= 0.0


def test_channels_never_exceed_the_body_and_match_rtk(ct_and_labels):
    from xwin.pipeline.body import body_mask
    from xwin.pipeline.render import render_views

    hu, A, lab, names = ct_and_labels
    spec = RenderSpec(height=48, width=48, pixel_mm=10.0, n_views=3, yaw_step_deg=60.0, yaw_start_deg=10.0)
    views = _views(spec, A, hu.shape)
    ls = LabelSpec()
    maps = render_labels(lab, names, A, views, ls, backend="joseph")
    spacing = tuple(float(s) for s in np.sqrt((A[:3, :3] ** 2).sum(0)))
    body = body_mask(hu, spacing)
    assert np.all(body[lab > 0])  # every labelled voxel lies in the body
    path = render_views(body.astype(np.float32), A, views, backend="joseph", is_mu=True)
    assert np.all(maps.sum(0) <= path + 1e-3), float((maps.sum(0) - path).max())
    # one structure's thickness from RTK's Joseph projector fed the same indicator
    liver = np.isin(lab, ls.channel_ids(names)[ls.channels.index("liver")]).astype(np.float32)
    rtk = render_views(liver, A, views, backend="rtk", is_mu=True)
    ours = maps[ls.channels.index("liver")]
    err = float(np.linalg.norm(ours - rtk) / np.linalg.norm(rtk))
    assert err < 0.02, err


def test_misaligned_labelmap_is_refused(ct_and_labels, tmp_path):
    hu, A, lab, _ = ct_and_labels
    from xwin.pipeline.geometry import rot_z

    tilted = A.copy()
    tilted[:3, :3] = rot_z(20.0) @ A[:3, :3]  # the same grid turned by 20 degrees: another frame
    with pytest.raises(LabelError, match="misaligned"):
        align_labels(lab, tilted, hu.shape, A)
    far = A.copy()
    far[:3, 3] += 5000.0  # same directions, no overlap
    with pytest.raises(LabelError, match="does not overlap"):
        align_labels(lab, far, hu.shape, A)
    with pytest.raises(LabelError, match="no_structures"):
        nib.save(nib.Nifti1Image(lab, A), str(tmp_path / "lab.nii.gz"))
        read_labelmap(tmp_path / "lab.nii.gz")


def test_labels_stored_with_the_ring(ct_and_labels, tmp_path):
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store

    hu, A, lab, names = ct_and_labels
    spec = RenderSpec(height=32, width=32, pixel_mm=14.0, n_views=6, yaw_step_deg=60.0, store_dtype="float32")
    views, geom = render_ring(hu, A, spec, backend="joseph")
    ls = LabelSpec()
    maps = render_labels(lab, names, A, geom, ls, backend="joseph")
    ds = open_store(tmp_path / "s").dataset("c1", spec)
    assert ds.write_ring("v", views, geom.view_meta(), {}, labels=maps, label_channels=ls.channels,
                         label_spec=ls.model_dump()) is True  # fmt: skip
    assert ds.label_channels("v") == ls.channels
    got = ds.read_labels("v", [4, 1])
    np.testing.assert_allclose(got, maps[:, [4, 1]], rtol=1e-3, atol=0.05)  # float16 storage
    assert ds.read_labels("v").shape == (len(ls.channels), 6, 32, 32)
    assert ds.verify().clean
    # corrupting the labels is found by verify
    c = ds.scope.get_commit("v")
    key = next(k for k in ds.store.backend.list(f"{c.path}/labels") if not k.endswith("zarr.json"))
    p = tmp_path / "s" / key
    b = bytearray(p.read_bytes())
    b[len(b) // 3] ^= 0xFF
    p.write_bytes(bytes(b))
    rep = ds.verify()
    assert [i.volume_id for i in rep.corrupt] == ["v"] and "labels" in rep.corrupt[0].reason
    # wrong shapes are refused before anything is written
    with pytest.raises(ValueError, match="channel names"):
        ds.write_ring("w", views, geom.view_meta(), {}, labels=maps, label_channels=ls.channels[:-1])


def test_backfill_with_labels_describe_and_export(tmp_path):
    """The example cohort with its bundled labelmap, end to end through the CLI: the ring is committed with its label
    channels, describe lists them, export writes (C, V, H, W) mm; a labels CSV naming a misaligned labelmap leaves
    the CT rendered without labels and says why in the ring's provenance."""
    import json

    from typer.testing import CliRunner

    from xwin.flows.cli import app
    from xwin.storage import open_store

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"height": 32, "width": 32, "pixel_mm": 16.0, "n_views": 4, "yaw_step_deg": 90.0}))
    store = str(tmp_path / "s")
    run = CliRunner().invoke(app, ["backfill", "--cohort", "example", "--store", store, "--spec", str(spec),
                                   "--labels", "example", "--verify", "deep", "--json"])  # fmt: skip
    assert run.exit_code == 0, run.output
    vid = json.loads(run.stdout[run.stdout.index("{") :])["done"][0]["volume_id"]
    desc = CliRunner().invoke(app, ["describe", "--store", store, "--volume", vid, "--json"])
    assert desc.exit_code == 0, desc.output
    channels = json.loads(desc.stdout)["labels"]
    assert channels == LabelSpec().channels
    out = tmp_path / "labels.npy"
    exp = CliRunner().invoke(app, ["export", "--store", store, "--volume", vid, "--what", "labels", "--out", str(out)])
    assert exp.exit_code == 0, exp.output
    arr = np.load(out)
    assert arr.shape == (len(channels), 4, 32, 32) and arr.dtype == np.float32
    assert arr[channels.index("lungs")].max() > 50 and arr[channels.index("liver")].max() > 20
    # a labelmap that does not fit: the ring is still committed, without labels, and the reason is recorded
    lab, laff, _ = read_labelmap(__import__("xwin.pipeline.example", fromlist=["x"]).example_mask_path())
    from xwin.pipeline.geometry import rot_z

    bad = tmp_path / "bad"
    bad.mkdir()
    turned = laff.copy()
    turned[:3, :3] = rot_z(30.0) @ laff[:3, :3]
    nib.save(nib.Nifti1Image(lab, turned), str(bad / "mask.nii.gz"))
    (bad / "structures.csv").write_text("id,structure\n5,liver\n")
    (tmp_path / "labels.csv").write_text(f"input,labels\nexample,{bad / 'mask.nii.gz'}\n")
    store2 = str(tmp_path / "s2")
    run = CliRunner().invoke(app, ["backfill", "--cohort", "example", "--store", store2, "--spec", str(spec),
                                   "--labels", str(tmp_path / "labels.csv"), "--json"])  # fmt: skip
    assert run.exit_code == 0, run.output
    ds = open_store(store2).find_dataset("example")
    (vid2,) = ds.volume_ids()
    assert ds.label_channels(vid2) == []
    notes = ds.provenance(vid2).get("render_notes") or ds.provenance(vid2).get("notes")
    assert any("refused" in n and "misaligned" in n for n in notes), notes


def test_stream_returns_label_targets(ct_and_labels, tmp_path):
    """XWinStream(labels=True): each sample carries the context's and the targets' label maps, resized like the
    images; they are the stored maps of exactly the views drawn."""
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store
    from xwin.training.data import StoreSource, XWinSampling, XWinStream

    hu, A, lab, names = ct_and_labels
    spec = RenderSpec(height=32, width=32, pixel_mm=14.0, n_views=12, yaw_step_deg=30.0, store_dtype="float32")
    views, geom = render_ring(hu, A, spec, backend="joseph")
    ls = LabelSpec(groups={"lungs": ["lung_*"], "heart": ["heart"]})
    maps = render_labels(lab, names, A, geom, ls, backend="joseph")
    ds = open_store(tmp_path / "s").dataset("c1", spec)
    ds.write_ring("v", views, geom.view_meta(), {}, labels=maps, label_channels=ls.channels)
    stream = XWinStream(
        StoreSource(str(tmp_path / "s"), "c1", spec),
        sampling=XWinSampling(n_targets=3, step_deg=30.0, max_abs_deg=90.0),
        image_size=32,
        seed=0,
        labels=True,
    )
    s = next(iter(stream))
    assert s["context_labels"].shape == (2, 32, 32) and s["target_labels"].shape == (3, 2, 32, 32)
    k0 = spec.view_index(float(s["context_yaw"]))
    np.testing.assert_allclose(s["context_labels"].numpy(), maps[:, k0], rtol=1e-3, atol=0.05)  # float16 storage
    for j, y in enumerate(s["target_yaws"].tolist()):
        np.testing.assert_allclose(s["target_labels"][j].numpy(), maps[:, spec.view_index(y)], rtol=1e-3, atol=0.05)


def _write_seg(path, lab: np.ndarray, A: np.ndarray, segments: dict[int, str]) -> None:
    """A BINARY DICOM Segmentation of ``lab`` (X,Y,Z label ids on the voxel->RAS grid ``A``): one frame per segment
    and slice, written with pydicom (positions and orientation in LPS, as the standard has them)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ A
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    r, c = lps[:3, 0] / dc, lps[:3, 1] / dr
    X, Y, Z = lab.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SegmentationType = "SEG", "BINARY"
    ds.Rows, ds.Columns = Y, X
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    shared = Dataset()
    po, pm = Dataset(), Dataset()
    po.ImageOrientationPatient = [float(x) for x in (*r, *c)]
    pm.PixelSpacing = [float(dr), float(dc)]
    pm.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [po], [pm]
    ds.SharedFunctionalGroupsSequence = [shared]
    segs, frames, planes = [], [], []
    for n, (lid, name) in enumerate(segments.items(), start=1):
        s = Dataset()
        s.SegmentNumber, s.SegmentLabel = n, name
        segs.append(s)
        for k in range(Z):
            f, pp, si = Dataset(), Dataset(), Dataset()
            pp.ImagePositionPatient = [float(x) for x in lps[:3, 3] + k * lps[:3, 2]]
            si.ReferencedSegmentNumber = n
            f.PlanePositionSequence, f.SegmentIdentificationSequence = [pp], [si]
            frames.append(f)
            planes.append((lab[:, :, k] == lid).T)  # (rows = y, cols = x)
    ds.SegmentSequence, ds.PerFrameFunctionalGroupsSequence = segs, frames
    ds.NumberOfFrames = len(frames)
    ds.PixelData = pack_bits(np.stack(planes).astype(np.uint8))
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_seg_input_equals_the_labelmap(ct_and_labels, tmp_path):
    hu, A, lab, names = ct_and_labels
    ids = {next(i for i, n in names.items() if n == want): want for want in ("liver", "heart")}
    _write_seg(tmp_path / "seg.dcm", lab, A, ids)
    seg, saff, snames = read_labelmap(tmp_path / "seg.dcm")
    assert snames == {1: "liver", 2: "heart"}
    aligned, how = align_labels(seg, saff, hu.shape, A)
    assert how == "same grid"
    for n, (lid, _) in enumerate(ids.items(), start=1):
        np.testing.assert_array_equal(aligned == n, lab == lid)


def test_resampling_keeps_the_edge_voxels_and_crop_keeps_the_border():
    """Nearest-neighbour resampling onto a finer grid keeps the labelmap's outer half-voxels (all of a 4^3 block of
    ones stays ones on a 2x grid), and the bounding-box crop gives the same projection as the whole volume for a
    structure touching the volume's border."""
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.pipeline.labels import _crop
    from xwin.pipeline.render import render_views

    A = np.diag([4.0, 4.0, 4.0, 1.0])
    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine[:3, 3] = -1.0  # voxel centres of the 2 mm grid inside the 4 mm voxels: -1, 1, 3, ... , 13
    lab = np.ones((4, 4, 4), np.int16)
    out, how = align_labels(lab, A, (8, 8, 8), fine)
    assert how == "resampled" and out.min() == 1
    vol = np.zeros((20, 20, 20), bool)
    vol[0:6, 5:12, 3:9] = True  # touches the x = 0 face of the volume
    B = np.diag([3.0, 3.0, 3.0, 1.0])
    spec = RenderSpec(height=24, width=24, pixel_mm=6.0, n_views=3, yaw_step_deg=60.0, yaw_start_deg=15.0)
    views = ring_for_volume(spec, B, vol.shape)
    whole = render_views(vol.astype(np.float32), B, views, backend="joseph", is_mu=True)
    sub, sub_aff = _crop(vol, B)
    assert sub.shape[0] == 8  # the margin is added inside the volume only
    np.testing.assert_allclose(render_views(sub, sub_aff, views, backend="joseph", is_mu=True), whole, atol=1e-4)
