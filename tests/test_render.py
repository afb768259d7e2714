"""Rendering correctness: closed form, DiffDRR conformance, orientation, backend agreement, appearance.

Full-size figures (bundled CT at 256^2 / 512^2) come from bench/bench_render.py (docs/benchmarks.md).
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from xwin.pipeline.geometry import ConeBeamViews, project_points, ring_for_volume, rot_z, volume_center
from xwin.pipeline.render import appearance, available_backends, hu_to_mu, render_ring, render_views, resolve_backend
from xwin.schemas import RenderSpec


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def views_at(spec: RenderSpec, affine, shape, yaws) -> ConeBeamViews:
    """The spec's ring geometry at arbitrary absolute yaws (built with ConeBeamViews.ring)."""
    parts = [
        ring_for_volume(spec.model_copy(update={"yaw_start_deg": float(y), "n_views": 1}), affine, shape) for y in yaws
    ]
    return ConeBeamViews.from_cone_vecs(
        np.concatenate([p.cone_vecs for p in parts]), spec.height, spec.width, np.array(yaws, dtype=float)
    )


# ---------------------------------------------------------------------------------------------- units
def test_hu_to_mu_units_and_clamp():
    hu = np.array([-2048, -1000, 0, 1000, 3000], dtype=np.int16)
    mu = hu_to_mu(hu, 0.02)
    assert mu.dtype == np.float32
    assert np.allclose(mu, [0.0, 0.0, 0.02, 0.04, 0.08])
    with pytest.raises(ValueError):
        hu_to_mu(hu, 0.0)


def test_backend_registry():
    names = available_backends()
    assert {"joseph", "torch", "diffdrr", "rtk"} <= set(names)
    assert resolve_backend("auto") == ("triton" if torch.cuda.is_available() else "joseph")
    assert ("gpu" in names) == torch.cuda.is_available()
    with pytest.raises(ValueError, match="unknown render backend"):
        resolve_backend("nope")


def test_bad_volume_is_a_clear_error():
    g = ring_for_volume(RenderSpec(height=8, width=8, n_views=1), np.eye(4), (4, 4, 4))
    with pytest.raises(ValueError, match="3-D"):
        render_views(np.zeros((4, 4)), np.eye(4), g)
    with pytest.raises(ValueError, match="invertible"):
        render_views(np.zeros((4, 4, 4)), np.zeros((4, 4)), g)


