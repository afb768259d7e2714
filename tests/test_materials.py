"""Material bases (pipeline/materials.py): the HU -> (soft, bone) model, bases rendered through the views' rays,
stored with the ring in one commit and verified like the views, listed by describe and written by export."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from xwin.pipeline.materials import MATERIAL_MODEL, MATERIALS, hu_to_densities, render_materials
from xwin.schemas import RenderSpec


@pytest.fixture(scope="module")
def small_ct(small_ct_path):
    from xwin.pipeline.ingest.volume import canonical_ras

    img = nib.load(str(small_ct_path))
    return canonical_ras(np.asarray(img.dataobj).astype(np.int16), img.affine)


def test_hu_model_values():
    hu = np.array([-2048, -1000, -800, 0, 100, 850, 1600, 2350], np.int16)
    soft, bone = hu_to_densities(hu)
    # water-like below 100 HU (the definition of HU for water's composition), a water/bone mixture above
    np.testing.assert_allclose(soft, [0, 0, 0.2, 1.0, 1.1, 0.55, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(bone, [0, 0, 0, 0, 0, 0.96, 1.92, 2.88], atol=1e-6)
    # continuous at the boundary, total density never decreasing with HU
    s2, b2 = hu_to_densities(np.linspace(-1100, 2000, 3101).astype(np.float32))
    assert np.all(np.diff(s2 + b2) >= -1e-6)
    e, f = hu_to_densities(np.array([99.999, 100.001], np.float32))
    assert abs(float((e + f)[1] - (e + f)[0])) < 1e-4


def test_hu_model_memory_and_input_untouched():
    """A CT volume's densities take their two float32 outputs and nothing more (a 512^2 x 600 CT: ~1.3 GB, not
    ~4.4 GB), equal the model's piecewise formula, and leave a float32 input unchanged."""
    import tracemalloc

    hu = np.random.default_rng(0).integers(-1100, 2500, (64, 64, 50)).astype(np.int16)
    hu_to_densities(hu[:4])  # compiled (or loaded from numba's cache) outside the count
    tracemalloc.start()
    soft, bone = hu_to_densities(hu)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.1 * hu.size * 4
    from xwin.pipeline.materials import hu_to_density_channels

    hu_f = np.asfortranarray(hu)  # ingest's order
    hu_to_density_channels(np.asfortranarray(hu[:4]))  # compiled (or loaded from numba's cache) outside the count
    tracemalloc.start()
    hu_to_density_channels(hu_f)  # the fused path's channels-last layout: no copy either
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.1 * hu.size * 4
    h = hu.astype(np.float64)
    frac = np.maximum((h - 100) / 1500, 0)
    np.testing.assert_allclose(
        soft, np.where(h <= 100, np.maximum(1 + h / 1000, 0), np.maximum(1 - frac, 0) * 1.1), atol=1e-6
    )
    np.testing.assert_allclose(bone, frac * 1.92, atol=1e-6)
    f32 = hu.astype(np.float32)
    s32, b32 = hu_to_densities(f32)
    np.testing.assert_array_equal(f32, hu.astype(np.float32))
    np.testing.assert_array_equal(s32, soft)
    np.testing.assert_array_equal(b32, bone)


def test_spec_hash_unchanged_without_materials():
    # the golden hashes of specs written before the field: it enters the hash only when set
    assert RenderSpec().spec_hash == "76448b4c8f1f2dc3"
    assert RenderSpec(materials=False).spec_hash == "76448b4c8f1f2dc3"
    assert RenderSpec(materials=True).spec_hash != "76448b4c8f1f2dc3"
    assert '"materials":true' in RenderSpec(materials=True).canonical_json()


def test_soft_basis_is_the_views_over_mu_water_where_there_is_no_bone(small_ct):
    """Below 100 HU the soft basis and the views project the same density (1 + HU/1000): views = 10 mu_water soft,
    through the same backend and rays, to float rounding; bone is zero there."""
    from xwin.pipeline.render import render_ring

    hu, A = small_ct
    soft_only = np.minimum(hu, 100).astype(np.int16)
    spec = RenderSpec(height=32, width=40, pixel_mm=10.0, n_views=3, yaw_step_deg=60.0)
    views, geom = render_ring(soft_only, A, spec, backend="joseph")
    bases = render_materials(soft_only, A, geom, backend="joseph")
    assert bases.shape == (2, 3, 32, 40) and bases.dtype == np.float32
    np.testing.assert_allclose(bases[0] * 10 * spec.mu_water_per_mm, views, rtol=1e-5, atol=1e-6)
    assert float(np.abs(bases[1]).max()) == 0.0
    # the real CT: bone where the spine is, and a chest is 10-40 g/cm^2 of soft tissue frontally
    full = render_materials(hu, A, geom, backend="joseph")
    assert 1.0 < float(full[1, 0].max()) < 20.0
    assert 10.0 < float(full[0, 0].max()) < 45.0


