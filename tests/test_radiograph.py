"""Radiograph looks (pipeline/radiograph.py) against independent references: the lookup table against the
per-energy sum on stored bases, the two-material bases against a per-energy render of the voxels, a water phantom
against spectrum-weighted Beer-Lambert from spekpy and xraydb, noise against Poisson statistics, and the contrast
and lung appearance a chest radiograph has."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from xwin.pipeline import radiograph as R
from xwin.pipeline.materials import render_materials
from xwin.schemas import RenderSpec
from xwin.schemas.look import Look


@pytest.fixture(scope="module")
def small_ct(small_ct_path):
    from xwin.pipeline.ingest.volume import canonical_ras

    img = nib.load(str(small_ct_path))
    return canonical_ras(np.asarray(img.dataobj).astype(np.int16), img.affine)


@pytest.fixture(scope="module")
def stored_bases(small_ct, tmp_path_factory):
    """Bases of the downsampled bundled CT (frontal and lateral, 48 x 48 at 8 mm) written to a store and read back
    (float16), with their views."""
    from xwin.pipeline.materials import render_ring_materials
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store

    hu, A = small_ct
    spec = RenderSpec(height=48, width=48, pixel_mm=8.0, n_views=2, yaw_step_deg=90.0, materials=True)
    views, geom = render_ring(hu, A, spec, backend="joseph")
    bases = render_ring_materials(hu, A, spec, geom, backend="joseph")
    ds = open_store(tmp_path_factory.mktemp("rg") / "s").dataset("c", spec)
    ds.write_ring("v", views, geom.view_meta(), {}, materials=bases)
    return ds.read_materials("v"), geom, spec


def _closed_form_water(kvp: float, filt: float, mm: float) -> float:
    """Energy-integrating transmission through ``mm`` of water: spekpy spectrum, xraydb's water, weights f * E."""
    import spekpy
    import xraydb

    s = spekpy.Spek(kvp=kvp, th=12)
    s.filter("Al", filt)
    e, f = s.get_spectrum()
    mu = xraydb.material_mu("water", e * 1e3, density=1.0)  # 1/cm
    w = f * e
    return float((w * np.exp(-mu * mm / 10.0)).sum() / w.sum())


@pytest.mark.parametrize("look", [Look(kvp=70), Look(kvp=120, filtration_mm_al=4.0), Look(kvp=90, detector_csi_mm=0.6)])
def test_lut_equals_per_energy_sum_on_stored_bases(stored_bases, look):
    bases, _, _ = stored_bases
    lut = R.lut(look)
    got = lut(bases[0], bases[1])
    want = R.transmission_direct(bases[0], bases[1], R.beam(look))
    assert float(np.abs(got / want - 1).max()) <= 0.005
    # the noiseless transmission output is exactly the table
    np.testing.assert_array_equal(R.radiograph(bases, look, pixel_mm=8.0), got)


@pytest.mark.parametrize("look", [Look(kvp=40, filtration_mm_al=0.0), Look(kvp=150, filtration_mm_al=0.0)])
def test_lut_near_zero_density_with_an_unfiltered_spectrum(look):
    """An unfiltered tube's lowest energies die within hundredths of a g/cm^2, where -ln T bends sharply: skin,
    air gaps and the body's edge. The table against the per-energy sum on thin and thick paths of both bases."""
    soft = np.r_[np.geomspace(1e-4, 1.0, 60), np.linspace(1.0, 60.0, 40)]
    bone = np.r_[0.0, np.geomspace(1e-4, 0.5, 20), np.linspace(0.5, 20.0, 20)]
    s, b = (x.ravel() for x in np.meshgrid(soft, bone, indexing="ij"))
    want = -np.log(R.transmission_direct(s, b, R.beam(look)))
    got = R.lut(look).neglog(s.astype(np.float32), b.astype(np.float32)).astype(np.float64)
    assert float(np.abs(got - want).max()) <= 2e-3


