"""Commits that cannot lose data: fencing of stalled writers, compare-and-swap on the server's ETags, concurrent
readers. Each test runs on the local filesystem and on SeaweedFS (a real S3-compatible server, tests/seaweed.py)."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from test_storage import SPEC, _kill, _spawn, make_ring

from xwin.schemas.store import CatalogRow, ClaimRecord
from xwin.storage import ClaimHeld, ClaimLost, ConflictError, open_store
from xwin.storage.scope import holder_is_dead, process_identity


@pytest.fixture(params=["local", "seaweedfs"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "s")
    return request.getfixturevalue("seaweed_url")


def _objects(store, prefix: str) -> dict[str, bytes]:
    return {k: store.backend.read_all(k) for k in store.backend.list(prefix, include_partial=True)}


def test_stalled_writer_commits_nothing_and_deletes_nothing(store_url):
    """Writer A holds a 2 s lease and is SIGSTOPped in the middle of its views shard. B cannot take the live claim
    over until the lease expires, then commits. A gets SIGCONT, finishes its writes and tries to commit: it is
    refused, removes only its own attempt, and B's ring, commit record and objects are untouched."""
    store = open_store(store_url)
    ds = store.dataset("c1", SPEC)
    a = _spawn("stall", store_url)
    try:
        line = a.stdout.readline()
        assert line.startswith("MIDWRITE"), (line, a.stderr.read() if a.poll() is not None else "")
        a.send_signal(signal.SIGSTOP)
        a_key = line.split()[1]
        claim_a = ds.scope.get_claim("r0")[0]
        assert a_key.startswith(f"{ds.path}/rings/r0/{claim_a.attempt}/")  # A writes under its own attempt folder
        # A is stopped but its process exists: its live lease is not taken over (no hostname/pid guess)
        assert not holder_is_dead(claim_a)
        with pytest.raises(ClaimHeld):
            ds.write_ring("r0", *make_ring(0), {"writer": "B"})
        deadline = time.monotonic() + 10
        while not ds.scope.get_claim("r0")[0].expired():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        views, geom = make_ring(0)
        assert ds.write_ring("r0", views, geom, {"writer": "B"}) is True
        commit_b = ds.scope.get_commit("r0")
        assert commit_b.provenance["writer"] == "B" and ds.scope.get_claim("r0") is None
        before = _objects(store, commit_b.path + "/")
        a.send_signal(signal.SIGCONT)
        out, err = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            _kill(a)
    assert "LOST" in out and "COMMITTED" not in out, (out, err)
    # exactly one commit record, B's; B's objects byte-identical; A left nothing behind
    assert ds.scope.list_commits() == ["r0"] and ds.scope.get_commit("r0") == commit_b
    assert _objects(store, commit_b.path + "/") == before
    left = {k.split("/rings/r0/", 1)[1].split("/", 1)[0] for k in store.backend.list(f"{ds.path}/rings/r0/")}
    assert left == {commit_b.path.rsplit("/", 1)[1], "zarr.json"}
    assert ds.scope.get_claim("r0") is None and ds.volume_ids() == ["r0"]
    rep = ds.verify()
    assert rep.ok == 1 and rep.clean
    np.testing.assert_array_equal(ds.read_ring("r0"), views)


def test_lost_claim_can_neither_decide_nor_release(store_url):
    ds = open_store(store_url).dataset("c1", SPEC)
    old = ds.scope.acquire_claim("r0", "A", ttl_s=0.5, heartbeat=False)
    time.sleep(0.6)
    new = ds.scope.acquire_claim("r0", "B", ttl_s=30, heartbeat=False)  # expired: taken over
    assert new.record.generation == old.record.generation + 1 and new.token != old.token
    rec = ds.scope.get_claim("r0")
    with pytest.raises(ClaimLost):
        old.renew()
    with pytest.raises(ClaimLost):
        old.decide(ds.scope.get_commit("r0") or _a_commit(ds))
    old.release()  # must not delete B's claim (release used to be get-then-delete)
    assert ds.scope.get_claim("r0") == rec
    new.release()
    assert ds.scope.get_claim("r0") is None


def _a_commit(ds):
    from xwin.schemas.store import CommitRecord, EntryKind

    return CommitRecord(
        volume_id="r0",
        kind=EntryKind.ring,
        cohort="c1",
        path=f"{ds.path}/rings/r0/attempt-x",
        array="views",
        shape=(1, 1, 1),
        dtype="float32",
        nbytes=4,
        checksum="sha256:0",
        writer="A",
    )


