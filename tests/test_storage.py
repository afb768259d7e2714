"""Storage: local-filesystem path. Round trips, idempotency, spec refusal, chunk-level reads, claims, crash safety,
verify. The S3 path of the same contract is in test_storage_s3.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import zarr

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.schemas.ingest import HUStats, Provenance, VolumeRecord
from xwin.schemas.render import RenderSpec, ViewMeta
from xwin.schemas.store import ClaimRecord
from xwin.storage import ChecksumMismatch, ClaimHeld, NotCommitted, SpecMismatchError, open_store, sha256_of

REPO = Path(__file__).resolve().parents[1]
SPEC = RenderSpec(height=24, width=20, n_views=12, yaw_step_deg=30.0, store_dtype="float32")  # exact round trips
AFFINE = [[2.0, 0, 0, -30.0], [0, 2.0, 0, -28.0], [0, 0, 3.0, -27.0], [0, 0, 0, 1.0]]


def make_volume(vid: str = "vol-a", cohort: str = "c1", seed: int = 0, shape=(30, 28, 18)):
    hu = np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)
    rec = VolumeRecord(
        volume_id=vid,
        cohort=cohort,
        source=f"/data/{vid}.nii.gz",
        kind="nifti",
        shape=shape,
        spacing_mm=(2.0, 2.0, 3.0),
        affine=AFFINE,
        hu=HUStats(min=-1000, max=1499, mean=250, std=700, p01=-990, p99=1480, air_fraction=0.0),
        provenance=Provenance(reader="nibabel", versions={"nibabel": "5.4.2"}, input_checksum="abc", input_files=1),
    )
    return rec, hu


def make_ring(seed: int = 0, spec: RenderSpec = SPEC):
    """Smooth float32 views in the line-integral range 0..15 and the spec's ring geometry (as stored: ViewMeta)."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0 : spec.height, 0 : spec.width]
    k = np.arange(spec.n_views)[:, None, None]
    views = (7.5 + 7 * np.sin(r / 5.0 + k * 0.3 + seed) * np.cos(c / 7.0)).astype(np.float32)
    views += rng.normal(0, 0.01, views.shape).astype(np.float32)
    geom = ring_for_volume(spec, np.asarray(AFFINE), (30, 28, 18))
    return np.clip(views, 0, None), geom.view_meta()


# ---- volumes ---------------------------------------------------------------------------------------------------
def test_volume_round_trip_and_idempotent(tmp_path):
    store = open_store(tmp_path / "s")
    rec, hu = make_volume()
    assert not store.has_volume("vol-a")
    assert store.write_volume(rec, hu) is True
    path = store.volumes.get_commit("vol-a").path  # the writer's attempt folder, named by its commit record
    assert path.startswith("volumes/vol-a/attempt-")
    mtime = (tmp_path / "s" / path / "hu/c/0/0/0").stat().st_mtime_ns
    assert store.write_volume(rec, hu) is False  # identical: nothing rewritten
    assert (tmp_path / "s" / path / "hu/c/0/0/0").stat().st_mtime_ns == mtime
    assert store.has_volume("vol-a")
    rec2, hu2 = store.read_volume("vol-a")
    assert rec2 == rec and hu2.dtype == np.int16 and np.array_equal(hu2, hu)
    assert store.volume_record("vol-a") == rec
    # a fresh handle (another process's view) sees it through the catalog only
    store2 = open_store(tmp_path / "s", create=False)
    assert [r.volume_id for r in store2.list_volumes()] == ["vol-a"]
    assert store2.list_volumes(cohort="other") == []
    row = store2.volume_catalog()[0]
    assert row.checksum == sha256_of(hu) and row.status.value == "committed" and row.nbytes == hu.nbytes
    # a zarr-only reader finds the same voxels and record with no xwin code
    z = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert np.array_equal(z[f"{path}/hu"][...], hu)
    assert z[path].attrs["record"]["volume_id"] == "vol-a"
    # different voxels under the same id are refused, not silently mixed
    with pytest.raises(ChecksumMismatch):
        store.write_volume(rec, hu + 1)
    with pytest.raises(NotCommitted):
        store.read_volume("nope")
    with pytest.raises(ValueError, match="shape"):
        store.write_volume(make_volume("vol-b")[0], hu[:, :, :5])
    with pytest.raises(ValueError, match="invalid volume_id"):
        store.has_volume("../x")