def test_two_material_bases_equal_a_per_energy_render_of_the_voxels(small_ct, stored_bases):
    """The radiograph from the stored (float16) bases against rendering, at every energy bin of the spectrum, the
    voxels' linear attenuation mu(E) [1/mm] (xraydb's material_mu of water and of cortical bone by its formula,
    densities from the documented model) and summing the spectrum-weighted exp(-line integral)."""
    import xraydb

    from xwin.pipeline.render import render_views

    hu, A = small_ct
    bases, geom, spec = stored_bases
    look = Look(kvp=80, filtration_mm_al=2.5)
    e, f = R.spectrum(80.0, 2.5, 12.0)
    w = f * e
    w = w / w.sum()
    h = hu.astype(np.float64)
    frac = np.clip((h - 100.0) / 1500.0, 0.0, None)
    rho_soft = np.where(h <= 100.0, np.clip(1.0 + h / 1000.0, 0.0, None), np.clip(1.0 - frac, 0, None) * 1.1)
    rho_bone = 1.92 * frac
    # ICRU-44 cortical bone as a formula: moles of each element per 100 g
    frac_mass = {"H": 3.4, "C": 15.5, "N": 4.2, "O": 43.5, "Na": 0.1, "Mg": 0.2, "P": 10.3, "S": 0.3, "Ca": 22.5}
    formula = "".join(f"{el}{m / xraydb.atomic_mass(el):.6f}" for el, m in frac_mass.items())
    mw = xraydb.material_mu("H2O", e * 1e3, density=1.0) / 10.0  # 1/mm at 1 g/cm^3
    mb = xraydb.material_mu(formula, e * 1e3, density=1.0) / 10.0
    ref = np.zeros((len(geom), geom.height, geom.width))
    for k in range(e.size):
        mu_e = (rho_soft * mw[k] + rho_bone * mb[k]).astype(np.float32)
        ref += w[k] * np.exp(-render_views(mu_e, A, geom, backend="joseph", is_mu=True))
    got = R.radiograph(bases, look, pixel_mm=spec.pixel_mm)
    body = ref < 0.95
    assert body.sum() > 500
    assert float(np.abs(got / ref - 1).max()) <= 0.02
    assert float(np.abs(got[body] / ref[body] - 1).mean()) <= 0.005


def test_water_phantom_against_spectrum_weighted_beer_lambert():
    """Slabs of water (HU 0) 50, 100 and 200 mm thick on the central ray, 80 kVp, 2.5 mm Al: the look's transmission
    against the closed form, and against 0.280 / 0.0863 / 0.0093."""
    from xwin.pipeline.geometry import ring_for_volume

    look = Look(kvp=80, filtration_mm_al=2.5)
    for mm, ref in ((50, 0.280), (100, 0.0863), (200, 0.0093)):
        hu = np.zeros((12, mm, 12), np.int16)  # 1 mm voxels: the slab is exactly mm thick along y (the ray)
        spec = RenderSpec(height=8, width=8, pixel_mm=0.25, n_views=1)
        views = ring_for_volume(spec, np.eye(4), hu.shape)
        bases = render_materials(hu, np.eye(4), views, backend="joseph")
        np.testing.assert_allclose(bases[0], mm / 10.0, rtol=1e-4)  # g/cm^2 of water
        t = R.radiograph(bases, look, pixel_mm=0.25)
        closed = _closed_form_water(80.0, 2.5, float(mm))
        assert abs(float(t.mean()) / closed - 1) <= 0.01
        assert abs(closed / ref - 1) <= 0.01


@pytest.mark.parametrize("n0,sigma_e", [(1000.0, 0.0), (50000.0, 0.0), (10000.0, 20.0)])
def test_noise_variance_is_poisson(n0, sigma_e):
    soft = np.full((256, 256), 12.0, np.float32)
    bone = np.full((256, 256), 0.8, np.float32)
    look = Look(kvp=80, photons_per_pixel=n0, electronic_noise=sigma_e, seed=7)
    t = float(R.lut(Look(kvp=80))(soft[:1, :1], bone[:1, :1])[0, 0])
    img = R.radiograph_view(soft, bone, look, pixel_mm=1.0, view_index=3)
    want = t / n0 + (sigma_e / n0) ** 2
    assert abs(float(img.var()) / want - 1) <= 0.05
    assert abs(float(img.mean()) / t - 1) <= 0.01
    # the same view draws the same noise, another view other noise
    np.testing.assert_array_equal(img, R.radiograph_view(soft, bone, look, 1.0, view_index=3))
    assert not np.array_equal(img, R.radiograph_view(soft, bone, look, 1.0, view_index=4))