def test_decided_commit_of_a_dead_writer_is_rolled_forward(tmp_path):
    """Killed after its commit point (claim swapped to "committing") but before the commit record: the next writer
    completes that commit from the claim instead of writing the ring again."""
    url = str(tmp_path / "s")
    p = _spawn("kill_after_decide", url)
    line = p.stdout.readline()
    assert line.strip() == "DECIDED", (line, p.stderr.read() if p.poll() is not None else "")
    _kill(p)
    ds = open_store(url).dataset("c1", SPEC)
    claim = ds.scope.get_claim("r0")[0]
    assert claim.state == "committing" and not ds.has_ring("r0")
    assert ds.write_ring("r0", *make_ring(0), {}) is False  # rolled forward: the dead writer's data is committed
    assert ds.scope.get_commit("r0") == claim.commit and ds.scope.get_claim("r0") is None
    assert ds.volume_ids() == ["r0"] and ds.verify().clean
    np.testing.assert_array_equal(ds.read_ring("r0"), make_ring(0)[0])


def test_dead_holder_needs_the_same_boot_and_pid_namespace():
    me = process_identity()
    now = datetime.now(UTC)
    base = ClaimRecord(
        volume_id="v", owner="o", host="h", pid=2**22 - 7, acquired_at=now, expires_at=now + timedelta(hours=1), **me
    )
    if me["boot_id"] is None:  # pragma: no cover - not Linux: only expiry frees a claim
        assert not holder_is_dead(base)
        return
    assert holder_is_dead(base)  # same kernel and pid namespace, no such pid: dead
    assert not holder_is_dead(base.model_copy(update={"pid_ns": me["pid_ns"] + 1}))  # another container
    assert not holder_is_dead(base.model_copy(update={"boot_id": "another-machine"}))
    assert not holder_is_dead(base.model_copy(update={"boot_id": None}))  # claims written without an identity
    import os

    alive = base.model_copy(update={"pid": os.getppid(), "start_ticks": None})
    assert not holder_is_dead(alive)
    from xwin.storage.scope import _start_ticks

    parent = base.model_copy(update={"pid": os.getppid(), "start_ticks": _start_ticks(os.getppid())})
    assert not holder_is_dead(parent)  # alive
    assert holder_is_dead(parent.model_copy(update={"start_ticks": parent.start_ticks + 1}))  # pid reused


