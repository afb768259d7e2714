"""Linear probe (training/probe.py): AUROC against a pairwise count, and frontal-vs-lateral views of rendered CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xwin.training.probe import auroc, stratified_split


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=60), 1)  # rounding makes ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(s, y) == pytest.approx(ref, rel=1e-12)
    assert auroc(np.arange(5.0), np.array([0, 0, 0, 1, 1], bool)) == 1.0
    assert np.isnan(auroc(np.arange(3.0), np.zeros(3, bool)))


def test_grouped_split_keeps_groups_whole_and_every_class():
    from xwin.training.probe import grouped_split

    labels = np.array([0, 1] * 10)
    groups = np.repeat([f"s{i}" for i in range(5)], 4)
    for seed in range(5):
        tr, te = grouped_split(labels, groups, 0.3, seed)
        assert not set(groups[tr]) & set(groups[te]) and len(tr) + len(te) == 20
        assert set(labels[te]) == {0, 1} and set(labels[tr]) == {0, 1} and len(te) >= 6
    with pytest.raises(ValueError, match="groups"):
        grouped_split(labels, np.zeros(20, dtype=str), 0.3, 0)


def test_stratified_split_keeps_every_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    tr, te = stratified_split(labels, 0.3, seed=0)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 15
    for c in range(3):
        assert (labels[te] == c).sum() >= 1 and (labels[tr] == c).sum() >= 1


@pytest.fixture(scope="module")
def views_folder(tmp_path_factory, rendered_dataset):
    """Frontal (yaw within 15 deg of 0/180) vs lateral (of 90/270) rendered views, PNG, one folder per class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("probe_views")
    yaws = np.asarray(rendered_dataset.spec.yaws_deg)
    dist = lambda a: np.abs((yaws - a + 180) % 360 - 180)  # noqa: E731
    cls = {"frontal": (dist(0) <= 15) | (dist(180) <= 15), "lateral": (dist(90) <= 15) | (dist(270) <= 15)}
    for name, sel in cls.items():
        (root / name).mkdir()
        for vid, ring in rendered_dataset.rings.items():
            for k in np.flatnonzero(sel):
                v = ring[k]
                v = (v - v.min()) / (v.max() - v.min())
                Image.fromarray((v * 255).astype(np.uint8)).save(root / name / f"{vid}_{k:03d}.png")
    (root / "lateral" / "broken.png").write_bytes(b"not a png")  # a bad image is skipped, not fatal
    return root


def views_folder_volumes(root):
    return {p.name.split("_")[0] for p in root.rglob("*.png") if "_" in p.name}


def test_probe_frontal_vs_lateral(tmp_path, views_folder):
    from typer.testing import CliRunner

    from xwin.flows.cli import app
    from xwin.training.config import load_config
    from xwin.training.loop import Trainer
    from xwin.training.synthetic import SyntheticRingStream

    cfg = load_config(preset="tiny", overrides=[f"out_dir={tmp_path}", "log_every=1000", "ckpt_every=0"])
    tr = Trainer(cfg, SyntheticRingStream(batch_size=2), None)
    tr.run(max_steps=2)
    ckpt = tr.save()
    tr.close()
    # split by volume: the images of one ring never sit on both sides (neighbouring 3-degree views are near copies)
    by_volume = ["--group-by", r"^[^/]+/([^_/]+)_"]
    res = CliRunner().invoke(
        app, ["probe", "--checkpoint", str(ckpt), "--data", str(views_folder), *by_volume, "--json"]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["classes"] == ["frontal", "lateral"]
    assert rep["n_train"] + rep["n_test"] == 2 * 3 * 22  # 11 yaws around each of two angles per class, 3 volumes
    vols = set(views_folder_volumes(views_folder))
    assert set(rep["groups"]["train"]) | set(rep["groups"]["test"]) == vols
    assert not set(rep["groups"]["train"]) & set(rep["groups"]["test"]) and len(rep["groups"]["test"]) == 1
    assert rep["n_test"] == 2 * 22  # the held-out volume's frontal and lateral views
    assert any(p.endswith("broken.png") for p in rep["skipped"])
    # frontal and lateral chest views differ in shape: a frozen encoder + linear layer separates them on a volume
    # it never saw
    assert rep["auroc"]["frontal"] >= 0.9 and rep["auroc"]["lateral"] >= 0.9
    assert rep["auroc"]["frontal"] == pytest.approx(rep["auroc"]["lateral"])  # binary: one-vs-rest is symmetric
    # control: labels that carry no information (each image's class drawn at random) give chance AUROC, so the
    # figure above is not produced by the probe itself
    control = tmp_path / "control"
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (control / c).mkdir(parents=True)
    for p in sorted(views_folder.rglob("small-*.png")):
        dst = control / ("a" if rng.random() < 0.5 else "b") / p.name
        dst.write_bytes(p.read_bytes())
    ctl = CliRunner().invoke(app, ["probe", "--checkpoint", str(ckpt), "--data", str(control), *by_volume, "--json"])
    assert ctl.exit_code == 0, ctl.output
    auc = json.loads(ctl.stdout.strip().splitlines()[-1])["auroc"]["a"]
    assert abs(auc - 0.5) < 0.2, auc
    # --split: only the subjects (here: volumes) the subject-level hash puts in that split
    from xwin.pipeline.splits import split_for, unit_hash
    from xwin.schemas.cohort import SplitPolicy

    pol = SplitPolicy()
    in_train = sorted(v for v in vols if split_for(unit_hash(pol.salt, v), pol.fractions) == "train")
    assert len(in_train) >= 2  # small-a/b/c under the default salt
    sp = CliRunner().invoke(app, ["probe", "--checkpoint", str(ckpt), "--data", str(views_folder), *by_volume,
                                  "--split", "train", "--json"])  # fmt: skip
    assert sp.exit_code == 0, sp.output
    rep_sp = json.loads(sp.stdout.strip().splitlines()[-1])
    assert sorted(rep_sp["groups"]["train"] + rep_sp["groups"]["test"]) == in_train
    assert rep_sp["n_train"] + rep_sp["n_test"] == len(in_train) * 2 * 22 and rep_sp["split"] == "train"
    no_group = CliRunner().invoke(app, ["probe", "--checkpoint", str(ckpt), "--data", str(views_folder),
                                        "--split", "test"])  # fmt: skip
    assert no_group.exit_code != 0 and "--group-by" in no_group.output
    # a pattern that does not name every image is an error, not a silent ungrouped split
    bad = CliRunner().invoke(
        app, ["probe", "--checkpoint", str(ckpt), "--data", str(views_folder), "--group-by", "zzz"]
    )
    assert bad.exit_code != 0 and "does not match" in bad.output
    txt = CliRunner().invoke(app, ["probe", "--checkpoint", str(ckpt), "--data", str(views_folder)])
    assert txt.exit_code == 0 and "AUROC" in txt.stdout