def test_materials_stored_with_the_ring(small_ct, tmp_path):
    from xwin.pipeline.materials import render_ring_materials
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store

    hu, A = small_ct
    spec = RenderSpec(height=24, width=24, pixel_mm=18.0, n_views=4, yaw_step_deg=90.0, materials=True)
    views, geom = render_ring(hu, A, spec, backend="joseph")
    bases = render_ring_materials(hu, A, spec, geom, backend="joseph")
    ds = open_store(tmp_path / "s").dataset("c1", spec)
    with pytest.raises(ValueError, match="materials=True but material bases were not given"):
        ds.write_ring("v", views, geom.view_meta(), {})
    with pytest.raises(ValueError, match="areal densities"):
        ds.write_ring("v", views, geom.view_meta(), {}, materials=bases[:, :3])
    assert ds.write_ring("v", views, geom.view_meta(), {}, materials=bases, material_model=MATERIAL_MODEL) is True
    assert ds.material_channels("v") == list(MATERIALS)
    np.testing.assert_allclose(ds.read_materials("v", [3, 0]), bases[:, [3, 0]], rtol=1e-3, atol=1e-3)  # float16
    assert ds.read_materials("v").shape == (2, 4, 24, 24)
    # the direct chunk reads return exactly what zarr-python decodes from the same array
    import zarr

    from xwin.storage.fastread import ShardReader

    z = zarr.open_array(ds.store.zstore, path=f"{ds.scope.get_commit('v').path}/materials", mode="r", zarr_format=3)
    np.testing.assert_array_equal(ds.read_materials("v", [2, 2, 1]), np.asarray(z.oindex[:, [2, 2, 1]], np.float32))
    assert isinstance(ds._handle("v").materials, ShardReader)
    assert ds.scope.get_commit("v").material_model["hu_cortical"] == 1600.0
    assert ds.verify().clean
    c = ds.scope.get_commit("v")
    key = next(k for k in ds.store.backend.list(f"{c.path}/materials") if not k.endswith("zarr.json"))
    p = tmp_path / "s" / key
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    rep = ds.verify()
    assert [i.volume_id for i in rep.corrupt] == ["v"] and "materials" in rep.corrupt[0].reason
    # a spec without materials refuses bases (they would be invisible to its readers)
    plain = open_store(tmp_path / "s2").dataset("c1", spec.model_copy(update={"materials": False}))
    with pytest.raises(ValueError, match="materials=False but material bases were given"):
        plain.write_ring("v", views, geom.view_meta(), {}, materials=bases)
    with pytest.raises(KeyError):
        plain.write_ring("v", views, geom.view_meta(), {})
        plain.read_materials("v")