# ---- rings -----------------------------------------------------------------------------------------------------
def test_ring_round_trip_metadata_and_geometry(tmp_path):
    store = open_store(tmp_path / "s")
    ds = store.dataset("c1", SPEC)
    views, geom = make_ring()
    rays = ConeBeamViews.from_view_meta(geom)
    assert not ds.has_ring("vol-a")
    assert ds.write_ring("vol-a", views, geom, {"source_ids": ["s1"]}) is True
    assert ds.write_ring("vol-a", views, geom, {"source_ids": ["s1"]}) is False
    assert ds.volume_ids() == ["vol-a"] and ds.has_ring("vol-a")
    idx = [7, 0, 7, 11]
    got, meta = ds.read_views("vol-a", idx)
    assert got.dtype == np.float32 and got.shape == (4, 24, 20)
    np.testing.assert_array_equal(got, views[idx])  # float32 spec: bit exact
    np.testing.assert_array_equal(meta.index, idx)
    np.testing.assert_allclose(meta.yaw_deg, np.asarray(SPEC.yaws_deg)[idx])
    np.testing.assert_array_equal(meta.cone_vec, rays.cone_vecs[idx])
    for j, k in enumerate(idx):
        T, K = rays.camera(k)
        np.testing.assert_array_equal(meta.world_from_camera[j], T)
        np.testing.assert_array_equal(meta.intrinsics[j], K)
    g2 = ConeBeamViews.from_view_meta(ds.read_geometry("vol-a"))
    assert (g2.height, g2.width) == (24, 20)
    np.testing.assert_array_equal(g2.cone_vecs, rays.cone_vecs)
    np.testing.assert_array_equal(g2.pixel_centres(3), rays.pixel_centres(3))
    prov = ds.provenance("vol-a")
    assert prov["source_ids"] == ["s1"] and prov["canonical_volume_id"] == "vol-a"
    assert prov["spec_hash"] == SPEC.spec_hash and prov["versions"]["zarr"] == zarr.__version__
    # the dataset group carries the full spec
    attrs = zarr.open_group(str(tmp_path / "s"), path=ds.path, mode="r").attrs["xwin"]
    assert RenderSpec.model_validate(attrs["spec"]) == SPEC and attrs["spec_hash"] == SPEC.spec_hash
    # bad input
    with pytest.raises(ValueError, match="views shape"):
        ds.write_ring("vol-b", views[:5], geom, {})
    bad = views.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ds.write_ring("vol-b", bad, geom, {})
    with pytest.raises(IndexError):
        ds.read_views("vol-a", [12])


def test_spec_mismatch_and_float16(tmp_path):
    store = open_store(tmp_path / "s")
    ds = store.dataset("c1", SPEC)
    # a tampered/other spec stored under this hash is refused with a clear error
    other = SPEC.model_copy(update={"sid_mm": 650.0})
    (tmp_path / "s" / ds.path / "_spec.json").write_text(other.canonical_json())
    with pytest.raises(SpecMismatchError, match="different render spec"):
        store.dataset("c1", SPEC)
    # a changed spec gets its own dataset and never mixes
    spec16 = SPEC.model_copy(update={"store_dtype": "float16"})
    assert spec16.spec_hash != SPEC.spec_hash
    ds16 = store.dataset("c1", spec16)
    views, geom = make_ring()
    ds16.write_ring("vol-a", views, geom, {})
    got, _ = ds16.read_views("vol-a", range(12))
    assert got.dtype == np.float32
    err = np.abs(got - views)
    # float16 rounding: |err| <= 2^-11 * |x| (half an ulp, 10-bit mantissa)
    assert np.all(err <= np.abs(views) * 2.0**-11 + 1e-7)
    assert err.max() > 0
    raw16, _ = ds16.read_views("vol-a", [3, 0, 3], dtype=None)  # stored dtype, no conversion
    assert raw16.dtype == np.float16
    np.testing.assert_array_equal(raw16, views[[3, 0, 3]].astype(np.float16))
    # the checksum hashed from the cast chunks during the write == sha256 of numpy's float16 array; verify agrees
    assert ds16.provenance("vol-a")["checksum"] == sha256_of(views.astype(np.float16))
    assert ds16.verify().clean and ds16.write_ring("vol-a", views, geom, {}) is False  # rerun: identical
    # a value float16 cannot hold is refused, naming the view; nothing becomes visible, no claim is left behind
    big = views.copy()
    big[7, 1, 1] = 1e6
    with pytest.raises(ValueError, match="view 7 exceeds the range of float16"):
        ds16.write_ring("vol-big", big, geom, {})
    assert not ds16.has_ring("vol-big") and ds16.scope.list_claims() == []
    assert {d.spec_hash for d in store.datasets()} == {SPEC.spec_hash, spec16.spec_hash}
    assert store.open_dataset("c1", spec16.spec_hash).spec == spec16


