"""Storage on S3 for real: moto's server on 127.0.0.1, transient 5xx faults injected by an HTTP proxy, a writer
SIGKILLed mid-write. The store code is the same as the local path; only the backend differs."""

from __future__ import annotations

import http.client
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import make_s3_bucket
from test_storage import SPEC, _kill, _spawn, _wait_line, make_ring, make_volume

from xwin.storage import NotCommitted, open_store


@pytest.fixture()
def s3_url(s3_server):
    return make_s3_bucket(s3_server, f"xwin-{uuid.uuid4().hex[:10]}") + "/store"


def test_s3_round_trip_catalog_verify(s3_url, caplog):
    caplog.set_level(logging.INFO)
    store = open_store(s3_url)
    rec, hu = make_volume("vol-a")
    assert store.write_volume(rec, hu) is True and store.write_volume(rec, hu) is False
    ds = store.dataset("c1", SPEC)
    views, geom = make_ring(0)
    assert ds.write_ring("vol-a", views, geom, {"source_ids": ["x"]}) is True
    assert ds.write_ring("vol-a", views, geom, {}) is False
    # a fresh reader: catalog-driven discovery, chunk reads, geometry
    s2 = open_store(s3_url, create=False)
    assert [r.volume_id for r in s2.list_volumes("c1")] == ["vol-a"]
    r2, hu2 = s2.read_volume("vol-a")
    assert r2 == rec and np.array_equal(hu2, hu)
    ds2 = s2.open_dataset("c1", SPEC.spec_hash)
    got, meta = ds2.read_views("vol-a", [1, 9])
    np.testing.assert_array_equal(got, views[[1, 9]])
    np.testing.assert_array_equal(meta.cone_vec, geom.cone_vec[[1, 9]])
    np.testing.assert_array_equal(ds2.read_geometry("vol-a").cone_vec, geom.cone_vec)
    rep = s2.verify()
    assert rep.volumes == 2 and rep.ok == 2 and rep.clean
    st = s2.status()
    assert st.volumes.per_cohort == {"c1": 1} and st.datasets[0].counts["committed"] == 1
    # corruption on S3 is found too: overwrite the shard object with flipped bytes
    fs = store.backend.fs
    key = f"{store.backend.path}/{ds.scope.get_commit('vol-a').path}/views/c/0/0/0"
    b = bytearray(fs.cat_file(key))
    b[len(b) // 3] ^= 0x55
    fs.pipe_file(key, bytes(b))
    assert [i.volume_id for i in open_store(s3_url).verify().corrupt] == ["vol-a"]
    # credentials never reach logs or reprs
    assert "testing" not in repr(store) and "testing" not in caplog.text


class _FaultProxy:
    """HTTP proxy in front of moto answering every ``every``-th request with 503 SlowDown (a transient S3 error)."""

    def __init__(self, upstream: str, every: int = 3) -> None:
        host, port = upstream.replace("http://", "").split(":")
        self.n = 0
        self.faults = 0
        lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _go(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    outer.n += 1
                    fail = outer.n % every == 0
                    outer.faults += fail
                if fail:
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                c = http.client.HTTPConnection(host, int(port), timeout=30)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() not in ("expect",)}
                c.request(self.command, self.path, body=body, headers=hdrs)
                r = c.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                c.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _go

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_s3_transient_errors_are_retried(s3_server, s3_url):
    proxy = _FaultProxy(s3_server, every=4)
    try:
        # botocore's own retries off (its backoff sleeps up to seconds): s3fs's and xwin's retry layers must cope
        opts = {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        store = open_store(s3_url, storage_options=opts)
        ds = store.dataset("c1", SPEC)
        rec, hu = make_volume("vol-a")
        store.write_volume(rec, hu)
        ds.write_ring("r0", *make_ring(0), {})
        assert proxy.faults >= 10  # a quarter of all requests failed with 503 ...
    finally:
        proxy.close()
    # ... yet everything is committed and intact, seen through a direct (fault-free) connection
    s2 = open_store(s3_url)
    rep = s2.verify()
    assert rep.volumes == 2 and rep.ok == 2 and rep.clean and not rep.uncataloged
    for i in range(1):
        np.testing.assert_array_equal(s2.dataset("c1", SPEC).read_ring(f"r{i}"), make_ring(i)[0])


def test_retrying_store_absorbs_connection_errors(tmp_path):
    """The zarr-level retry wrapper (every zarr read of the store goes through it) retries errors raised below it."""
    import zarr

    from xwin.storage.retry import RetryingStore

    calls = {"get": 0}

    class Flaky(zarr.storage.WrapperStore):
        async def get(self, key, prototype, byte_range=None):
            calls["get"] += 1
            if calls["get"] % 2 == 1:
                raise ConnectionResetError("connection reset by peer")
            return await self._store.get(key, prototype, byte_range)

    store = open_store(tmp_path / "s")
    ds = store.dataset("c1", SPEC)
    views, geom = make_ring(0)
    assert ds.write_ring("r0", views, geom, {})
    store._zstore = RetryingStore(Flaky(zarr.storage.LocalStore(tmp_path / "s")))
    np.testing.assert_array_equal(ds.read_ring("r0"), views)
    assert ds.verify().clean
    assert calls["get"] >= 12  # half of them failed and were retried


def test_s3_sigkill_mid_write_then_rerun(s3_url):
    p = _spawn("kill_before_commit", s3_url)
    _wait_line(p, "WRITTEN")
    _kill(p)
    store = open_store(s3_url)
    ds = store.dataset("c1", SPEC)
    killed = [k for k in store.backend.list(f"{ds.path}/rings/r0/") if k.endswith("views/c/0/0/0")]
    assert len(killed) == 1  # the data objects are there (in the killed writer's attempt folder) ...
    assert not ds.has_ring("r0") and ds.volume_ids() == []  # ... but invisible without the commit record
    with pytest.raises(NotCommitted):
        ds.read_views("r0", [0])
    assert ds.write_ring("r0", *make_ring(0), {}) is True
    assert ds.volume_ids() == ["r0"] and ds.verify().clean
    # the rerun's commit removed the killed attempt's objects: one attempt folder is left, the committed one
    left = {k.split("/rings/r0/", 1)[1].split("/", 1)[0] for k in store.backend.list(f"{ds.path}/rings/r0/")}
    assert left == {ds.scope.get_commit("r0").path.rsplit("/", 1)[1], "zarr.json"}
