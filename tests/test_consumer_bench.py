"""The consumer benchmark's WebDataset baseline (``xwin.training.data.bench``): its tar cache is keyed by the content
it was built from, and it reads ahead with the same threads as the stream it is compared with (or both read none)."""

from __future__ import annotations

import io
import tarfile
import threading

import numpy as np
import pytest
import torch

from xwin.schemas.render import RenderSpec
from xwin.training.data import StoreSource
from xwin.training.data.bench import WdsXWin, default_wds_dir, run_bench, wds_content_key, write_wds_shards
from xwin.training.data.sampling import XWinSampling

SPEC = RenderSpec(height=8, width=8, pixel_mm=64.0)  # 120 views at 3 deg, tiny detector


def _store(path, seed: int, ids=("v0", "v1", "v2")) -> tuple[StoreSource, dict[str, np.ndarray]]:
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.storage import open_store

    geom = ring_for_volume(SPEC, np.eye(4), (16, 16, 16))
    ds = open_store(str(path)).dataset("c", SPEC)
    rng = np.random.default_rng(seed)
    rings = {}
    for vid in ids:
        rings[vid] = rng.uniform(0.5, 4.0, (SPEC.n_views, SPEC.height, SPEC.width)).astype(np.float32)
        ds.write_ring(vid, rings[vid], geom.view_meta(), {"test": seed})
    return StoreSource(str(path), "c", SPEC), rings


def _tar_view(shards: list[str], vid: str, k: int) -> np.ndarray:
    for p in shards:
        with tarfile.open(p) as t:
            names = t.getnames()
            if f"{vid}.{k:03d}.npy" in names:
                f = t.extractfile(f"{vid}.{k:03d}.npy")
                assert f is not None
                return np.load(io.BytesIO(f.read()))
    raise KeyError(vid)


def test_tar_cache_is_keyed_by_content(tmp_path):
    a, rings_a = _store(tmp_path / "a", seed=1)
    b, rings_b = _store(tmp_path / "b", seed=2)  # same cohort, spec and volume ids; other pixels
    ka, kb = wds_content_key(a.open(), 3), wds_content_key(b.open(), 3)
    assert ka and kb and ka != kb
    assert wds_content_key(a.open(), 3) == ka and wds_content_key(a.open(), 2) != ka
    assert default_wds_dir(a.open(), 3) != default_wds_dir(b.open(), 3)
    out = tmp_path / "wds"
    shards = write_wds_shards(a, out, n_shards=3)
    np.testing.assert_array_equal(_tar_view(shards, "v1", 7), rings_a["v1"][7].astype(np.float16))
    stamp = (out / "content.json").stat().st_mtime_ns
    assert write_wds_shards(a, out, n_shards=3) == shards and (out / "content.json").stat().st_mtime_ns == stamp
    # the same directory, a dataset with the same spec hash and ids but other content: rebuilt, not reused
    shards = write_wds_shards(b, out, n_shards=3)
    np.testing.assert_array_equal(_tar_view(shards, "v1", 7), rings_b["v1"][7].astype(np.float16))
    # fewer shards than before: no stale shard file left behind
    assert len(write_wds_shards(b, out, n_shards=2)) == 2 and len(list(out.glob("shard-*.tar"))) == 2


def _samples(shards, **kw) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ds = WdsXWin(shards, SPEC, XWinSampling(), 8, "none", 2, dtype=torch.float32, **kw)
    out = {}
    seen_threads = set()
    for b in ds:
        seen_threads |= {t.name.split("_")[0] for t in threading.enumerate()}
        for i, vid in enumerate(b["volume_id"]):
            out[vid] = (b["context"][i].numpy().copy(), b["actions"][i].numpy().copy())
    return out, seen_threads


def test_baseline_reads_ahead_on_threads_with_the_same_samples(tmp_path):
    src, _ = _store(tmp_path / "s", seed=3, ids=tuple(f"v{i}" for i in range(7)))
    shards = write_wds_shards(src, tmp_path / "wds", n_shards=2)
    plain, t0 = _samples(shards)
    ahead, t1 = _samples(shards, io_threads=2, prefetch=3)
    assert sorted(plain) == sorted(ahead) == [f"v{i}" for i in range(7)]  # every record once, none lost at the end
    for vid in plain:
        np.testing.assert_array_equal(plain[vid][0], ahead[vid][0])
        np.testing.assert_array_equal(plain[vid][1], ahead[vid][1])
    assert "wds-read" in t1 and "wds-read" not in t0


@pytest.mark.parametrize("io_threads", [None, 0])
def test_run_bench_gives_both_readers_the_same_read_ahead(tmp_path, monkeypatch, io_threads):
    import xwin.training.data.bench as bench

    src, _ = _store(tmp_path / "s", seed=4, ids=tuple(f"v{i}" for i in range(4)))
    seen: dict[str, dict] = {"wds": {}, "stream": {}}
    real_wds, real_stream = bench.WdsXWin.__init__, bench.XWinStream.__init__

    def spy_wds(self, *a, **kw):
        seen["wds"].update(kw)
        real_wds(self, *a, **kw)

    def spy_stream(self, *a, **kw):
        seen["stream"].update(kw)
        real_stream(self, *a, **kw)

    monkeypatch.setattr(bench.WdsXWin, "__init__", spy_wds)
    monkeypatch.setattr(bench.XWinStream, "__init__", spy_stream)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    res = run_bench(
        src,
        workers=(0,),
        samples=2,
        batch_size=2,
        image_size=8,
        appearance="none",
        fresh_buffers=False,
        io_threads=io_threads,
    )
    want = (2, 4) if io_threads is None else (0, 0)  # the stream's defaults (ResumableStream), or none for both
    assert (res["io_threads"], res["prefetch"]) == want
    assert (seen["wds"]["io_threads"], seen["wds"]["prefetch"]) == want
    assert (seen["stream"]["io_threads"], seen["stream"]["prefetch"]) == want
    assert res["wds_dir"].startswith(str(tmp_path / "xwin-wds-"))
    assert all(m["seconds"] > 0 for m in res["rows"][0]["measures"]["wds"])
