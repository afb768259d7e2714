"""Round trip through an independent projector: RTK, fed only the exported cone_vec rows and the mu volume."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from xwin.pipeline.geometry import ConeBeamViews, project_points, ring_for_volume
from xwin.pipeline.render import hu_to_mu, render_views
from xwin.schemas import RenderSpec

itk = pytest.importorskip("itk")


def rel_l2(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def test_itk_volume_placement_round_trip():
    from xwin.pipeline.render.rtk_backend import itk_image_from_volume, volume_from_itk_image

    A = np.array([[-0.7, 0.0, 0.0, 166.0], [0.0, 0.7, 0.0, -187.6], [0.0, 0.0, 2.5, -340.0], [0, 0, 0, 1.0]])
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = itk_image_from_volume(arr, A)
    back, A2 = volume_from_itk_image(img)
    assert np.array_equal(back, arr) and np.allclose(A2, A)
    # ITK's physical point of index (i, j, k) is affine @ (i, j, k, 1); its value is arr[i, j, k]
    p = img.TransformIndexToPhysicalPoint([3, 1, 4])
    assert np.allclose(list(p), (A @ [3, 1, 4, 1])[:3])
    assert img.GetPixel([3, 1, 4]) == arr[3, 1, 4]


def test_rtk_projection_matrices_match_project_points():
    from xwin.pipeline.render.rtk_backend import rtk_geometry

    spec = RenderSpec(height=20, width=30, pixel_mm=2.0, n_views=5, yaw_step_deg=71.0, yaw_start_deg=13.0)
    g = ring_for_volume(spec, np.eye(4), (10, 10, 10))
    G = rtk_geometry(ConeBeamViews.from_cone_vecs(g.cone_vecs, g.height, g.width))
    pts = np.array([[10.0, 20.0, 30.0], [-5.0, 3.0, 1.0], [40.0, -60.0, -20.0]])
    for k in range(len(g)):
        M = np.asarray(itk.array_from_vnl_matrix(G.GetMatrix(k).GetVnlMatrix().as_matrix()))
        h = M @ np.c_[pts, np.ones(len(pts))].T
        col_row = (h[:2] / h[2]).T / spec.pixel_mm  # RTK physical detector coords -> pixel index
        assert np.allclose(col_row[:, ::-1], project_points(g, k, pts), atol=1e-6)


def _rows_clear_of_axial_faces(views: ConeBeamViews, affine, shape, k: int) -> np.ndarray:
    """(H,) rows whose rays stay between the first and last voxel-centre slices inside the volume.

    RTK's Joseph integrates only between voxel centres (support [0, N-1]); ours (and DiffDRR's Siddon) use the
    voxel box [-1/2, N-1/2]. The two agree exactly away from that half-voxel rim.
    """
    inv = np.linalg.inv(affine)
    s = inv[:3, :3] @ views.src[k] + inv[:3, 3]
    p = views.pixel_centres(k) @ inv[:3, :3].T + inv[:3, 3]  # (H, W, 3)
    d = p - s
    t0 = np.zeros(p.shape[:2])
    t1 = np.ones(p.shape[:2])
    for ax in range(2):  # in-plane box only; z is what we examine
        with np.errstate(divide="ignore"):
            a = (-0.5 - s[ax]) / d[..., ax]
            b = (shape[ax] - 0.5 - s[ax]) / d[..., ax]
        t0 = np.maximum(t0, np.minimum(a, b))
        t1 = np.minimum(t1, np.maximum(a, b))
    z0 = s[2] + t0 * d[..., 2]
    z1 = s[2] + t1 * d[..., 2]
    ok = (np.minimum(z0, z1) >= 0.5) & (np.maximum(z0, z1) <= shape[2] - 1.5)
    return ok.all(axis=1)


def test_rtk_reproduces_joseph_views(small_ct_path):
    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj), img.affine
    spec = RenderSpec(height=64, width=64, pixel_mm=8.0, n_views=5, yaw_step_deg=72.0, yaw_start_deg=9.0)
    g = ring_for_volume(spec, A, hu.shape)
    ours = render_views(hu, A, g, spec.mu_water_per_mm, backend="joseph")
    # RTK sees only what we export: the cone_vec rows and the mu volume with its affine
    exported = ConeBeamViews.from_cone_vecs(g.cone_vecs, spec.height, spec.width)
    mu = hu_to_mu(hu, spec.mu_water_per_mm)
    theirs = render_views(mu, A, exported, backend="rtk", is_mu=True)
    for k in range(len(g)):
        assert rel_l2(theirs[k], ours[k]) < 0.03, k
        rows = _rows_clear_of_axial_faces(g, A, hu.shape, k)
        assert rows.sum() > 0.6 * spec.height
        assert rel_l2(theirs[k][rows], ours[k][rows]) < 0.005, k