# ---------------------------------------------------------------------------------------------- closed form
def ellipsoid_phantom(shape, affine, centre, radii, R, mu=0.02, ss=3):
    """Partial-volume (ss^3 supersampled) ellipsoid of attenuation ``mu`` on the grid of ``affine``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    M = np.diag(1.0 / np.asarray(radii)) @ R.T  # world offset -> unit-sphere coordinates
    frac = np.zeros(shape, dtype=np.float64)
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    for o in itertools.product(offs, offs, offs):
        w = (idx + np.asarray(o)) @ affine[:3, :3].T + affine[:3, 3] - centre
        q = w @ M.T
        frac += (q * q).sum(-1) <= 1.0
    return (mu * frac / ss**3).astype(np.float32)


def ellipsoid_chords(views: ConeBeamViews, centre, radii, R) -> np.ndarray:
    """(V, H, W) exact chord lengths [mm] of every source->pixel segment through the ellipsoid."""
    M = np.diag(1.0 / np.asarray(radii)) @ R.T
    out = np.zeros((len(views), views.height, views.width))
    for k in range(len(views)):
        d = views.pixel_centres(k) - views.src[k]
        q0 = M @ (views.src[k] - centre)
        qd = d @ M.T
        a = (qd * qd).sum(-1)
        b = 2 * qd @ q0
        c = q0 @ q0 - 1.0
        disc = np.maximum(b * b - 4 * a * c, 0.0)
        out[k] = np.sqrt(disc) / a * np.linalg.norm(d, axis=-1)
    return out


def _oblique_flipped_affine(spacing, shape):
    axis = np.array([1.0, 1.0, 0.3]) / np.linalg.norm([1.0, 1.0, 0.3])
    th = np.deg2rad(25.0)
    Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    Rot = np.eye(3) + np.sin(th) * Kx + (1 - np.cos(th)) * Kx @ Kx
    A = np.eye(4)
    A[:3, :3] = Rot @ np.diag([-spacing[0], spacing[1], spacing[2]])  # flipped first axis, oblique
    A[:3, 3] = -A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + [5.0, -3.0, 2.0]
    return A


@pytest.mark.parametrize("kind", ["ring_flipped_anisotropic", "oblique_flipped"])
def test_ellipsoid_closed_form(kind):
    spacing, shape = (1.0, 0.8, 1.5), (100, 125, 68)
    if kind == "ring_flipped_anisotropic":
        A = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # LAS-like flip, anisotropic voxels
        A[:3, 3] = [60.0, -40.0, 10.0]
    else:
        A = _oblique_flipped_affine(spacing, shape)
    c0 = volume_center(A, shape)
    centre = c0 + np.array([12.0, -8.0, 6.0])  # off-centre
    radii = (30.0, 20.0, 25.0)
    R = rot_z(30.0) @ np.array([[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)], [0, np.sin(0.4), np.cos(0.4)]])
    mu = ellipsoid_phantom(shape, A, centre, radii, R)
    spec = RenderSpec(height=40, width=44, pixel_mm=3.0, n_views=1)
    views = views_at(spec, A, shape, [0.0, 37.0, 90.0, 200.0, 305.0])
    truth = 0.02 * ellipsoid_chords(views, centre, radii, R)
    central = truth >= 0.85 * truth.max(axis=(1, 2), keepdims=True)  # the centre rays
    body = truth >= 0.5 * truth.max(axis=(1, 2), keepdims=True)
    far = ellipsoid_chords(views, centre, np.asarray(radii) + 3.0, R) == 0  # rays > 3 mm from the surface
    assert central.sum() > 5 * 40
    for backend, opts in [("joseph", {}), ("joseph", {"method": "general"}), ("torch", {"device": "cpu"})]:
        img = render_views(mu, A, views, backend=backend, is_mu=True, **opts)
        err = np.abs(img - truth)[central] / truth[central]
        assert err.max() < 0.01, (kind, backend, opts, err.max())
        # over the whole body of the ellipsoid: no bias, small aliasing scatter
        eb = (img - truth)[body] / truth[body]
        assert abs(eb.mean()) < 0.003 and np.abs(eb).mean() < 0.005, (kind, backend, eb.mean())
        # rays that pass the object by more than 2 voxels integrate exactly zero
        assert far.sum() > 1000 and np.all(img[far] == 0.0)


def test_ring_fast_path_equals_general_path(small_ct_path):
    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj), img.affine
    spec = RenderSpec(height=40, width=48, pixel_mm=12.0, n_views=6, yaw_step_deg=67.0, yaw_start_deg=11.0)
    g = ring_for_volume(spec, A, hu.shape)
    fast = render_views(hu, A, g, backend="joseph", method="columns")
    slow = render_views(hu, A, g, backend="joseph", method="general")
    assert rel_l2(fast, slow) < 1e-5


@pytest.mark.parametrize("C", [1, 2, 3])
def test_project_channels_equals_each_channel_alone(small_ct_path, C):
    """C volumes projected in one traversal of the rays (joseph.project_channels, the unrolled two-channel loop and
    the generic one) equal their single-channel projections to the bit, on both kernels, on ring views and on views
    of an oblique, flipped grid."""
    from xwin.pipeline.render import joseph

    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj), np.asarray(img.affine, np.float64)
    rng = np.random.default_rng(C)
    chans = [hu_to_mu(hu), rng.uniform(0.0, 0.05, hu.shape), hu_to_mu(np.flip(hu, 2)) * 2.0][:C]
    vols = np.stack(chans, axis=-1).astype(np.float32)
    spec = RenderSpec(height=30, width=34, pixel_mm=14.0, n_views=3, yaw_step_deg=67.0, yaw_start_deg=11.0)
    Ao = _oblique_flipped_affine((2.8, 2.8, 5.0), hu.shape)
    cases = [(A, ring_for_volume(spec, A, hu.shape), m) for m in ("columns", "general")]
    cases.append((Ao, ring_for_volume(spec, Ao, hu.shape), "general"))
    for aff, views, method in cases:
        got = joseph.project_channels(vols, aff, views, method=method, batch_views=2)
        assert got.shape == (C, 3, 30, 34) and got.dtype == np.float32
        for m in range(C):
            alone = joseph.project(np.ascontiguousarray(vols[..., m]), aff, views, method=method)
            assert float(alone.max()) > 1.0
            np.testing.assert_array_equal(got[m], alone)
    with pytest.raises(ValueError, match="columns"):
        joseph.project_channels(vols, Ao, cases[2][1], method="columns")


# ---------------------------------------------------------------------------------------------- conformance
YAWS = [0.0, 45.0, 90.0, 180.0, 270.0]


@pytest.fixture(scope="module")
def small_ct(small_ct_path):
    img = nib.load(str(small_ct_path))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def conformance_views(small_ct):
    hu, A = small_ct
    spec = RenderSpec(height=96, width=96, pixel_mm=512.0 / 96, n_views=1)
    return views_at(spec, A, hu.shape, YAWS)


@pytest.fixture(scope="module")
def diffdrr_ref(small_ct, conformance_views):
    hu, A = small_ct
    return render_views(hu, A, conformance_views, backend="diffdrr")


@pytest.mark.parametrize("backend", ["joseph", "torch", "triton", "nanodrr"])
def test_conformance_vs_diffdrr(backend, small_ct, conformance_views, diffdrr_ref, monkeypatch):
    hu, A = small_ct
    if backend in ("triton", "nanodrr"):
        pytest.importorskip(backend)
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's CPU interpreter where no GPU is present
    img = render_views(hu, A, conformance_views, backend=backend)
    for k, yaw in enumerate(YAWS):
        e = rel_l2(img[k], diffdrr_ref[k])
        assert e < 0.02, f"{backend} yaw {yaw}: rel L2 {e:.4f} vs DiffDRR"
    # sanity of the values themselves: a chest is ~3-8 mu*mm thick in the middle, air is 0
    assert 2.0 < float(img[0, 48, 48]) < 10.0 and float(img[0, 0, 0]) < 0.5


def test_render_ring_matches_spec(small_ct):
    hu, A = small_ct
    spec = RenderSpec(height=24, width=32, pixel_mm=16.0, n_views=4, yaw_step_deg=90.0)
    imgs, g = render_ring(hu, A, spec, backend="joseph")
    assert imgs.shape == (4, 24, 32) and imgs.dtype == np.float32
    assert np.allclose(g.yaw_deg, [0, 90, 180, 270])
    assert np.allclose(g.cone_vecs, ring_for_volume(spec, A, hu.shape).cone_vecs)
    # opposite views see the same line integrals mirrored left-right up to divergence: totals agree closely
    assert abs(imgs[0].sum() - imgs[2].sum()) / imgs[0].sum() < 0.05


# ---------------------------------------------------------------------------------------------- orientation
def _block_indicator(labels: np.ndarray, ids, factors=(4, 4, 2)) -> np.ndarray:
    a = np.isin(labels, list(ids)).astype(np.float32)
    X, Y, Z = (s - s % f for s, f in zip(a.shape, factors))
    fx, fy, fz = factors
    return a[:X, :Y, :Z].reshape(X // fx, fx, Y // fy, fy, Z // fz, fz).mean(axis=(1, 3, 5))


def _block_affine(affine, factors=(4, 4, 2)):
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] @ np.diag(factors)
    aff[:3, 3] = affine[:3, :3] @ ((np.asarray(factors) - 1) / 2.0) + affine[:3, 3]
    return aff


def _centroid_2d(img):
    rows, cols = np.indices(img.shape)
    w = img.sum()
    return np.array([(rows * img).sum() / w, (cols * img).sum() / w])


def test_orientation_with_bundled_mask(bundled_mask_path):
    m = nib.load(str(bundled_mask_path))
    lab = np.asarray(m.dataobj)
    A = _block_affine(m.affine)
    organs = {"liver": [5], "spleen": [1], "heart": [51], "spine": list(range(32, 44))}  # T1..T12
    vols = {k: _block_indicator(lab, ids) for k, ids in organs.items()}
    spec = RenderSpec(height=64, width=64, pixel_mm=8.0, n_views=4, yaw_step_deg=90.0)
    g = ring_for_volume(spec, A, vols["liver"].shape)
    cent = {}
    for name, v in vols.items():
        img = render_views(v, A, g, backend="joseph", is_mu=True)
        cent[name] = [_centroid_2d(img[k]) for k in range(len(g))]
        # the rendered centroid sits where project_points puts the organ's 3D centroid (every view)
        idx = np.argwhere(v > 0)
        wts = v[v > 0]
        c3 = (A @ np.append((idx * wts[:, None]).sum(0) / wts.sum(), 1.0))[:3]
        for k in range(len(g)):
            assert np.allclose(cent[name][k], project_points(g, k, c3[None])[0], atol=1.0), (name, k)
    mid = (spec.width - 1) / 2
    # frontal (yaw 0): liver on image left, spleen on image right, superior (heart) above the liver
    assert cent["liver"][0][1] < mid < cent["spleen"][0][1]
    assert cent["heart"][0][0] < cent["liver"][0][0]
    # yaw 90 = lateral with the source at patient left: columns run anterior -> posterior
    assert cent["heart"][1][1] < mid < cent["spine"][1][1]
    # yaw 180 (posterior source) mirrors the frontal view left-right
    assert cent["liver"][2][1] > mid > cent["spleen"][2][1]


# ---------------------------------------------------------------------------------------------- appearance
def test_appearance_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    p = rng.gamma(2.0, 1.5, size=(3, 32, 40)).astype(np.float32)
    p[:, :4] = 0.0  # air band
    mm = appearance.minmax(p)
    assert mm.min() == 0.0 and np.allclose(mm.max(axis=(1, 2)), 1.0, atol=1e-6)
    assert np.allclose(appearance.minmax(torch.from_numpy(p)).numpy(), mm, atol=1e-6)
    bl = appearance.beer_lambert(p)
    assert np.allclose(bl, np.exp(-p), rtol=1e-6) and bl[:, :4].min() == 1.0  # air transmits everything
    nl = appearance.neglog_window(p)
    assert nl.dtype == np.float32 and nl.min() >= 0.0 and nl.max() <= 1.0
    assert nl[:, :4].max() == 0.0  # air is black
    # monotone in attenuation: brighter where the line integral is larger (bone bright, lungs dark)
    order = np.argsort(p[0].ravel())
    assert np.all(np.diff(nl[0].ravel()[order]) >= -1e-6)
    assert np.allclose(appearance.neglog_window(torch.from_numpy(p)).numpy(), nl, atol=1e-4)
    fixed = appearance.neglog_window(p, window=(0.0, 10.0))
    assert np.allclose(fixed, np.clip(p / 10.0, 0, 1), atol=1e-5)
    with pytest.raises(ValueError):
        appearance.apply("sepia", p)


def test_project_channels_refuses_a_volume_it_cannot_interpolate():
    """project_channels checks its volume as every entry point does: fewer than 2 voxels along an axis (no
    interpolation cell) or a singular affine is one clear ValueError, not values read from the wrong voxels."""
    from xwin.pipeline.render import joseph

    A = np.diag([2.0, 2.0, 2.0, 1.0])
    views = ring_for_volume(RenderSpec(height=8, width=8, pixel_mm=4.0, n_views=2, yaw_step_deg=90.0), A, (8, 8, 8))
    for shape in [(8, 1, 8), (1, 8, 8), (8, 8, 1)]:
        with pytest.raises(ValueError, match="at least 2 voxels"):
            joseph.project_channels(np.full((*shape, 2), 0.01, np.float32), A, views)
    with pytest.raises(ValueError, match="affine"):
        joseph.project_channels(np.zeros((8, 8, 8, 2), np.float32), np.zeros((4, 4)), views)
