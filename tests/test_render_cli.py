"""`xwin render / describe / export` on a local store: idempotent rendering, and a re-projection from the exported
volume + described geometry alone reproduces the stored views."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.pipeline.render import render_ring, render_views
from xwin.schemas import RenderSpec

SPEC = RenderSpec(height=32, width=40, pixel_mm=13.0, n_views=6, yaw_step_deg=60.0)


@pytest.fixture(scope="module")
def store_with_volume(tmp_path_factory, small_ct_path):
    from xwin.pipeline.ingest import load_candidate, plan_inputs
    from xwin.storage import open_store

    cands, rej = plan_inputs([str(small_ct_path)], "small")
    assert not rej and len(cands) == 1
    rec, hu = load_candidate(cands[0])
    d = tmp_path_factory.mktemp("render_cli")
    url = str(d / "store")
    open_store(url).write_volume(rec, hu)
    spec_file = d / "spec.json"
    spec_file.write_text(SPEC.model_dump_json())
    return url, rec, hu, spec_file, d


def test_render_describe_export_round_trip(store_with_volume, small_ct_path):
    url, rec, hu, spec_file, d = store_with_volume
    vid = rec.volume_id
    runner = CliRunner()
    base = ["--store", url, "--spec", str(spec_file)]

    r = runner.invoke(app, ["render", *base, "--volume", vid, "--backend", "joseph"])
    assert r.exit_code == 0, r.output
    assert f"written {vid}" in r.output and "1 written" in r.output
    r = runner.invoke(app, ["render", *base, "--all", "--backend", "joseph"])
    assert r.exit_code == 0 and "1 skipped" in r.output and "0 written" in r.output
    r = runner.invoke(app, ["render", *base, "--volume", vid[:8], "--backend", "joseph"])  # a unique prefix
    assert r.exit_code == 0 and f"skipped {vid}" in r.output, r.output

    r = runner.invoke(app, ["describe", *base, "--volume", vid, "--json"])
    assert r.exit_code == 0, r.output
    desc = json.loads(r.output)
    assert desc["frame"] == "RAS" and desc["rendered"] is True and desc["spec_hash"] == SPEC.spec_hash
    assert desc["shape"] == list(hu.shape) and np.allclose(desc["affine"], rec.affine)
    assert desc["mu_water_per_mm"] == SPEC.mu_water_per_mm
    assert [v["yaw_deg"] for v in desc["views"]] == SPEC.yaws_deg
    assert np.allclose([v["cone_vec"] for v in desc["views"]], ring_for_volume(SPEC, rec.affine, hu.shape).cone_vecs)

    views_npy, vol_npy = d / "views.npy", d / "vol.npy"
    assert (
        runner.invoke(app, ["export", *base, "--volume", vid, "--what", "views", "--out", str(views_npy)]).exit_code
        == 0
    )
    assert (
        runner.invoke(app, ["export", *base, "--volume", vid, "--what", "volume", "--out", str(vol_npy)]).exit_code == 0
    )
    views, vol = np.load(views_npy), np.load(vol_npy)
    assert views.dtype == np.float32 and views.shape == (6, 32, 40)
    assert vol.dtype == np.int16 and np.array_equal(vol, hu)

    # re-project from the exported pieces only (volume + affine + cone_vecs + mu_water)
    g = ConeBeamViews.from_cone_vecs(np.array([v["cone_vec"] for v in desc["views"]]), 32, 40)
    again = render_views(vol, np.array(desc["affine"]), g, desc["mu_water_per_mm"], backend="joseph")
    stored = np.dtype(SPEC.store_dtype)  # the export gives the stored values (rounded to store_dtype) as float32
    assert np.allclose(again.astype(stored).astype(np.float32), views, rtol=1e-5, atol=1e-5)

    # the canonical (RAS) volume and the original LAS file describe the same world: same views
    img = nib.load(str(small_ct_path))
    orig, _ = render_ring(np.asarray(img.dataobj), img.affine, SPEC, backend="joseph")
    assert np.linalg.norm(orig - again) / np.linalg.norm(orig) < 1e-4


def test_render_cli_errors(store_with_volume):
    url, _rec, _hu, spec_file, _d = store_with_volume
    runner = CliRunner()
    r = runner.invoke(app, ["render", "--store", url, "--spec", str(spec_file)])
    assert r.exit_code != 0  # neither --volume nor --all
    # a volume that is not in the store is refused before anything is rendered (one line, exit 2)
    r = runner.invoke(app, ["render", "--store", url, "--spec", str(spec_file), "--volume", "no-such-volume"])
    assert (
        r.exit_code == 2
        and r.stderr == f"error: --volume no-such-volume: no committed volume has this id or prefix in {url}\n"
    )


def test_describe_and_export_find_the_stores_own_dataset(store_with_volume, tmp_path):
    """Without --spec, describe/export answer for the dataset the store holds (not for the default RenderSpec);
    none or several candidates end the command with one line naming them."""
    from xwin.storage import open_store

    _url, rec, hu, spec_file, _d = store_with_volume
    url = str(tmp_path / "store")
    st = open_store(url)
    st.write_volume(rec, hu)
    vid = rec.volume_id
    runner = CliRunner()
    r = runner.invoke(app, ["describe", "--store", url, "--volume", vid])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith(f"error: no dataset of cohort '{rec.cohort}' in {st.url}") and "--spec" in r.stderr

    r = runner.invoke(app, ["render", "--store", url, "--spec", str(spec_file), "--volume", vid, "--backend", "joseph"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["describe", "--store", url, "--volume", vid[:8]])
    assert r.exit_code == 0, r.output
    desc = json.loads(r.stdout)
    assert desc["volume_id"] == vid and desc["spec_hash"] == SPEC.spec_hash and desc["rendered"] is True
    assert [v["yaw_deg"] for v in desc["views"]] == SPEC.yaws_deg
    assert desc["detector"] == {"height": 32, "width": 40}
    out = tmp_path / "views.npy"
    r = runner.invoke(app, ["export", "--store", url, "--volume", vid, "--what", "views", "--out", str(out)])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(out), st.dataset(rec.cohort, SPEC).read_ring(vid).astype(np.float32))

    # a committed volume without a ring: the one dataset of its cohort, not rendered
    other = rec.model_copy(update={"volume_id": "other-volume"})
    st.write_volume(other, hu)
    r = runner.invoke(app, ["describe", "--store", url, "--volume", "other-volume"])
    assert r.exit_code == 0, r.output
    desc = json.loads(r.stdout)
    assert desc["spec_hash"] == SPEC.spec_hash and desc["rendered"] is False and len(desc["views"]) == SPEC.n_views

    # two datasets hold the ring: name one
    spec2 = SPEC.model_copy(update={"n_views": 3, "yaw_step_deg": 120.0})
    spec2_file = tmp_path / "spec2.json"
    spec2_file.write_text(spec2.model_dump_json())
    r = runner.invoke(
        app, ["render", "--store", url, "--spec", str(spec2_file), "--volume", vid, "--backend", "joseph"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["describe", "--store", url, "--volume", vid])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "ambiguous" in r.stderr and SPEC.spec_hash in r.stderr and spec2.spec_hash in r.stderr
    r = runner.invoke(app, ["describe", "--store", url, "--volume", vid, "--spec-hash", spec2.spec_hash[:6]])
    assert r.exit_code == 0 and json.loads(r.stdout)["spec_hash"] == spec2.spec_hash
    r = runner.invoke(app, ["describe", "--store", url, "--volume", vid, "--spec", str(spec2_file)])
    assert r.exit_code == 0 and json.loads(r.stdout)["spec_hash"] == spec2.spec_hash
    r = runner.invoke(app, ["describe", "--store", url, "--volume", "other-volume"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "'other-volume' has no ring" in r.stderr and "2 datasets" in r.stderr
