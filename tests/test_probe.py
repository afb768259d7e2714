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


# ------------------------------------------------------------------------------ the paper's protocol (--labels)
def _synthetic_features(n_subjects=60, per_subject=3, dim=16, shift=4.0, seed=0):
    """Subjects with 3 images each; label "a" and "b" shift two feature directions, "noise" is a coin toss, "side"
    is known only where "a" is positive. Features of one subject share a subject offset (so a split that leaks
    subjects would be easier than one that does not)."""
    rng = np.random.default_rng(seed)
    subj = np.repeat([f"p{i:03d}" for i in range(n_subjects)], per_subject)
    ya = np.repeat(rng.random(n_subjects) < 0.5, per_subject).astype(float)
    yb = np.repeat(rng.random(n_subjects) < 0.4, per_subject).astype(float)
    side = np.where(ya == 1, np.repeat(rng.random(n_subjects) < 0.5, per_subject).astype(float), np.nan)
    noise = (rng.random(len(subj)) < 0.5).astype(float)
    x = rng.normal(size=(len(subj), dim)) + np.repeat(rng.normal(size=(n_subjects, dim)), per_subject, axis=0)
    x[:, 0] += shift * ya
    x[:, 1] += shift * yb
    x[:, 2] += shift * np.nan_to_num(side)
    return x.astype(np.float32), np.stack([ya, yb, side, noise], 1), subj, ["a", "b", "side", "noise"]


def test_probe_protocol_separable_gives_auroc_1_and_random_gives_chance():
    from xwin.training.probe import probe_protocol

    x, Y, subj, names = _synthetic_features(shift=12.0)
    rep = probe_protocol(x, Y, subj, names, shots=(4, 16), fractions=(0.1, 1.0), seeds=5, test_frac=0.3)
    assert rep["subjects"]["train"] + rep["subjects"]["test"] == 60 and rep["n_train"] + rep["n_test"] == 180
    for row in (rep["all"], rep["shots"]["16"]):
        for c in ("a", "b", "side"):
            assert row["auroc"][c]["mean"] > 0.97, (c, row)
    # 4 images per class, or 5 training subjects, in 16 dimensions: chance directions also separate the few
    # training images, so the probe is good but no longer perfect
    for row in (rep["fractions"]["0.1"], rep["shots"]["4"]):
        assert 0.75 < row["mean_auroc"]["mean"] < rep["all"]["mean_auroc"]["mean"]
    for row in (rep["all"], rep["fractions"]["0.1"], rep["shots"]["4"], rep["shots"]["16"]):
        assert abs(row["auroc"]["noise"]["mean"] - 0.5) < 0.15, row
    assert rep["all"]["seeds"] == 1 and rep["shots"]["4"]["seeds"] == 5
    assert rep["fractions"]["1"] == rep["all"]
    assert rep["fractions"]["0.1"]["train_subjects"] == 5  # ceil(0.1 * 42 training subjects)
    # "side" is unknown where "a" is negative: only the images with a known side are scored
    assert rep["test_positives"]["side"] + rep["test_negatives"]["side"] == int(
        np.sum(Y[:, 0][_test_mask(rep, x, Y, subj)] == 1)
    )
    # the mean over labels includes the chance label: (3 x ~1 + ~0.5) / 4
    assert rep["all"]["mean_auroc"]["mean"] == pytest.approx(np.mean([rep["all"]["auroc"][c]["mean"] for c in names]))
    # random features: every label at chance, on average over seeds and labels
    rnd = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    rep0 = probe_protocol(rnd, Y, subj, names, shots=(8,), fractions=(1.0,), seeds=5)
    assert abs(rep0["all"]["mean_auroc"]["mean"] - 0.5) < 0.15
    assert abs(rep0["shots"]["8"]["mean_auroc"]["mean"] - 0.5) < 0.15


def _test_mask(rep, x, Y, subj):
    from xwin.training.probe import grouped_split_multilabel

    _, te = grouped_split_multilabel(Y, subj, 0.3, 0)
    m = np.zeros(len(subj), bool)
    m[te] = True
    assert m.sum() == rep["n_test"]
    return m


def test_probe_protocol_more_labels_help_and_sd_is_over_seeds():
    from xwin.training.probe import probe_protocol

    x, Y, subj, names = _synthetic_features(n_subjects=80, shift=1.2, seed=3)
    rep = probe_protocol(x, Y[:, :2], subj, names[:2], shots=(2, 16), fractions=(0.05, 1.0), seeds=8)
    few, many = rep["shots"]["2"]["mean_auroc"], rep["shots"]["16"]["mean_auroc"]
    assert few["mean"] < many["mean"] <= rep["all"]["mean_auroc"]["mean"] + 0.02
    assert few["sd"] > many["sd"] > 0  # two images per class: the draws differ a lot
    assert 0.6 < rep["all"]["mean_auroc"]["mean"] < 0.99  # informative, not separable