def test_bone_contrast_falls_with_kvp(stored_bases):
    soft = np.array([15.0, 15.0], np.float32)
    bone = np.array([0.0, 1.0], np.float32)

    def contrast(kvp: float) -> float:
        t = R.lut(Look(kvp=kvp))(soft, bone)
        return float(np.log(t[0] / t[1]))

    assert contrast(120) < 0.8 * contrast(70)
    # on the CT's frontal view: the spine's log contrast against bone-free tissue of similar thickness
    bases, _, _ = stored_bases
    s, b = bases[0, 0], bases[1, 0]
    spine = b > np.percentile(b, 95)
    lo, hi = np.percentile(s[spine], (10, 90))
    soft_px = (b < 0.05) & (s >= lo) & (s <= hi)
    assert spine.sum() > 20 and soft_px.sum() > 10

    def ct_contrast(kvp: float) -> float:
        q = R.radiograph(bases[:, :1], Look(kvp=kvp, output="log"), pixel_mm=8.0)[0]
        return float(q[spine].mean() - q[soft_px].mean())

    assert 0 < ct_contrast(120) < ct_contrast(70)


def test_lungs_darker_than_soft_tissue_and_not_saturated(small_ct, bundled_mask_path):
    """Display output of the frontal view (bright = dense): the lungs are darker than the liver, brighter than the
    air around the body, and vary within themselves (not one saturated value)."""
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.pipeline.labels import LabelSpec, align_labels, read_labelmap, render_labels

    hu, A = small_ct
    lab, laff, names = read_labelmap(bundled_mask_path)
    aligned, _ = align_labels(lab, laff, hu.shape, A)
    spec = RenderSpec(height=64, width=80, pixel_mm=7.0, n_views=1)
    views = ring_for_volume(spec, A, hu.shape)
    maps = render_labels(aligned, names, A, views, LabelSpec(groups={"lungs": ["lung_*"], "liver": ["liver"]}),
                         backend="joseph")  # fmt: skip
    bases = render_materials(hu, A, views, backend="joseph")
    img = R.radiograph(bases, Look(kvp=110, filtration_mm_al=3.0, photons_per_pixel=1e5, output="display"), 7.0)[0]
    lungs = (maps[0, 0] > 80) & (maps[1, 0] < 1)
    liver = (maps[1, 0] > 80) & (maps[0, 0] < 1)
    air = bases[0, 0] < 0.5
    assert lungs.sum() > 30 and liver.sum() > 10 and air.sum() > 30
    assert img[lungs].mean() + 0.1 < img[liver].mean()
    assert img[air].mean() + 0.1 < img[lungs].mean()
    assert img[lungs].std() > 0.02 and np.unique(np.round(img[lungs], 3)).size > 20


def test_look_validation_and_files(tmp_path):
    with pytest.raises(ValidationError, match="kvp"):
        Look(kvp=10)
    with pytest.raises(ValidationError, match="electronic_noise"):
        Look(electronic_noise=3.0)
    with pytest.raises(ValidationError, match="extra"):
        Look.model_validate({"kVp": 80})
    p = tmp_path / "l.json"
    p.write_text('{"kvp": 70, "output": "log", "blur_mm": 0.4, "scatter_fraction": 0.3}')
    lk = R.load_look(p)
    assert lk.kvp == 70 and lk.output == "log"
    # blur and scatter keep the mean of a flat field's primary up to the scatter it adds: S/(P+S) = f
    soft = np.full((64, 64), 10.0, np.float32)
    zero = np.zeros_like(soft)
    t = R.radiograph_view(soft, zero, lk.model_copy(update={"output": "transmission"}), 1.0)
    p0 = float(R.lut(lk)(soft[:1, :1], zero[:1, :1])[0, 0])
    np.testing.assert_allclose(t, p0 / (1 - 0.3), rtol=1e-4)
    # the scatter kernel (blurred on blocks, brought back by interpolation) against scipy's full Gaussian
    import scipy.ndimage as ndi

    x = np.zeros((300, 260), np.float32)
    x[60:200, 90:230] = 1.0
    ref = ndi.gaussian_filter(x, 40.0, mode="nearest")
    assert float(np.abs(R._wide_blur(x, 40.0) - ref).max()) < 0.02 * float(ref.max())