def test_backfill_with_materials_describe_export_inspect(tmp_path):
    """The example cohort with a materials spec through the CLI: describe lists the bases, export writes them as
    (2, V, H, W) float32 and a look's radiographs as (V, H, W) float32, inspect --look draws them; a bad look
    file and a missing --look end the command with one line."""
    from typer.testing import CliRunner

    from xwin.flows.cli import app

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"height": 32, "width": 32, "pixel_mm": 16.0, "n_views": 4, "yaw_step_deg": 90.0,
                                "materials": True, "body_mask": True}))  # fmt: skip
    store = str(tmp_path / "s")
    run = CliRunner().invoke(app, ["backfill", "--cohort", "example", "--store", store, "--spec", str(spec),
                                   "--verify", "deep", "--json"])  # fmt: skip
    assert run.exit_code == 0, run.output
    vid = json.loads(run.stdout[run.stdout.index("{") :])["done"][0]["volume_id"]
    desc = CliRunner().invoke(app, ["describe", "--store", store, "--volume", vid, "--json"])
    assert desc.exit_code == 0, desc.output
    m = json.loads(desc.stdout)["materials"]
    assert m["names"] == ["soft", "bone"] and m["units"] == "g/cm^2" and m["stored"] is True
    assert m["model"]["hu_cortical"] == 1600.0 and "Schneider" in m["model"]["reference"]
    out = tmp_path / "m.npy"
    exp = CliRunner().invoke(app, ["export", "--store", store, "--volume", vid, "--what", "materials",
                                   "--out", str(out)])  # fmt: skip
    assert exp.exit_code == 0, exp.output
    bases = np.load(out)
    assert bases.shape == (2, 4, 32, 32) and bases.dtype == np.float32
    assert 10 < float(bases[0].max()) < 60 and 1 < float(bases[1].max()) < 30 and float(bases.min()) >= 0
    look = tmp_path / "look.yaml"
    look.write_text("kvp: 100\nfiltration_mm_al: 3\nphotons_per_pixel: 20000\nseed: 3\noutput: transmission\n")
    r = tmp_path / "r.npy"
    exp = CliRunner().invoke(app, ["export", "--store", store, "--volume", vid, "--what", "radiograph",
                                   "--look", str(look), "--out", str(r)])  # fmt: skip
    assert exp.exit_code == 0, exp.output
    rad = np.load(r)
    assert rad.shape == (4, 32, 32) and rad.dtype == np.float32
    # air around the body transmits everything (up to the noise), the body much less
    air = bases[0] < 0.05
    assert air.sum() > 20 and abs(float(rad[air].mean()) - 1.0) < 0.02 and float(rad[~air].min()) < 0.2
    png = tmp_path / "sheet.png"
    ins = CliRunner().invoke(app, ["inspect", "--store", store, "--volume", vid, "--look", str(look),
                                   "--out", str(png), "--big", "64", "--thumb", "32"])  # fmt: skip
    assert ins.exit_code == 0, ins.output
    assert png.stat().st_size > 500
    no_look = CliRunner().invoke(app, ["export", "--store", store, "--volume", vid, "--what", "radiograph",
                                       "--out", str(r)])  # fmt: skip
    assert no_look.exit_code == 2 and "--look" in no_look.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("kvp: 400\n")
    res = CliRunner().invoke(app, ["export", "--store", store, "--volume", vid, "--what", "radiograph",
                                   "--look", str(bad), "--out", str(r)])  # fmt: skip
    assert res.exit_code == 2 and "kvp" in res.output and "bad.yaml" in res.output
    # `xwin render` of the stored volume with another materials spec (no table removal) commits its bases too
    spec2 = tmp_path / "spec2.json"
    spec2.write_text(json.dumps({"height": 32, "width": 32, "pixel_mm": 16.0, "n_views": 4, "yaw_step_deg": 90.0,
                                 "materials": True}))  # fmt: skip
    ren = CliRunner().invoke(app, ["render", "--store", store, "--volume", vid, "--spec", str(spec2),
                                   "--backend", "joseph"])  # fmt: skip
    assert ren.exit_code == 0, ren.output
    m2 = tmp_path / "m2.npy"
    exp = CliRunner().invoke(app, ["export", "--store", store, "--volume", vid, "--what", "materials", "--spec",
                                   str(spec2), "--out", str(m2)])  # fmt: skip
    assert exp.exit_code == 0, exp.output
    with_table = np.load(m2)
    assert with_table.shape == bases.shape and float((with_table[0] - bases[0]).min()) > -0.01
    assert float((with_table[0] - bases[0]).max()) > 0.5  # the scanner table and the air around the body are back


def _per_basis(hu, A, views, **opts):
    """The bases as two separate projections through render_views (what every backend but joseph does)."""
    from xwin.pipeline.render import render_views

    soft, bone = hu_to_densities(hu)
    return np.stack([render_views(d, A, views, backend="joseph", is_mu=True, **opts) * np.float32(0.1)
                     for d in (soft, bone)])  # fmt: skip


def _recorder():
    """A list and a (done, total) callback that appends to it."""
    got: list[tuple[int, int]] = []
    return got, lambda done, total: got.append((done, total))