# ---- ETags ------------------------------------------------------------------------------------------------------
def _multipart_put(store, key: str, data: bytes) -> str:
    """Write ``key`` with a multipart upload: its ETag is '<md5 of part md5s>-1', not the md5 of the bytes (as
    under SSE-KMS or SSE-C). Returns that ETag."""
    c = store.backend.fs  # an s3fs filesystem on the store's server and credentials
    bucket, k = store.backend._split(key)
    up = c.call_s3("create_multipart_upload", Bucket=bucket, Key=k)
    part = c.call_s3("upload_part", Bucket=bucket, Key=k, UploadId=up["UploadId"], PartNumber=1, Body=data)
    done = c.call_s3(
        "complete_multipart_upload",
        Bucket=bucket,
        Key=k,
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    c.invalidate_cache(store.backend._k(key))
    return str(done["ETag"]).strip('"')


def test_catalog_update_uses_the_server_etag(seaweed_url):
    import hashlib

    store = open_store(seaweed_url)
    ds = store.dataset("c1", SPEC)
    ds.write_ring("r0", *make_ring(0), {})
    # rewrite r1's catalog bucket (here: absent -> an empty list) with a multipart upload
    b = ds.scope.bucket_of("r1")
    etag = _multipart_put(store, ds.scope.bucket_key(b), b"[]")
    assert etag != hashlib.md5(b"[]").hexdigest() and etag.endswith("-1")
    assert store.backend.get(ds.scope.bucket_key(b)) == (b"[]", etag)
    # the commit's compare-and-swap on that bucket succeeds (a client-side md5 would get 412 every time)
    assert ds.write_ring("r1", *make_ring(1), {}) is True
    assert ds.volume_ids() == ["r0", "r1"]


def test_stale_if_match_is_refused_and_the_update_retried_on_fresh_state(store_url, monkeypatch):
    store = open_store(store_url)
    ds = store.dataset("c1", SPEC)
    scope, backend = ds.scope, store.backend
    key = scope.bucket_key("00")
    first = backend.put(key, b"[]", if_none_match=True)
    second = backend.put(key, b"[ ]", if_match=first)
    with pytest.raises(ConflictError):
        backend.put(key, b"[]", if_match=first)  # stale: 412
    with pytest.raises(ConflictError):
        backend.delete(key, if_match=first)
    assert backend.get(key) == (b"[ ]", second)
    backend.delete(key, if_match=second)
    assert backend.get(key) is None

    # a catalog update loses the race once to another writer's update of the same bucket: it retries on fresh state
    vid_a, vid_b = "a0", "b0"
    b = scope.bucket_of(vid_a)
    vid_b = next(v for v in (f"b{i}" for i in range(10_000)) if scope.bucket_of(v) == b)
    row = CatalogRow(
        volume_id=vid_a,
        kind="ring",
        cohort="c1",
        path="p",
        shape=(1, 1, 1),
        dtype="float32",
        nbytes=4,
        checksum="sha256:0",
        committed_at=datetime.now(UTC),
    )
    other = row.model_copy(update={"volume_id": vid_b})
    orig = type(backend).put
    raced = threading.Event()
    refused = []

    def put(self, k, data, **kw):
        if k == scope.bucket_key(b) and not raced.is_set():
            raced.set()
            scope.catalog_add(other)  # another writer's update lands between our read and our write
            try:
                return orig(self, k, data, **kw)
            except ConflictError:
                refused.append(k)
                raise
        return orig(self, k, data, **kw)

    monkeypatch.setattr(type(backend), "put", put)
    scope.catalog_add(row)
    assert refused == [scope.bucket_key(b)]
    assert [r.volume_id for r in scope.catalog()] == sorted([vid_a, vid_b])


# ---- concurrent readers ----------------------------------------------------------------------------------------
def test_concurrent_reads_share_the_ring_handle_cache(tmp_path):
    store = open_store(tmp_path / "s")
    ds = store.dataset("c1", SPEC)
    rings = {f"r{i}": make_ring(i)[0] for i in range(8)}
    for vid, views in rings.items():
        ds.write_ring(vid, views, make_ring(0)[1], {})
    reader = open_store(tmp_path / "s", create=False).open_dataset("c1", SPEC.spec_hash)
    reader._cache_size = 2  # constant eviction: every thread opens, moves and evicts handles
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                vid = f"r{rng.integers(8)}"
                idx = rng.integers(0, SPEC.n_views, 3)
                got, meta = reader.read_views(vid, idx)
                np.testing.assert_array_equal(got, rings[vid][idx])
                assert np.array_equal(meta.index, idx)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(reader._cache) <= 2


def test_ingest_skips_a_volume_another_live_writer_holds(tmp_path, small_ct_path):
    """Two `xwin ingest` runs of one cohort at once: the second finds the first writing a volume (a live claim)
    and reports it skipped (claimed-elsewhere) instead of failing its run."""
    from xwin.pipeline.ingest import ingest_sources, plan_inputs
    from xwin.storage import ClaimHeld

    store = open_store(tmp_path / "s")
    (cand,), _ = plan_inputs([str(small_ct_path)], "c1")
    other = store.volumes.acquire_claim(cand.volume_id, "another-run", ttl_s=60, heartbeat=False)
    try:
        with pytest.raises(ClaimHeld):  # without the callback the held claim is an error of the run
            ingest_sources([str(small_ct_path)], "c1", store)
        s = ingest_sources([str(small_ct_path)], "c1", store, held=lambda e: isinstance(e, ClaimHeld))
        assert [e.stage for e in s.skipped] == ["claimed-elsewhere"] and not s.done and not s.failed
        assert s.planned == 1 and not store.has_volume(cand.volume_id)
    finally:
        other.release()
    s = ingest_sources([str(small_ct_path)], "c1", store, held=lambda e: isinstance(e, ClaimHeld))
    assert [e.volume_id for e in s.done] == [cand.volume_id]


def test_a_decide_whose_answer_was_lost_still_commits(store_url, monkeypatch):
    """The decide PUT lands on the server but its answer is lost and the resend is refused (412): the writer must
    see that the claim on the server is its own decided one and finish the commit, never delete what it points at."""
    store = open_store(store_url)
    ds = store.dataset("c1", SPEC)
    B = type(store.backend)
    real_put = B.put
    hit = []

    def put(self, key, data, **kw):
        etag = real_put(self, key, data, **kw)
        if key.endswith("_claims/r0.json") and b'"committing"' in data and not hit:
            hit.append(key)
            raise ConflictError(f"{key}: 412 on the resend of a PUT that landed")
        return etag

    monkeypatch.setattr(B, "put", put)
    views, geom = make_ring(0)
    assert ds.write_ring("r0", views, geom, {}) is True and hit
    np.testing.assert_array_equal(ds.read_ring("r0"), views)
    assert ds.verify().clean and ds.scope.get_claim("r0") is None


def test_a_failure_after_the_decision_leaves_the_commit_to_roll_forward(tmp_path, monkeypatch):
    """put_commit fails after the claim was swapped to committing: the claim is not deleted on the way out (it is
    the decision), and the next writer rolls it forward instead of losing it."""
    from xwin.storage.scope import Scope

    ds = open_store(tmp_path / "s").dataset("c1", SPEC)
    real = Scope.put_commit
    monkeypatch.setattr(Scope, "put_commit", lambda self, rec: (_ for _ in ()).throw(OSError(5, "EIO, injected")))
    views, geom = make_ring(0)
    with pytest.raises(OSError):
        ds.write_ring("r0", views, geom, {})
    claim = ds.scope.get_claim("r0")
    assert claim is not None and claim[0].state == "committing" and not ds.has_ring("r0")
    monkeypatch.setattr(Scope, "put_commit", real)
    assert ds.write_ring("r0", views, geom, {}) is False  # rolled forward: the first writer's data
    assert ds.scope.get_commit("r0") == claim[0].commit and ds.verify().clean
    np.testing.assert_array_equal(ds.read_ring("r0"), views)


def test_threads_of_one_owner_do_not_share_a_claim(tmp_path):
    ds = open_store(tmp_path / "s").dataset("c1", SPEC)
    got: list = []
    with ds.claim("r0", owner="same") as mine:

        def other() -> None:
            try:
                with ds.claim("r0", owner="same"):
                    got.append("shared")
            except ClaimHeld:
                got.append("held")

        t = threading.Thread(target=other)
        t.start()
        t.join()
        with ds.claim("r0", owner="same") as again:  # same thread: re-entrant
            assert again is mine
    assert got == ["held"]


def test_verify_lists_and_removes_leftover_attempt_folders(store_url):
    """A writer killed (or fenced off) after another writer committed the entry leaves its attempt folder: deep
    verify lists it as an orphan (garbage, not damage: the store stays clean), --remove-orphans deletes it, and the
    committed data is untouched."""
    from typer.testing import CliRunner

    from xwin.flows.cli import app

    store = open_store(store_url)
    ds = store.dataset("c1", SPEC)
    views, geom = make_ring(0)
    ds.write_ring("r0", views, geom, {})
    c = ds.scope.get_commit("r0")
    base = c.path.rsplit("/", 1)[0]
    store.backend.put(f"{base}/attempt-0123456789abcdef/views/c/0/0/0", b"half a shard of a killed writer")
    store.backend.put(f"{base}/attempt-0123456789abcdef/views/zarr.json", b"{}")
    rep = store.verify()
    assert rep.clean and [i.reason for i in rep.orphans] == [
        "leftover attempt folder attempt-0123456789abcdef (2 objects)"
    ]
    assert not store.verify(deep=False).orphans  # shallow verify does not list folders
    out = CliRunner().invoke(app, ["verify", "--store", store_url, "--remove-orphans"])
    assert out.exit_code == 0 and "ORPHAN" in out.output and "removed attempt folder" in out.output, out.output
    assert not store.verify().orphans and not store.backend.list(f"{base}/attempt-0123456789abcdef/")
    np.testing.assert_array_equal(ds.read_ring("r0"), views)


def test_verify_repair_makes_the_store_say_what_it_holds(store_url):
    """A commit missing from the catalog and a catalog row without a commit are damage (exit 1); --repair adds the
    row, drops the dangling one, removes the orphan attempt folders of a committed entry and of an entry that never
    committed (with its stale claim), leaves a live writer's folder alone, and a second --repair has nothing to do."""
    from typer.testing import CliRunner

    from xwin.flows.cli import app
    from xwin.storage.layout import ring_path

    store = open_store(store_url)
    ds = store.dataset("c1", SPEC)
    rings = {v: make_ring(i) for i, v in enumerate(("r0", "r1"))}
    for v, (views, geom) in rings.items():
        ds.write_ring(v, views, geom, {})
    scope = ds.scope
    scope._cas_bucket(scope.bucket_of("r1"), lambda rows: {k: r for k, r in rows.items() if k != "r1"})
    scope.catalog_add(scope.catalog_row("r0").model_copy(update={"volume_id": "r9"}))  # a row without a commit
    orphan = f"{ring_path(ds.path, 'r0')}/attempt-0123456789abcdef"
    never = f"{ring_path(ds.path, 'r5')}/attempt-fedcba9876543210"
    live = f"{ring_path(ds.path, 'r6')}/attempt-00000000000000aa"
    for folder in (orphan, never, live):
        store.backend.put(f"{folder}/views/zarr.json", b"{}")
    stale = scope.acquire_claim("r5", "killed-writer", ttl_s=0.3, heartbeat=False)
    holder = scope.acquire_claim("r6", "live-writer", ttl_s=60, heartbeat=False)
    time.sleep(0.4)
    assert scope.claim_is_stale(stale.record)

    rep = store.verify()
    assert not rep.clean
    assert [(i.volume_id, i.reason) for i in rep.uncataloged] == [("r1", "commit record not in catalog")]
    assert [(i.volume_id, i.reason) for i in rep.missing] == [("r9", "catalog row without commit record")]
    assert sorted(i.volume_id for i in rep.orphans) == ["r0", "r5"]  # r6's writer is live: its own business
    cli = CliRunner()
    out = cli.invoke(app, ["verify", "--store", store_url])
    assert out.exit_code == 1 and "UNCATALOGED" in out.output, out.output

    out = cli.invoke(app, ["verify", "--store", store_url, "--repair"])
    assert out.exit_code == 0, out.output
    repaired = sorted(line.split("REPAIRED ", 1)[1] for line in out.output.splitlines() if "REPAIRED" in line)
    assert repaired == [
        f"{ds.path}/r0: removed attempt folder attempt-0123456789abcdef (1 objects)",
        f"{ds.path}/r1: catalog row added for its commit record",
        f"{ds.path}/r5: removed attempt folder attempt-fedcba9876543210 (1 objects)",
        f"{ds.path}/r5: stale claim removed",
        f"{ds.path}/r9: catalog row without a commit record dropped",
    ], out.output
    assert sorted(ds.volume_ids()) == scope.list_commits() == ["r0", "r1"]
    assert not store.backend.list(orphan + "/") and not store.backend.list(never + "/")
    assert store.backend.list(live + "/") and scope.get_claim("r6")[0] == holder.record
    assert scope.get_claim("r5") is None
    out = cli.invoke(app, ["verify", "--store", store_url, "--repair"])  # idempotent: nothing left to do
    assert out.exit_code == 0 and "REPAIRED" not in out.output, out.output
    for v, (views, _) in rings.items():
        np.testing.assert_array_equal(ds.read_ring(v), views)
    holder.release()


def test_the_skip_check_of_a_rerun_repairs_a_missing_catalog_row(tmp_path):
    """A writer that died between its commit record and its catalog row: the rerun's skip check (what the backfill,
    ingest and render use) re-adds the row before it reports the ring skipped."""
    ds = open_store(tmp_path / "s").dataset("c1", SPEC)
    ds.write_ring("r0", *make_ring(0), {})
    ds.scope._cas_bucket(ds.scope.bucket_of("r0"), lambda rows: {})
    assert ds.volume_ids() == [] and ds.has_ring("r0") and not ds.verify().clean
    assert ds.settled("r0") and ds.volume_ids() == ["r0"] and ds.verify().clean
    assert not ds.settled("r1")


def test_a_renewal_that_landed_but_raised_keeps_the_claim(tmp_path, monkeypatch):
    """A renewal lands but its answer is lost (the call raises): the holder's ETag is stale. Ownership is the token:
    the next renewal finds our token on the server and goes on, and the commit still goes through."""
    ds = open_store(tmp_path / "s").dataset("c1", SPEC)
    claim = ds.scope.acquire_claim("r0", "A", ttl_s=30, heartbeat=False)
    B = type(ds.store.backend)
    real_put = B.put
    lost = []

    def put(self, key, data, **kw):
        etag = real_put(self, key, data, **kw)
        if key.endswith("_claims/r0.json") and not lost:
            lost.append(key)
            raise TimeoutError("the answer of a PUT that landed")
        return etag

    monkeypatch.setattr(B, "put", put)
    with pytest.raises(TimeoutError):
        claim.renew()
    claim.renew()  # not ClaimLost: the claim on the server carries our token
    assert not claim.lost and ds.scope.get_claim("r0")[0].token == claim.token
    claim.decide(_a_commit(ds))
    assert ds.scope.get_claim("r0")[0].state == "committing"
