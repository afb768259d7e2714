"""Evaluations of a trained world model (training/eval3d.py, ``xwin eval``): the 3-D loop from predicted views, the
domain gap of its features, and validation during training (training/loop.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from eval_fixtures import store_with_volume, tiny_checkpoint
from typer.testing import CliRunner

from xwin.training.eval3d import arc_for, gap, projection_metrics

ARC = np.r_[np.arange(90, 120), np.arange(0, 31)]  # yaws 270..357 then 0..90: +-90 deg at 3 deg around the front


@pytest.fixture(scope="module")
def loop(tmp_path_factory, small_ct_path, rendered_dataset):
    """A store with the small CT and its ring as small-a and small-b, a tiny world model, a decoder (40 steps)."""
    from types import SimpleNamespace

    from xwin.training.decoder import decoder_config, train_decoder

    root = tmp_path_factory.mktemp("loop")
    st = store_with_volume(root, small_ct_path, rendered_dataset, ("small-a", "small-b"))
    world = tiny_checkpoint(root / "world", st.url, steps=10)
    dec = train_decoder(world, st.dataset_url, decoder_config("tiny"), root / "dec", max_steps=40)
    return SimpleNamespace(**vars(st), world=world, decoder=dec["checkpoint"], root=root)


# ---------------------------------------------------------------------------------------------------- pieces
def test_arc_and_projection_metrics(rendered_dataset):
    arc = arc_for(rendered_dataset.spec, 90.0)
    assert arc.offsets_deg[0] == -90 and arc.offsets_deg[-1] == 90 and len(arc.offsets_deg) == 61
    assert np.array_equal(arc.indices, ARC) and arc.context_index == 0
    from xwin.schemas.render import RenderSpec

    with pytest.raises(ValueError, match="no view at yaw"):
        arc_for(RenderSpec(n_views=40), 90.0)  # a 120 deg ring
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 5, (3, 32, 32)).astype(np.float32)
    noise = rng.normal(0, 0.05, ref.shape).astype(np.float32)
    p, s = projection_metrics(ref + noise, ref)
    want = np.mean([10 * np.log10(np.ptp(r) ** 2 / np.mean(n.astype(np.float64) ** 2)) for r, n in zip(ref, noise)])
    assert p == pytest.approx(want, rel=1e-6) and 0.9 < s < 1.0
    assert projection_metrics(ref, ref) == (float("inf"), 1.0)
    # the metric is that of both views min-max normalised by the reference view's range
    lo, hi = ref.min(axis=(1, 2), keepdims=True), ref.max(axis=(1, 2), keepdims=True)
    pn, _ = projection_metrics((ref + noise - lo) / (hi - lo), (ref - lo) / (hi - lo))
    assert pn == pytest.approx(p, rel=1e-6)


def test_gap_of_feature_centres():
    g = gap(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert g["cosine_similarity"] == pytest.approx(0.0, abs=1e-12) and g["l2_distance"] == pytest.approx(math.sqrt(8))
    g = gap(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([[4.0, 4.0]]))
    assert g["cosine_similarity"] == pytest.approx(1.0) and g["l2_distance"] == pytest.approx(math.sqrt(8))


# ---------------------------------------------------------------------------------------------------- recon3d
def test_recon3d_end_to_end(loop, tmp_path):
    """`xwin eval recon3d` on the tiny checkpoint and spec: finite metrics per volume and as means, a PNG per
    volume; the oracle row is the FDK protocol of docs/reconstruction.md on the stored views of the same arc."""
    from xwin.flows.cli import app
    from xwin.pipeline.geometry import ConeBeamViews
    from xwin.pipeline.reconstruct import validate_volume
    from xwin.storage import open_store

    out = tmp_path / "r3d"
    argv = ["eval", "recon3d", "--checkpoint", str(loop.world), "--decoder", loop.decoder, "--store"]
    res = CliRunner().invoke(app, [*argv, loop.dataset_url, "--volumes", "small-a", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.strip().splitlines()[-1])
    keys = (
        "projection_psnr_db",
        "projection_ssim",
        "volume_psnr_db",
        "volume_ssim",
        "codebook_usage",
        "oracle_volume_psnr_db",
        "autoencode_volume_psnr_db",
    )
    (row,) = s["volumes"]
    for k in keys:
        assert math.isfinite(row[k]) and math.isfinite(s["means"][k]), k
        assert s["means"][k] == pytest.approx(row[k])
    assert 0 < row["codebook_usage"] <= 1 and s["arc"]["n_views"] == 61
    assert row["fdk"]["short_scan"] and row["fdk"]["arc_deg"] == pytest.approx(183.0)
    assert (out / "small-a_slices.png").stat().st_size > 10_000 and (out / "recon3d.json").exists()
    # oracle row == validate_volume of the stored views 270..357, 0..90 (read independently of eval3d)
    ds = open_store(loop.url).find_dataset("c1")
    views = ConeBeamViews.from_view_meta(ds.read_geometry("small-a")).subset(ARC)
    proj, _ = ds.read_views("small-a", ARC)
    ref = validate_volume(np.asarray(proj, np.float32), views, loop.hu, loop.affine, 0.02, backend="numba").metrics
    assert row["oracle_volume_psnr_db"] == pytest.approx(ref["psnr_db"], abs=1e-9)
    assert row["oracle_volume_ssim"] == pytest.approx(ref["ssim"], abs=1e-9)
    # ... and the figure docs/reconstruction.md gives for this arc and geometry (64^2 at 8 mm, small CT)
    assert row["oracle_volume_psnr_db"] == pytest.approx(26.53, abs=0.05)
    assert row["oracle_volume_ssim"] == pytest.approx(0.841, abs=0.005)
    # the decoder's own error is no better than the ground truth
    assert row["autoencode_volume_psnr_db"] < row["oracle_volume_psnr_db"]


def test_recon3d_needs_a_held_out_split_or_volumes(loop, tmp_path):
    from xwin.flows.cli import app

    argv = ["eval", "recon3d", "--checkpoint", str(loop.world), "--decoder", loop.decoder, "--store"]
    r = CliRunner().invoke(app, [*argv, loop.dataset_url, "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no split assignment" in r.output and "--volumes" in r.output
    r = CliRunner().invoke(app, [*argv, loop.dataset_url, "--volumes", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nope" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, [*argv, loop.url + "#zz", "--volumes", "small-a"])
    assert r.exit_code == 2 and "no dataset with cohort 'zz'" in r.output and "c1/" in r.output


# ------------------------------------------------------------------------------------------------- domain gap
def _pngs(root, views, look):
    from PIL import Image

    for k, v in enumerate(views):
        d = root / f"subject{k}"  # one folder per subject
        d.mkdir(parents=True)
        v = (v - v.min()) / (v.max() - v.min())
        Image.fromarray((np.clip(look(v), 0, 1) * 255).astype(np.uint8)).save(d / "cxr.png")
    return root


def test_domain_gap(loop, tmp_path):
    """The DRRs themselves as "real" images (8-bit PNGs of the same min-max look): centres coincide (cosine 1, L2
    ~0); a different look (gamma 0.5 + noise) moves the real centre away."""
    from xwin.flows.cli import app
    from xwin.schemas.cohort import SplitPolicy, SplitsDoc, VolumeSplit
    from xwin.storage import open_store

    yaws = (0, 30)  # ring indices 0 and 10
    views = [loop.ring[k] for k in (0, 10)]
    same = _pngs(tmp_path / "same", views, lambda v: v)
    rng = np.random.default_rng(0)
    other = _pngs(tmp_path / "other", views, lambda v: v**0.5 + rng.normal(0, 0.05, v.shape))
    argv = ["eval", "domain-gap", "--checkpoint", str(loop.world), "--store", loop.dataset_url, "--json"]
    argv += ["--volumes", "small-a", "--yaws", ",".join(map(str, yaws)), "--real-split", "all", "--real"]
    r1 = CliRunner().invoke(app, [*argv, str(same)])
    assert r1.exit_code == 0, r1.output
    g1 = json.loads(r1.stdout.strip().splitlines()[-1])
    assert g1["n_simulated"] == 2 and g1["n_real"] == 2 and g1["dim"] == 64 and g1["encoder"] == "ema"
    assert g1["cosine_similarity"] > 0.9999 and g1["l2_distance"] < 0.05, g1
    g2 = json.loads(CliRunner().invoke(app, [*argv, str(other)]).stdout.strip().splitlines()[-1])
    assert g2["l2_distance"] > 5 * g1["l2_distance"] and g2["cosine_similarity"] < g1["cosine_similarity"]
    # with a split assignment (in a copy of the store) the held-out "test" volumes are the default
    url = str(tmp_path / "split_store")
    shutil.copytree(loop.url, url)
    doc = SplitsDoc(
        cohort="c1",
        policy=SplitPolicy(),
        volumes={"small-a": VolumeSplit(subject="a", split="test"), "small-b": VolumeSplit(subject="b", split="train")},
    )
    open_store(url).update_splits("c1", lambda cur: doc)
    argv_split = [url + "#c1" if a == loop.dataset_url else a for a in argv if a not in ("--volumes", "small-a")]
    g3 = json.loads(CliRunner().invoke(app, [*argv_split, str(same)]).stdout.strip().splitlines()[-1])
    assert g3["split"] == "test" and g3["volumes"] == 1 and g3["l2_distance"] == pytest.approx(g1["l2_distance"])
    bad = CliRunner().invoke(app, [*argv_split, str(same), "--split", "train", "--volumes", "small-a"])
    assert bad.exit_code == 2 and "small-a" in bad.output and "Traceback" not in bad.output
    # the real images are held out too by default: only the subjects of the test split (the default policy's hash)
    from xwin.pipeline.splits import split_for, unit_hash

    many = _pngs(tmp_path / "many", [views[0]] * 40, lambda v: v)
    pol = SplitPolicy()
    n_test = sum(split_for(unit_hash(pol.salt, f"subject{k}"), pol.fractions) == "test" for k in range(40))
    assert 0 < n_test < 40
    default = [a for a in argv if a not in ("--real-split", "all")]
    g4 = json.loads(CliRunner().invoke(app, [*default, str(many)]).stdout.strip().splitlines()[-1])
    assert g4["real_split"] == "test" and g4["n_real"] == n_test
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(many / "subject0" / "cxr.png", flat / "a.png")
    bad = CliRunner().invoke(app, [*default, str(flat)])
    assert bad.exit_code == 2 and "--real-split all" in bad.output and "Traceback" not in bad.output


def test_domain_gap_of_a_look(loop, tmp_path, small_ct_path, rendered_dataset):
    """--look: the DRRs are the look's radiographs of the rings' material bases. Real images that are exactly those
    radiographs (8-bit PNGs) share their centre (cosine ~1); the plain views of the same rays are farther from them.
    A dataset without bases, or a bad look file, is one line and exit 2."""
    import nibabel as nib

    from xwin.flows.cli import app
    from xwin.pipeline.materials import MATERIAL_MODEL, render_ring_materials
    from xwin.pipeline.radiograph import radiograph
    from xwin.schemas.look import Look
    from xwin.storage import open_store

    img = nib.load(str(small_ct_path))  # the CT and rays of rendered_dataset's rings
    spec = rendered_dataset.spec.model_copy(update={"materials": True})
    geom = rendered_dataset.geometry
    bases = render_ring_materials(np.asarray(img.dataobj), img.affine, spec, geom, backend="joseph")
    ring = rendered_dataset.rings["small-a"]
    url = str(tmp_path / "with_bases")
    open_store(url).dataset("c1", spec).write_ring(
        "v", ring, geom.view_meta(), {}, materials=bases, material_model=MATERIAL_MODEL
    )
    look = Look(kvp=80, output="display")
    (tmp_path / "look.json").write_text(look.model_dump_json())
    idx = [0, 10]
    rad = radiograph(bases[:, idx], look, pixel_mm=spec.pixel_mm, view_indices=idx)
    real = _pngs(tmp_path / "real", list(rad), lambda v: v)
    argv = ["eval", "domain-gap", "--checkpoint", str(loop.world), "--store", url + "#c1", "--volumes", "v"]
    argv += ["--yaws", "0,30", "--real-split", "all", "--real", str(real), "--json"]
    r = CliRunner().invoke(app, [*argv, "--look", str(tmp_path / "look.json")])
    assert r.exit_code == 0, r.output
    g_look = json.loads(r.stdout.strip().splitlines()[-1])
    assert g_look["n_simulated"] == 2 and g_look["n_real"] == 2 and g_look["look"]["kvp"] == 80
    assert g_look["cosine_similarity"] > 0.9999 and g_look["l2_distance"] < 0.05, g_look
    (pv,) = g_look["per_volume"]  # one volume: its own centre is the centre
    assert pv["volume_id"] == "v" and pv["l2_distance"] == pytest.approx(g_look["l2_distance"], rel=1e-9)
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    g_plain = json.loads(r.stdout.strip().splitlines()[-1])
    assert g_plain["look"] is None and g_plain["l2_distance"] > 3 * g_look["l2_distance"], (g_plain, g_look)
    text = CliRunner().invoke(app, [a for a in argv if a != "--json"] + ["--look", str(tmp_path / "look.json")])
    assert text.exit_code == 0 and "2 radiographs (80 kVp, display) vs 2 real" in text.output, text.output
    # a dataset without bases, a look file with an unknown key: one line each, exit 2, before any model is loaded
    plain = [loop.dataset_url if a == url + "#c1" else a for a in argv]
    plain = [("small-a" if a == "v" else a) for a in plain]
    bad = CliRunner().invoke(app, [*plain, "--look", str(tmp_path / "look.json")])
    assert bad.exit_code == 2 and "no material bases" in bad.output and "Traceback" not in bad.output, bad.output
    (tmp_path / "bad.json").write_text('{"kvp": 80, "kv": 3}')
    bad = CliRunner().invoke(app, [*argv, "--look", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "bad.json" in bad.output and "Traceback" not in bad.output, bad.output


# ------------------------------------------------------------------------------------ validation during training
def test_validation_during_training_is_logged(tmp_path, rendered_dataset):
    """val_every: the losses on held-out DRRs (split "val": small-c only) and held-out real images (``data.val_real``)
    are logged as "val" events; the same batches and masks each time (two validations in a row agree exactly)."""
    from xwin.schemas.cohort import SplitPolicy, SplitsDoc, VolumeSplit
    from xwin.storage import open_store
    from xwin.training.config import load_config
    from xwin.training.loop import Trainer, build_streams, build_val_streams

    url = str(tmp_path / "store")
    shutil.copytree(rendered_dataset.url, url)
    split = {"small-a": "train", "small-b": "train", "small-c": "val"}
    doc = SplitsDoc(
        cohort="small",
        policy=SplitPolicy(),
        volumes={v: VolumeSplit(subject=v, split=s) for v, s in split.items()},
    )
    open_store(url).update_splits("small", lambda cur: doc)
    real = _pngs(tmp_path / "real", [rendered_dataset.rings["small-a"][k] for k in (0, 30, 60, 90)], lambda v: v**0.6)
    ov = [
        f"out_dir={tmp_path / 'run'}",
        f"data.store={url}",
        "data.num_workers=0",
        "data.split=train",
        "data.val_split=val",
        "data.draws_per_volume=8",  # 8 held-out samples of small-c: two batches of 4
        f"data.val_real={real}",
        "data.real_batch_size=4",
        "val_every=2",
        "val_batches=2",
        "log_every=1",
        "ckpt_every=0",
    ]
    cfg = load_config(preset="tiny", overrides=ov)
    vsim, vreal = build_val_streams(cfg)
    assert set(next(iter(vsim))["volume_id"]) == {"small-c"} and vreal is not None
    sim, real_stream = build_streams(cfg)
    tr = Trainer(cfg, sim, real_stream)
    s = tr.run(max_steps=4)
    again = tr.validate()
    tr.close()
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in logs if r["event"] == "val"]
    assert [r["step"] for r in vals] == [2, 4, 4] and s["val"]["step"] == 4
    for r in vals:
        assert r["real"] and r["batches"] == 2
        for k in ("total", "align", "info_nce", "mim_sim", "mim_real", "cls", "domain"):
            assert math.isfinite(r[k]), (k, r)
    assert again is not None
    for k in ("total", "align", "mim_real", "cls"):
        assert again[k] == vals[1][k]  # same held-out batches and masks
    assert vals[0]["total"] != vals[1]["total"]  # the model changed in between
    # the training steps did not see the real images (no data.real): validation is where they come in
    assert "mim_real" not in [r for r in logs if r["event"] == "step"][-1]
    with pytest.raises(ValueError, match="val_split"):
        load_config(preset="tiny", overrides=[f"data.store={url}", "val_every=5"])
    with pytest.raises(ValueError, match=r"set data\.split"):
        load_config(preset="tiny", overrides=[f"data.store={url}", "val_every=5", "data.val_split=val"])
    # the command line: a validation split that does not exist is one line up front; one that does is in the summary
    from xwin.flows.cli import app

    argv = ["train", "--preset", "tiny", "--split", "train", "--max-steps", "2", "--out", str(tmp_path / "cli")]
    argv += ["--set", "data.num_workers=0", "--set", "val_every=1", "--set", "val_batches=1", "--json"]
    bad = CliRunner().invoke(app, [*argv, "--store", rendered_dataset.url, "--set", "data.val_split=val"])
    assert bad.exit_code == 2 and "no split assignment" in bad.output
    bad = CliRunner().invoke(app, [*argv, "--store", url, "--set", "data.val_split=test"])
    assert bad.exit_code == 2 and "holds no volume" in bad.output, bad.output
    ok = CliRunner().invoke(app, [*argv, "--store", url, "--set", "data.val_split=val"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["val"]["step"] == 2 and math.isfinite(summary["val"]["total"])