def _tilted(A, deg=20.0):
    """``A`` turned about the world x axis: the ring's detector v axis is no longer along voxel z."""
    t = np.deg2rad(deg)
    R = np.eye(4)
    R[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return R @ np.asarray(A, np.float64)


def test_fused_bases_equal_the_per_basis_projections(small_ct):
    """joseph projects both bases in one pass over the rays; each equals its own projection (measured: identical to
    the bit, on both kernels: the ring's column kernel and the general one)."""
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.pipeline.render import resolve_backend
    from xwin.pipeline.render.joseph import _index_space, _ring_fast_ok

    hu, A = small_ct
    spec = RenderSpec(height=36, width=44, pixel_mm=10.0, n_views=5, yaw_step_deg=67.0, yaw_start_deg=11.0)
    ring = ring_for_volume(spec, A, hu.shape)
    At = _tilted(A)
    tilted = ring_for_volume(spec, At, hu.shape)
    assert _ring_fast_ok(_index_space(ring, A), hu.shape)  # "auto" takes the column kernel
    assert not _ring_fast_ok(_index_space(tilted, At), hu.shape)  # "auto" takes the general kernel
    for aff, views, opts in [(A, ring, {}), (A, ring, {"method": "general"}), (At, tilted, {})]:
        calls, on_material = _recorder()
        progress, on_progress = _recorder()
        fused = render_materials(hu, aff, views, backend="joseph", on_material=on_material, on_progress=on_progress,
                                 batch_views=2, **opts)  # fmt: skip
        ref = _per_basis(hu, aff, views, **opts)
        assert fused.shape == (2, 5, 36, 44) and fused.dtype == np.float32
        assert float(ref[1].max()) > 1.0  # the spine: both channels carry signal
        np.testing.assert_array_equal(fused, ref)
        assert calls == [(2, 2)]  # one pass: both bases done at once
        assert progress == [(0, 5), (2, 5), (4, 5), (5, 5)]  # the views, batch by batch, once
    if resolve_backend("auto") == "joseph":  # "auto" on a machine without CUDA is the fused joseph pass
        np.testing.assert_array_equal(render_materials(hu, A, ring), render_materials(hu, A, ring, backend="joseph"))


def test_fused_bases_of_a_volume_without_bone(small_ct):
    """No voxel above 100 HU: the bone basis is exactly zero and the soft basis the per-basis projection."""
    from xwin.pipeline.geometry import ring_for_volume

    hu, A = small_ct
    soft_only = np.minimum(hu, 99).astype(np.int16)
    views = ring_for_volume(RenderSpec(height=24, width=30, pixel_mm=14.0, n_views=3, yaw_step_deg=90.0), A, hu.shape)
    calls, on_material = _recorder()
    progress, on_progress = _recorder()
    fused = render_materials(
        soft_only, A, views, backend="joseph", on_material=on_material, on_progress=on_progress, batch_views=2
    )
    assert float(np.abs(fused[1]).max()) == 0.0 and float(fused[0].max()) > 10.0
    np.testing.assert_array_equal(fused, _per_basis(soft_only, A, views))
    assert calls == [(2, 2)]
    assert progress == [(0, 3), (2, 3), (3, 3)]  # one pass over the views, reported once


def test_other_backends_project_the_bases_one_after_the_other(small_ct):
    """torch (CPU) keeps the per-basis loop: on_material reports each basis; it agrees with joseph's single pass to
    the two projectors' float rounding."""
    from xwin.pipeline.geometry import ring_for_volume

    hu, A = small_ct
    views = ring_for_volume(RenderSpec(height=24, width=30, pixel_mm=14.0, n_views=2, yaw_step_deg=90.0), A, hu.shape)
    calls, on_material = _recorder()
    loop = render_materials(hu, A, views, backend="torch", device="cpu", on_material=on_material)
    assert calls == [(1, 2), (2, 2)]
    fused = render_materials(hu, A, views, backend="joseph")
    for m in range(2):
        assert np.linalg.norm(loop[m] - fused[m]) / np.linalg.norm(fused[m]) < 1e-5


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_density_channels_equal_the_densities(layout):
    """The fused path's channels-last densities (one tiled pass) are the model's densities voxel for voxel, whatever
    the input's memory layout and dtype, and say whether there is bone."""
    from xwin.pipeline.materials import hu_to_density_channels

    rng = np.random.default_rng(1)
    base = rng.integers(-1100, 2500, (41, 23, 37)).astype(np.int16)
    hu = {"C": base, "F": np.asfortranarray(base.astype(np.float64)), "strided": base.astype(np.float32)[::2, :, 3:]}[
        layout
    ]
    ch, any_bone = hu_to_density_channels(hu)
    soft, bone = hu_to_densities(hu)
    assert ch.shape == (*hu.shape, 2) and ch.dtype == np.float32 and ch.flags.c_contiguous and any_bone
    np.testing.assert_array_equal(ch[..., 0], soft)
    np.testing.assert_array_equal(ch[..., 1], bone)
    h = hu.astype(np.float64)  # and the model's formula (test_hu_model_memory_and_input_untouched)
    np.testing.assert_allclose(bone, np.maximum((h - 100) / 1500, 0) * 1.92, atol=1e-6)
    assert hu_to_density_channels(np.minimum(hu, 100))[1] is False


@pytest.mark.parametrize("dtype", [">i2", ">f4", "float16"])
def test_densities_of_any_real_dtype(dtype):
    """A big-endian volume (as a NIfTI file may hold it) or a float16 one gives the densities of the same HU in
    native int16, through both paths (the compiled model takes native numbers only)."""
    from xwin.pipeline.materials import hu_to_density_channels

    base = np.random.default_rng(2).integers(-1000, 2000, (9, 7, 5)).astype(np.int16)
    hu = np.asfortranarray(base.astype(dtype))
    soft, bone = hu_to_densities(base)
    got_soft, got_bone = hu_to_densities(hu)
    np.testing.assert_array_equal(got_soft, soft)
    np.testing.assert_array_equal(got_bone, bone)
    ch, any_bone = hu_to_density_channels(hu)
    assert any_bone
    np.testing.assert_array_equal(ch[..., 0], soft)
    np.testing.assert_array_equal(ch[..., 1], bone)