def test_display_processing_is_an_unsharp_mask_of_the_log_image(stored_bases):
    """enhance_amount / enhance_mm: the display output equals scikit-image's unsharp mask (an independent
    implementation) of the look's log image, windowed as the display output windows; processing sharpens (more
    high-frequency energy); it is refused for other outputs; ranges without it draw the looks they drew before."""
    from skimage.filters import unsharp_mask

    from xwin.schemas.look import LookRanges

    bases, _, spec = stored_bases
    base = Look(kvp=110, photons_per_pixel=1e5, blur_mm=2.0, scatter_fraction=0.2, seed=3, output="log")
    k, mm = 1.5, 24.0
    q = R.radiograph(bases, base, pixel_mm=spec.pixel_mm)
    disp = R.radiograph(bases, base.model_copy(update={"output": "display"}), pixel_mm=spec.pixel_mm)
    look = Look.model_validate({**base.model_dump(), "output": "display", "enhance_amount": k, "enhance_mm": mm})
    got = R.radiograph(bases, look, pixel_mm=spec.pixel_mm)
    for v in range(len(q)):
        ref = unsharp_mask(q[v].astype(np.float64), radius=mm / spec.pixel_mm, amount=k, preserve_range=True)
        lo, hi = np.percentile(ref, (0.5, 99.5))
        np.testing.assert_allclose(got[v], np.clip((ref - lo) / (hi - lo), 0, 1), atol=2e-5)

        def detail(img):  # the energy of what a 2-pixel Gaussian removes
            return float(np.std(img - ndi_gauss(img, 2.0)))

        assert detail(got[v]) > 1.2 * detail(disp[v])
    with pytest.raises(ValidationError, match="display output"):
        Look(enhance_amount=1.0, output="log")
    with pytest.raises(ValidationError, match="display output"):
        LookRanges(enhance_amount=(0.0, 1.0), output="transmission")
    plain, proc = LookRanges(), LookRanges(enhance_amount=(0.5, 1.5), enhance_mm=(5.0, 20.0))
    a, b = plain.sample(np.random.default_rng(7)), proc.sample(np.random.default_rng(7))
    assert a == b.model_copy(update={"enhance_amount": 0.0, "enhance_mm": 10.0})  # the same draws up to processing
    assert 0.5 <= b.enhance_amount <= 1.5 and 5.0 <= b.enhance_mm <= 20.0


def ndi_gauss(img, sigma):
    import scipy.ndimage as ndi

    return ndi.gaussian_filter(np.asarray(img, np.float64), sigma, mode="nearest")


def test_scatter_comes_from_the_body_not_from_the_air_beside_it():
    """A 200 mm square of 10 g/cm^2 water in a 400 mm open field (1 mm pixels, a 20 mm scatter kernel, f = 0.3):
    at its centre S/(P+S) = f as on a flat field; in the far corner, air 5 kernel widths from the body, the
    transmission is 1 (signal / unattenuated signal) and not 1 / (1 - f); just beside the body, a veil."""
    soft = np.zeros((400, 400), np.float32)
    soft[100:300, 100:300] = 10.0
    zero = np.zeros_like(soft)
    look = Look(kvp=80, scatter_fraction=0.3, scatter_kernel_mm=20.0)
    t = R.radiograph_view(soft, zero, look, 1.0)
    p0 = float(R.lut(look)(soft[200:201, 200:201], zero[:1, :1])[0, 0])
    assert abs(float(t[200, 200]) / (p0 / 0.7) - 1) < 1e-3
    assert abs(float(t[0, 0]) - 1.0) < 1e-3
    assert 1.01 < float(t[200, 95]) < 1.0 + 0.3 / 0.7 * p0


