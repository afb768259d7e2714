"""Dataset exports read back by the libraries they are for (``webdataset``, ``datasets``), equal to the store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.storage import interchange as ic
from xwin.storage import open_store


@pytest.fixture(scope="module")
def ds(rendered_dataset):
    return open_store(rendered_dataset.url).dataset(rendered_dataset.cohort, rendered_dataset.spec, create=False)


def stored(ds, vid):
    return ds.read_views(vid, np.arange(ds.spec.n_views), dtype=None)


def test_webdataset_per_ring_read_back_equals_store(ds, tmp_path):
    import webdataset as wds

    events = []
    rep = ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=2, on_progress=events.append)
    assert rep.written == ["train-000000.tar", "train-000001.tar"] and rep.samples == 3
    assert [e["done"] for e in events] == [1, 2] and not any(e["skipped"] for e in events)
    urls = [str(tmp_path / n) for n in rep.written]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert sorted(got) == [f"{v}/ring" for v in ds.volume_ids()]
    for vid in ds.volume_ids():
        s = got[f"{vid}/ring"]
        views, meta = stored(ds, vid)
        assert s["views.npy"].dtype == np.float16 and np.array_equal(s["views.npy"], views)
        g = s["geometry.json"]
        assert np.array_equal(np.asarray(g["cone_vec"]), meta.cone_vec)
        assert np.array_equal(np.asarray(g["world_from_camera"]), meta.world_from_camera)
        assert np.array_equal(np.asarray(g["intrinsics"]), meta.intrinsics)
        assert g["index"] == list(range(120)) and (g["height"], g["width"]) == (64, 64)
        assert s["actions.json"]["yaw_deg"] == [3.0 * k for k in range(120)]
        assert s["meta.json"]["volume_id"] == vid and s["meta.json"]["spec_hash"] == ds.spec_hash
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["rings"] == 3 and index["samples"] == 3 and [s["samples"] for s in index["shards"]] == [2, 1]


def test_webdataset_per_view_and_ids_with_dots(ds, tmp_path):
    import webdataset as wds

    rep = ic.export_rings(ds, tmp_path, "webdataset", per="view", rings_per_shard=8)
    assert rep.samples == 3 * 120
    views, meta = stored(ds, "small-b")
    n = 0
    for s in wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode():
        vid, k = s["__key__"].split("/")
        n += 1
        if vid == "small-b" and int(k) in (0, 31, 119):
            k = int(k)
            assert np.array_equal(s["view.npy"], views[k])
            assert s["geometry.json"]["yaw_deg"] == meta.yaw_deg[k] == s["actions.json"]["yaw_deg"]
            assert np.array_equal(np.asarray(s["geometry.json"]["cone_vec"]), meta.cone_vec[k])
    assert n == 360
    # a volume id with dots stays one key: the id is the key's folder (webdataset splits the name at its first dot)
    sample = ic.ring_samples(ds, "small-a", "train", "webdataset", "ring")[0][0]
    sample["__key__"] = "ct.1.2.840/ring"
    w = ic._TarWriter(tmp_path / "dots.tar")
    w.add([sample])
    w.close()
    (s,) = list(wds.WebDataset(str(tmp_path / "dots.tar"), shardshuffle=False).decode())
    assert s["__key__"] == "ct.1.2.840/ring" and {"views.npy", "geometry.json", "actions.json"} <= set(s)


def test_export_resumes_after_an_interruption(ds, tmp_path, monkeypatch):
    real = ic.ring_samples
    calls = []

    def dies_on_third(ds_, vid, *a):
        calls.append(vid)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real(ds_, vid, *a)

    monkeypatch.setattr(ic, "ring_samples", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=2)
    assert (tmp_path / "train-000000.tar.json").exists() and not (tmp_path / "train-000001.tar").exists()
    monkeypatch.setattr(ic, "ring_samples", real)
    first = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    rep = ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=2)
    assert rep.skipped == ["train-000000.tar"] and rep.written == ["train-000001.tar"] and rep.rings == 1
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first
    # the resumed export equals a fresh one, byte for byte
    fresh = ic.export_rings(ds, tmp_path / "fresh", "webdataset", rings_per_shard=2)
    for name in fresh.written:
        assert (tmp_path / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    # a shard whose manifest names other rings (another plan) is rewritten, not skipped
    rep = ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=3)
    assert rep.written == ["train-000000.tar"] and rep.skipped == []
    # and the earlier plan's second shard is gone: a reader globbing the folder sees every ring once
    assert sorted(p.name for p in tmp_path.glob("*.tar*")) == ["train-000000.tar", "train-000000.tar.json"]


@pytest.mark.parametrize("per", ["ring", "view"])
def test_hf_dataset_read_back_equals_store(ds, tmp_path, per):
    import datasets

    rep = ic.export_rings(ds, tmp_path / "hf", "hf", per=per, rings_per_shard=2, card_markdown="# Dataset card: x")
    assert rep.written == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert readme.startswith("---\nconfigs:") and "# Dataset card: x" in readme
    d = datasets.load_dataset(str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "cache"))
    assert d.features["views" if per == "ring" else "view"].dtype == "float16"
    d = d.with_format("numpy", dtype=None)  # the stored dtypes (datasets' numpy format casts floats to float32)
    assert len(d) == (3 if per == "ring" else 360)
    for vid in ds.volume_ids():
        views, meta = stored(ds, vid)
        rows = [i for i, v in enumerate(d["volume_id"]) if v == vid]
        if per == "ring":
            (i,) = rows
            row = d[i]
            assert row["views"].dtype == np.float16 and np.array_equal(row["views"], views)
            assert np.array_equal(row["cone_vec"], meta.cone_vec) and np.array_equal(row["yaw_deg"], meta.yaw_deg)
            assert np.array_equal(row["intrinsics"], meta.intrinsics)
        else:
            assert len(rows) == 120
            for i in rows[::40]:
                row = d[i]
                k = int(row["index"])
                assert np.array_equal(row["view"], views[k]) and np.array_equal(row["cone_vec"], meta.cone_vec[k])
                assert np.array_equal(row["world_from_camera"], meta.world_from_camera[k])


def test_export_dataset_cli(rendered_dataset, tmp_path):
    args = ["export", "--store", rendered_dataset.url, "--what", "dataset", "--cohort", "small", "--out"]
    r = CliRunner().invoke(app, [*args, str(tmp_path / "w"), "--format", "webdataset", "--rings-per-shard", "2"])
    assert r.exit_code == 0, r.output
    assert "[1/2] train-000000.tar: 2 samples" in r.output and "wrote 2 shards (3 rings, 3 samples" in r.output
    assert "# Dataset card: small" in (tmp_path / "w" / "README.md").read_text()
    r = CliRunner().invoke(app, [*args, str(tmp_path / "w"), "--format", "webdataset", "--rings-per-shard", "2"])
    assert r.exit_code == 0 and "complete, skipped" in r.output and "skipped 2 complete" in r.output
    r = CliRunner().invoke(app, [*args, str(tmp_path / "x"), "--format", "zip"])
    assert r.exit_code == 2 and "--format: 'zip'" in r.output
    r = CliRunner().invoke(app, [*args, str(tmp_path / "x"), "--format", "hf", "--per", "slab"])
    assert r.exit_code == 2 and "--per: 'slab'" in r.output
    r = CliRunner().invoke(app, ["export", "--store", rendered_dataset.url, "--what", "views", "--out", "v.npy"])
    assert r.exit_code == 2 and "--volume: required with --what views" in r.output


def test_splits_become_shards_and_hf_splits(tmp_path, rendered_dataset):
    """A cohort with a stored split assignment: each split gets its own shards, README names each split's files,
    and ``datasets`` loads each split with exactly its rings; a ring the assignment does not name is 'unassigned'."""
    import datasets

    from xwin.schemas.cohort import SplitPolicy, SplitsDoc, VolumeSplit

    st = open_store(str(tmp_path / "store"))
    ds = st.dataset("c2", rendered_dataset.spec)
    meta = rendered_dataset.geometry.view_meta()
    for i, vid in enumerate(["v0", "v1", "v2", "v3"]):
        ds.write_ring(vid, rendered_dataset.rings["small-a"] * np.float32(1 + i / 10), meta, {})
    split = {"v0": "train", "v1": "val", "v2": "train"}
    st.update_splits(
        "c2",
        lambda _: SplitsDoc(
            cohort="c2", policy=SplitPolicy(), volumes={v: VolumeSplit(subject=v, split=s) for v, s in split.items()}
        ),
    )
    assert ic.ring_splits(ds, ds.volume_ids()) == {**split, "v3": "unassigned"}
    rep = ic.export_rings(ds, tmp_path / "hf", "hf", rings_per_shard=1)
    assert rep.written == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/unassigned-00000-of-00001.parquet",
        "data/val-00000-of-00001.parquet",
    ]
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "  - split: val\n    path: data/val-*.parquet" in readme
    for name, ids in (("train", ["v0", "v2"]), ("val", ["v1"]), ("unassigned", ["v3"])):
        d = datasets.load_dataset(str(tmp_path / "hf"), split=name, cache_dir=str(tmp_path / "cache"))
        assert sorted(d["volume_id"]) == ids and set(d["split"]) == {name}
        row = d.with_format("numpy", dtype=None)[0]
        assert np.array_equal(row["views"], stored(ds, row["volume_id"])[0])


def test_an_interrupted_rerun_leaves_no_index_naming_gone_shards(ds, tmp_path, monkeypatch):
    """index.json marks a complete export: a rerun that changes the folder removes it first and writes it last, so
    a rerun killed midway never leaves an index listing shards that were deleted or are being rewritten."""
    first = ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=2)
    assert first.written == ["train-000000.tar", "train-000001.tar"] and (tmp_path / "index.json").exists()
    real = ic.ring_samples

    def dies(*a):
        raise KeyboardInterrupt  # killed while writing the new plan's first shard

    monkeypatch.setattr(ic, "ring_samples", dies)
    with pytest.raises(KeyboardInterrupt):
        ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=3)
    assert not (tmp_path / "train-000001.tar").exists()  # the earlier plan's second shard is gone ...
    assert not (tmp_path / "index.json").exists() and not (tmp_path / "README.md").exists()  # ... and so is its index
    monkeypatch.setattr(ic, "ring_samples", real)
    rep = ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=3)
    assert rep.written == ["train-000000.tar"] and rep.rings == 3
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(s["shard"], s["ids"]) for s in index["shards"]] == [("train-000000.tar", sorted(ds.volume_ids()))]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "index.json",
        "train-000000.tar",
        "train-000000.tar.json",
    ]
    # a rerun with nothing to do keeps the index in place (the same bytes)
    before = (tmp_path / "index.json").read_text()
    rep = ic.export_rings(ds, tmp_path, "webdataset", rings_per_shard=3)
    assert rep.written == [] and rep.skipped == ["train-000000.tar"]
    assert json.loads((tmp_path / "index.json").read_text())["shards"] == json.loads(before)["shards"]


def test_export_out_must_be_a_folder_and_npy_goes_where_asked(rendered_dataset, tmp_path):
    """--out of the wrong kind is one line before anything is read or created; a .npy lands at the path given."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    base = ["export", "--store", rendered_dataset.url, "--cohort", "small"]
    r = CliRunner().invoke(app, [*base, "--what", "dataset", "--format", "webdataset", "--out", str(a_file)])
    assert r.exit_code == 2 and f"--out {a_file}: is a file, not a folder" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        app, [*base, "--what", "geometry", "--format", "astra", "--volume", "small-a", "--out", str(a_file)]
    )
    assert r.exit_code == 2 and f"--out {a_file}: is a file, not a folder" in r.output
    r = CliRunner().invoke(
        app, [*base, "--what", "views", "--volume", "small-a", "--out", str(a_file / "below" / "v.npy")]
    )
    assert r.exit_code == 2 and f"{a_file} is a file, not a folder" in r.output
    assert a_file.read_text() == "x"
    r = CliRunner().invoke(app, [*base, "--what", "views", "--volume", "small-a", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder: give the file to write" in r.output
    r = CliRunner().invoke(app, [*base, "--what", "views", "--volume", "small-b", "--out", str(tmp_path / "views")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "views"]  # not views.npy: the path as given
    got = np.load(tmp_path / "views")
    assert got.shape == (120, 64, 64) and np.array_equal(got, rendered_dataset.rings["small-b"].astype(np.float16))


@pytest.mark.parametrize(("what", "formats"), [("dataset", "webdataset, hf"), ("geometry", "rtk, astra, diffdrr")])
def test_export_without_format_says_it_is_required(rendered_dataset, tmp_path, what, formats):
    args = ["export", "--store", f"{rendered_dataset.url}#small", "--what", what, "--volume", "small-a"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and f"error: --format: required with --what {what}: one of {formats}" in r.output
    assert not (tmp_path / "x").exists()