def test_read_views_reads_only_requested_chunks(tmp_path):
    store = open_store(tmp_path / "s")
    spec = RenderSpec(height=64, width=64, n_views=24, yaw_step_deg=15.0, store_dtype="float32")
    ds = store.dataset("c1", spec)
    rng = np.random.default_rng(3)
    views = rng.random((24, 64, 64), dtype=np.float32) * 15  # incompressible: chunk bytes ~ raw bytes
    ds.write_ring("v", views, ring_for_volume(spec, np.asarray(AFFINE), (30, 28, 18)).view_meta(), {})
    shard = (tmp_path / "s" / ds.scope.get_commit("v").path / "views/c/0/0/0").stat().st_size
    read = []
    orig = store.backend.get_ranges
    store.backend.get_ranges = lambda key, ranges: read.extend(orig(key, ranges)) or orig(key, ranges)
    got, _ = ds.read_views("v", [3, 17, 3])
    np.testing.assert_array_equal(got, views[[3, 17, 3]])
    nbytes = sum(len(x) for x in read)
    assert 2 * 64 * 64 * 4 * 0.8 < nbytes < shard * 0.15  # 2 distinct chunks of 24 + the index
    # the generic zarr path (used when the layout is not the expected one) gives the same result
    ds._handle("v").fast = None
    np.testing.assert_array_equal(ds.read_views("v", [3, 17, 3])[0], views[[3, 17, 3]])