def test_grouped_split_multilabel_keeps_subjects_whole_with_both_classes():
    from xwin.training.probe import grouped_split_multilabel

    _x, Y, subj, _names = _synthetic_features()
    for seed in range(5):
        tr, te = grouped_split_multilabel(Y, subj, 0.3, seed)
        assert not set(subj[tr]) & set(subj[te]) and len(tr) + len(te) == len(subj)
        for side in (tr, te):
            assert np.all(np.nansum(Y[side] == 1, 0) > 0) and np.all(np.nansum(Y[side] == 0, 0) > 0)
    only_pos = np.ones((10, 1))
    with pytest.raises(ValueError, match="positive and a negative"):
        grouped_split_multilabel(only_pos, np.arange(10).astype(str), 0.3, 0)


def test_k_shot_draws_k_per_class_from_distinct_subjects(monkeypatch):
    import xwin.training.probe as P

    x, Y, subj, names = _synthetic_features(n_subjects=40, shift=3.0)
    seen = []
    real = P.label_auroc

    def spy(features, y, tr, te, l2=1e-3):
        seen.append((y, tr.copy()))
        return real(features, y, tr, te, l2)

    monkeypatch.setattr(P, "label_auroc", spy)
    P.probe_protocol(x, Y, subj, names, shots=(4,), fractions=(), seeds=2)
    shot_calls = seen[len(names) :]  # after the "all" row
    assert len(shot_calls) == 2 * len(names)
    for y, tr in shot_calls:
        assert (y[tr] == 1).sum() == 4 and (y[tr] == 0).sum() == 4
        assert len(set(subj[tr])) == 8  # one image per subject


def test_cli_probe_labels_csv(tmp_path):
    """`xwin probe --labels CSV`: a label the images show (a bright square) is found, a coin-toss label is not."""
    from typer.testing import CliRunner

    from xwin.flows.cli import app
    from xwin.training.config import load_config
    from xwin.training.loop import Trainer
    from xwin.training.synthetic import SyntheticRingStream

    cfg = load_config(preset="tiny", overrides=[f"out_dir={tmp_path / 'run'}", "log_every=1000", "ckpt_every=0"])
    tr = Trainer(cfg, SyntheticRingStream(batch_size=2), None)
    tr.run(max_steps=1)
    ckpt = tr.save()
    tr.close()
    rng = np.random.default_rng(0)
    lines = ["path,subject,square,coin"]
    (tmp_path / "img").mkdir()
    for s in range(60):
        sq, coin = int(rng.random() < 0.5), int(rng.random() < 0.5)
        for v in range(2):
            img = rng.random((64, 64)).astype(np.float32) * 0.5
            if sq:
                img[20:44, 20:44] += 1.5
            name = f"img/s{s:02d}_{v}.npy"
            np.save(tmp_path / name, img)
            lines.append(f"{name},subj{s:02d},{sq},{coin}")
    lines.append("img/missing.npy,subj99,1,0")  # a missing image is skipped, not fatal
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    args = ["probe", "--checkpoint", str(ckpt), "--labels", str(csv), "--shots", "4,8", "--fractions", "0.2,1"]
    res = CliRunner().invoke(app, [*args, "--seeds", "3", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["labels"] == ["square", "coin"] and rep["skipped"] == {"img/missing.npy": "missing"}
    assert rep["n_train"] + rep["n_test"] == 120 and rep["subjects"]["train"] + rep["subjects"]["test"] == 60
    assert rep["all"]["auroc"]["square"]["mean"] > 0.95
    assert rep["shots"]["8"]["auroc"]["square"]["mean"] > 0.9
    coin = [rep[row][k]["auroc"]["coin"]["mean"] for row, k in (("shots", "4"), ("shots", "8"), ("fractions", "0.2"))]
    assert abs(np.mean([*coin, rep["all"]["auroc"]["coin"]["mean"]]) - 0.5) < 0.2, coin
    assert set(rep["shots"]) == {"4", "8"} and set(rep["fractions"]) == {"0.2", "1"}
    txt = CliRunner().invoke(app, [*args, "--seeds", "2"])
    assert txt.exit_code == 0 and "4-shot" in txt.stdout and "mean AUROC" in txt.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("path,subject,square\nimg/s00_0.npy,subj00,maybe\n")
    r = CliRunner().invoke(app, ["probe", "--checkpoint", str(ckpt), "--labels", str(bad)])
    assert r.exit_code != 0 and "line 2: square = 'maybe'" in r.output
    r = CliRunner().invoke(app, [*args[:5], "--shots", "four"])
    assert r.exit_code != 0 and "--shots" in r.output
    r = CliRunner().invoke(app, ["probe", "--checkpoint", str(ckpt)])
    assert r.exit_code != 0 and "--labels" in r.output
    r = CliRunner().invoke(app, [*args[:5], "--split", "test"])
    assert r.exit_code == 2 and "subject column" in r.output