def test_stream_draws_a_look_per_sample(tmp_path):
    """XWinStream(looks=...): each sample's images are the radiographs of one look drawn from the ranges with the
    sample's rng, made from the stored bases of exactly the views drawn, and the sample records the look."""
    import json

    from xwin.pipeline.materials import render_ring_materials
    from xwin.pipeline.render import render_ring
    from xwin.schemas.look import LOOK_VECTOR_FIELDS, LookRanges
    from xwin.storage import open_store
    from xwin.training.data import StoreSource, XWinSampling, XWinStream

    hu = np.zeros((24, 20, 16), np.int16)
    hu[6:18, 4:16, 4:12] = 700  # a block of bone-like tissue in water-like padding
    A = np.diag([8.0, 8.0, 8.0, 1.0])
    spec = RenderSpec(height=24, width=24, pixel_mm=12.0, n_views=12, yaw_step_deg=30.0, materials=True)
    views, geom = render_ring(hu, A, spec, backend="joseph")
    bases = render_ring_materials(hu, A, spec, geom, backend="joseph")
    ds = open_store(tmp_path / "s").dataset("c1", spec)
    ds.write_ring("v", views, geom.view_meta(), {}, materials=bases)
    ranges = LookRanges(kvp=(60, 120), photons_per_pixel=(1e3, 1e5), output="transmission")

    def stream(seed: int, batch_size: int | None = None) -> XWinStream:
        return XWinStream(
            StoreSource(str(tmp_path / "s"), "c1", spec),
            sampling=XWinSampling(n_targets=2, step_deg=30.0, max_abs_deg=90.0),
            image_size=24,
            seed=seed,
            looks=ranges,
            draws_per_volume=4,
            batch_size=batch_size,
        )

    samples = list(stream(0))
    assert len(samples) == 4
    kvps = {float(s["look"][LOOK_VECTOR_FIELDS.index("kvp")]) for s in samples}
    assert len(kvps) >= 2 and all(60 <= k <= 120 for k in kvps)  # the look changes from sample to sample
    stored = ds.read_materials("v")
    for s in samples:
        look = Look.model_validate_json(s["look_json"])
        k0 = spec.view_index(float(s["context_yaw"]))
        want = R.radiograph(stored[:, [k0]], look, pixel_mm=12.0, view_indices=[k0])[0]
        np.testing.assert_allclose(s["context"][0].numpy(), want, rtol=1e-5, atol=1e-6)
        assert json.loads(s["look_json"])["kvp"] == float(s["look"][0])
    again = list(stream(0))  # the same seed draws the same looks and the same noise
    np.testing.assert_array_equal(again[0]["targets"].numpy(), samples[0]["targets"].numpy())
    # batches from a DataLoader worker: the looks stacked (B, K), their JSON listed, the same images as in-process
    from xwin.training.data import make_loader

    batches = list(make_loader(stream(0, batch_size=2), num_workers=1))
    assert [tuple(b["look"].shape) for b in batches] == [(2, len(LOOK_VECTOR_FIELDS))] * 2
    assert batches[0]["look_json"] == [samples[0]["look_json"], samples[1]["look_json"]]
    np.testing.assert_allclose(batches[0]["context"][1].numpy(), samples[1]["context"].numpy(), rtol=1e-6)
    # the training config carries the ranges (YAML lists), validated like a look
    from xwin.training.config import TrainConfig

    cfg = TrainConfig.model_validate({"data": {"looks": {"kvp": [70, 100], "blur_mm": [0, 0.3]}}})
    assert cfg.data.looks is not None and cfg.data.looks.kvp == (70.0, 100.0)
    with pytest.raises(ValidationError, match="kvp"):
        TrainConfig.model_validate({"data": {"looks": {"kvp": [20, 100]}}})