def test_verify_finds_flipped_byte_deleted_chunk_and_row_without_data(tmp_path):
    root = tmp_path / "s"
    store = open_store(root)
    ds = store.dataset("c1", SPEC)
    for i, vid in enumerate(["r0", "r1", "r2", "r3"]):
        ds.write_ring(vid, *make_ring(i), {})
    rec, hu = make_volume("vol-a")
    store.write_volume(rec, hu)
    assert store.verify().model_dump()["ok"] == 5
    # 1. flip one byte in the middle of r1's shard
    p = root / ds.scope.get_commit("r1").path / "views/c/0/0/0"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    # 2. delete r2's chunk object
    (root / ds.scope.get_commit("r2").path / "views/c/0/0/0").unlink()
    # 3. a catalog row whose data and commit record are gone
    (root / ds.path / "_commits/r3.json").unlink()
    rep = ds.verify()
    assert rep.volumes == 4 and rep.ok == 1
    assert [i.volume_id for i in rep.corrupt] == ["r1"]
    assert sorted(i.volume_id for i in rep.missing) == ["r2", "r3"]
    assert "absent" in next(i for i in rep.missing if i.volume_id == "r2").reason
    full = store.verify()
    assert full.volumes == 5 and full.ok == 2 and not full.clean
    # the CLI reports the same and exits non-zero
    out = _cli("verify", "--store", str(root), "--json")
    assert out.returncode == 1, out.stderr
    js = json.loads(out.stdout)
    assert js["volumes"] == 5 and js["ok"] == 2
    assert [c["volume_id"] for c in js["corrupt"]] == ["r1"]
    assert sorted(m["volume_id"] for m in js["missing"]) == ["r2", "r3"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_status(tmp_path):
    root = tmp_path / "s"
    store = open_store(root)
    for i, (vid, cohort) in enumerate([("a", "c1"), ("b", "c1"), ("c", "c2")]):
        store.write_volume(*make_volume(vid, cohort, seed=i))
    store.dataset("c1", SPEC).write_ring("a", *make_ring(0), {})
    out = _cli("status", "--store", str(root), "--json")
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["volumes"]["counts"]["committed"] == 3
    assert js["volumes"]["per_cohort"] == {"c1": 2, "c2": 1}
    assert len(js["datasets"]) == 1 and js["datasets"][0]["counts"]["committed"] == 1
    assert js["datasets"][0]["spec_hash"] == SPEC.spec_hash
    out = _cli("verify", "--store", str(root))
    assert out.returncode == 0 and "4 ok" in out.stdout, out.stdout + out.stderr
    txt = _cli("status", "--store", str(root))
    assert txt.returncode == 0 and "c2" in txt.stdout


# ---- claims and crashes ------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import os, sys, time, json
    sys.path.insert(0, {tests!r})
    from test_storage import make_ring, make_volume, SPEC
    from xwin.storage import open_store, ClaimHeld
    from xwin.storage.scope import Scope
    mode, url = sys.argv[1], sys.argv[2]
    store = open_store(url)
    ds = store.dataset("c1", SPEC)
    def pause(tag):
        print(tag, flush=True)
        time.sleep(60)
    if mode == "hold":                      # hold a claim until killed
        with ds.claim("r0", ttl_s=30):
            pause("HOLDING")
    elif mode == "kill_before_commit":      # die after every data object is written, before the commit point
        from xwin.storage.scope import Claim
        Claim.decide = lambda self, rec: pause("WRITTEN")
        ds.write_ring("r0", *make_ring(0), {{}})
    elif mode == "kill_after_decide":       # die after the commit point, before the commit record exists
        Scope.put_commit = lambda self, rec: pause("DECIDED")
        ds.write_ring("r0", *make_ring(0), {{}})
    elif mode == "kill_before_catalog":     # die after the commit record, before the catalog row
        Scope.catalog_add = lambda self, row: pause("COMMITTED")
        ds.write_ring("r0", *make_ring(0), {{}})
    elif mode == "kill_mid_shard":          # die while the views shard is half streamed out
        from xwin.storage.local import LocalBackend
        orig_pp = LocalBackend.put_pieces
        def half_pp(self, key, pieces):
            if not key.endswith("views/c/0/0/0"):
                return orig_pp(self, key, pieces)
            pieces = list(pieces)
            def gen():
                for i, piece in enumerate(pieces):
                    if i == len(pieces) // 2:
                        pause("HALF")
                    yield piece
            return orig_pp(self, key, gen())
        LocalBackend.put_pieces = half_pp
        ds.write_ring("r0", *make_ring(0), {{}})
    elif mode == "stall":                   # a 2 s lease; announce the middle of the views shard, then go on slowly
        from xwin.storage import ClaimLost
        from xwin.storage.local import LocalBackend
        from xwin.storage.s3 import S3Backend
        B = type(store.backend)
        orig_pp = B.put_pieces
        def slow_pp(self, key, pieces):
            if not key.endswith("views/c/0/0/0"):
                return orig_pp(self, key, pieces)
            pieces = list(pieces)
            def gen():
                for i, piece in enumerate(pieces):
                    if i == len(pieces) // 2:
                        print("MIDWRITE", key, flush=True)
                        time.sleep(1.0)             # the test SIGSTOPs us in here
                    yield piece
            return orig_pp(self, key, gen())
        B.put_pieces = slow_pp
        try:
            with ds.claim("r0", ttl_s=2.0):
                ds.write_ring("r0", *make_ring(0), {{"writer": "A"}})
            print("COMMITTED", flush=True)
        except ClaimLost as e:
            print("LOST", e, flush=True)
    elif mode == "backfill":                # write rings r0..r5, skipping those claimed by the other process
        done = []
        for i in range(6):
            vid = f"r{{i}}"
            if ds.has_ring(vid):
                continue
            try:
                if ds.write_ring(vid, *make_ring(i), {{"writer": os.getpid()}}):
                    done.append(vid)
            except ClaimHeld:
                pass
        print(json.dumps(done), flush=True)
    """
).format(tests=str(REPO / "tests"))


def _spawn(mode: str, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, mode, url], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_line(p: subprocess.Popen, want: str, timeout: float = 60) -> None:
    t0 = time.time()
    line = p.stdout.readline()
    assert line.strip() == want, (line, p.stderr.read() if p.poll() is not None else "", time.time() - t0)


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


@pytest.mark.parametrize("mode,tag", [("kill_before_commit", "WRITTEN"), ("kill_mid_shard", "HALF")])
def test_sigkill_before_commit_leaves_nothing_visible_and_rerun_completes(tmp_path, mode, tag):
    url = str(tmp_path / "s")
    p = _spawn(mode, url)
    _wait_line(p, tag)
    _kill(p)
    store = open_store(url)
    ds = store.dataset("c1", SPEC)
    assert not ds.has_ring("r0") and ds.volume_ids() == []
    with pytest.raises(NotCommitted):
        ds.read_views("r0", [0])
    st = store.status().datasets[0].counts
    assert st["committed"] == 0 and st["stale_claim"] == 1  # the dead writer's claim, detected by pid
    # the rerun takes over the dead writer's claim at once and completes the ring
    views, geom = make_ring(0)
    assert ds.write_ring("r0", views, geom, {}) is True
    assert not list((tmp_path / "s").rglob("*.tmp"))  # the killed writer's partial object was cleaned up
    np.testing.assert_array_equal(ds.read_views("r0", range(12))[0], views)
    assert store.verify().clean and store.status().datasets[0].counts == {
        "committed": 1,
        "in_progress": 0,
        "stale_claim": 0,
    }


def test_sigkill_after_commit_before_catalog(tmp_path):
    url = str(tmp_path / "s")
    p = _spawn("kill_before_catalog", url)
    _wait_line(p, "COMMITTED")
    _kill(p)
    ds = open_store(url).dataset("c1", SPEC)
    assert ds.has_ring("r0")  # committed: its data is complete and verified
    assert ds.volume_ids() == []  # but not yet in the catalog
    assert [i.volume_id for i in ds.verify().uncataloged] == ["r0"]
    assert ds.write_ring("r0", *make_ring(0), {}) is False  # the rerun rewrites nothing, fixes the catalog
    assert ds.volume_ids() == ["r0"] and ds.verify().clean and not ds.verify().uncataloged


def test_claims_two_processes(tmp_path):
    url = str(tmp_path / "s")
    ds = open_store(url).dataset("c1", SPEC)
    p = _spawn("hold", url)
    try:
        _wait_line(p, "HOLDING")
        with pytest.raises(ClaimHeld, match="claimed by"), ds.claim("r0", ttl_s=30):
            pass
        with pytest.raises(ClaimHeld):
            ds.write_ring("r0", *make_ring(0), {})
        assert open_store(url).status().datasets[0].counts["in_progress"] == 1
    finally:
        _kill(p)
    # the holder died: its lease is taken over without waiting for the expiry
    with ds.claim("r0", owner="me", ttl_s=30) as c:
        assert ds.scope.get_claim("r0")[0].owner == "me" and not c.lost
        # re-entrant for the same owner: write_ring under our own claim
        assert ds.write_ring("r0", *make_ring(0), {}, owner="me")
    assert ds.scope.get_claim("r0") is None  # released


def test_claim_lease_expiry_from_other_host(tmp_path):
    ds = open_store(tmp_path / "s").dataset("c1", SPEC)
    now = datetime.now(UTC)
    foreign = ClaimRecord(
        volume_id="r0",
        owner="other-host:1",
        host="other-host",
        pid=1,
        acquired_at=now,
        expires_at=now + timedelta(seconds=1),
    )
    ds.scope.b.put(ds.scope.claim_key("r0"), foreign.model_dump_json().encode())
    with pytest.raises(ClaimHeld), ds.claim("r0", ttl_s=5):  # live lease of another host
        pass
    time.sleep(1.1)
    with ds.claim("r0", ttl_s=5):  # expired: taken over
        assert ds.scope.get_claim("r0")[0].owner != "other-host:1"


def test_two_concurrent_backfills(tmp_path):
    url = str(tmp_path / "s")
    open_store(url).dataset("c1", SPEC)
    ps = [_spawn("backfill", url) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in ps]
    assert all(p.returncode == 0 for p in ps), [o[1] for o in outs]
    done = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    ds = open_store(url).dataset("c1", SPEC)
    assert ds.volume_ids() == [f"r{i}" for i in range(6)]  # every ring committed and cataloged once
    assert sorted(done[0] + done[1]) == ds.volume_ids() or len(set(done[0]) & set(done[1])) == 0
    rep = ds.verify()
    assert rep.ok == 6 and rep.clean and not rep.uncataloged
    for i in range(6):
        np.testing.assert_array_equal(ds.read_ring(f"r{i}"), make_ring(i)[0])


def test_store_is_picklable_and_lock_files_bounded(tmp_path):
    import pickle

    store = open_store(tmp_path / "s")
    ds = store.dataset("c1", SPEC)
    for i in range(5):
        ds.write_ring(f"r{i}", *make_ring(i), {})
    s2 = pickle.loads(pickle.dumps(store))
    assert s2.url == store.url and s2.dataset("c1", SPEC).volume_ids() == [f"r{i}" for i in range(5)]
    assert len(os.listdir(tmp_path / "s/.locks")) <= 64


def test_catalog_buckets_new_and_legacy_width(tmp_path):
    """New stores spread the catalog over 256 buckets (2 hex digits); a store whose index predates the setting keeps
    its 16 one-digit buckets and reads and extends its catalog as before."""
    new = open_store(tmp_path / "new")
    ds = new.dataset("c1", SPEC)
    for i in range(3):
        ds.write_ring(f"r{i}", *make_ring(i), {})
    names = sorted(p.name for p in (tmp_path / "new" / ds.path / "_catalog").iterdir())
    assert names and all(len(n) == len("ab.json") for n in names)
    assert ds.volume_ids() == ["r0", "r1", "r2"] and ds.verify().clean
    # legacy index: no catalog_bucket_hex key -> 16 buckets named by one hex digit
    idx = json.loads((tmp_path / "new" / "xwin.json").read_text())
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    idx.pop("catalog_bucket_hex")
    idx["datasets"] = []
    (legacy / "xwin.json").write_text(json.dumps(idx))
    old = open_store(legacy)
    assert old.bucket_hex == 1
    dso = old.dataset("c1", SPEC)
    dso.write_ring("r0", *make_ring(0), {})
    assert [p.name for p in (legacy / dso.path / "_catalog").iterdir()] == [
        f"{hashlib.sha1(b'r0').hexdigest()[0]}.json"
    ]
    assert open_store(legacy).dataset("c1", SPEC).volume_ids() == ["r0"]


def test_find_dataset_and_find_ring(tmp_path):
    """One lookup for "the dataset holding a volume": by cohort, spec hash (prefix) and volume; a ring by id prefix."""
    store = open_store(tmp_path / "s")
    with pytest.raises(LookupError, match="no dataset"):
        store.find_dataset()
    other = SPEC.model_copy(update={"sid_mm": 650.0})
    store.dataset("c1", SPEC).write_ring("vol-a", *make_ring(0), {})
    store.dataset("c1", SPEC).write_ring("vol-ab", *make_ring(1), {})
    store.dataset("c2", other).write_ring("vol-b", *make_ring(2), {})
    with pytest.raises(LookupError, match="2 datasets"):
        store.find_dataset()
    assert store.find_dataset("c1").spec_hash == SPEC.spec_hash
    assert store.find_dataset(spec_hash=other.spec_hash[:6]).cohort == "c2"
    assert store.find_dataset(volume_id="vol-b").cohort == "c2"
    with pytest.raises(LookupError, match="volume 'vol-x'"):
        store.find_dataset(volume_id="vol-x")
    ds, vid = store.find_ring("vol-a")  # an exact id wins over the longer ids it prefixes
    assert (ds.cohort, vid) == ("c1", "vol-a")
    assert store.find_ring("vol-ab")[1] == "vol-ab" and store.find_ring("vol-b", cohort="c2")[1] == "vol-b"
    with pytest.raises(LookupError, match="ambiguous"):
        store.find_ring("vol")
    with pytest.raises(LookupError, match="no committed ring"):
        store.find_ring("vol-a", cohort="c2")


def test_write_ring_takes_a_whole_ring_of_view_meta(tmp_path):
    """The stored per-view metadata is the ring's own: views 0..V-1 in order, never a read selection."""
    ds = open_store(tmp_path / "s").dataset("c1", SPEC)
    views, meta = make_ring(0)
    order = np.arange(len(meta))[::-1]
    shuffled = ViewMeta(
        meta.index[order], meta.yaw_deg[order], meta.cone_vec[order], meta.world_from_camera[order],
        meta.intrinsics[order], meta.height, meta.width,
    )  # fmt: skip
    with pytest.raises(ValueError, match="in order"):
        ds.write_ring("r0", views, shuffled, {})
    assert not ds.has_ring("r0")
