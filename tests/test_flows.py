"""Backfill flow: outcomes, idempotent reruns, crash/resume, retries, Dask scale-out, landing scan, CLI, inspect.

Small CTs (tests/conftest small_ct_path, shifted copies so every series has its own content id) and a small spec
(64x64 detector, 8 views) keep every run to a few seconds; Prefect tests share the session server ``prefect_api``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xwin.flows import backfill as bf
from xwin.flows import reports as rep
from xwin.flows import tasks
from xwin.flows.params import BackfillParams
from xwin.flows.runtime import LocalStages
from xwin.schemas.ingest import RejectReason
from xwin.schemas.render import RenderSpec
from xwin.storage import is_transient, open_store

SPEC = RenderSpec(height=64, width=64, pixel_mm=6.0, n_views=8, yaw_step_deg=45.0)
REPO = Path(__file__).resolve().parents[1]


def _variant(src: Path, dst: Path, offset: int) -> Path:
    """A copy of ``src`` with ``offset`` HU added inside the body (other content, same geometry)."""
    img = nib.load(str(src))
    a = np.asarray(img.dataobj).astype(np.int16)
    a = np.where(a > -500, a + offset, a).astype(np.int16)
    nib.save(nib.Nifti1Image(a, img.affine), str(dst))
    return dst


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, small_ct_path):
    """5 good small CTs (distinct content) + 1 file that is not a NIfTI."""
    d = tmp_path_factory.mktemp("cohort")
    good = [_variant(small_ct_path, d / f"ct{k}.nii.gz", 3 * k) for k in range(5)]
    bad = d / "broken.nii.gz"
    bad.write_bytes(b"this is not a gzip stream")
    return good, bad


def _params(store, sources, **kw) -> BackfillParams:
    return BackfillParams(
        cohort="test", store=str(store), source=[str(s) for s in sources], spec=SPEC, backend="joseph", **kw
    )


def _expected_ring(path: Path) -> np.ndarray:
    """Independent path to the same ring: ingest + render without flows or storage."""
    from xwin.pipeline.ingest import load_candidate, plan_inputs
    from xwin.pipeline.render import render_ring

    (c,), _ = plan_inputs([str(path)], "test")
    rec, hu = load_candidate(c)
    views, _ = render_ring(hu, np.asarray(rec.affine), SPEC, "joseph")
    return views.astype(SPEC.store_dtype).astype(np.float32)  # as stored (rounded to spec.store_dtype)


# ---- policy units --------------------------------------------------------------------------------------------
def test_transient_classification():
    from botocore.exceptions import ClientError

    from xwin.pipeline.ingest import IngestError

    assert is_transient(OSError(errno.EIO, "I/O error"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    assert is_transient(slow)
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put")
    assert not is_transient(denied)
    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not is_transient(IngestError(RejectReason.unreadable_file, "x"))
    assert not is_transient(ValueError("bad shape"))


def test_shards_partition_ids():
    ids = [f"{k:024x}" for k in range(200)]
    owners = [[i for i in range(4) if tasks.in_shard(v, f"{i}/4")] for v in ids]
    assert all(len(o) == 1 for o in owners)
    counts = np.bincount([o[0] for o in owners], minlength=4)
    assert counts.min() > 25  # roughly balanced


# ---- serverless path (same body, LocalStages) ----------------------------------------------------------------
def test_local_backfill_outcomes_rerun_and_values(tmp_path, cohort):
    """2 good + 1 bad: 2 done, 1 rejected with its reason; stored pixels match an independent render."""
    good, bad = cohort
    store = tmp_path / "store"
    s1 = bf.run_local(_params(store, [good[0], good[1], bad], verify="deep"))
    assert len(s1.done) == 2 and not s1.skipped
    assert [r.reason for r in s1.rejected] == [RejectReason.unreadable_file]
    assert str(bad) in s1.rejected[0].detail
    ds = open_store(str(store)).dataset("test", SPEC)
    assert sorted(ds.volume_ids()) == sorted(e.volume_id for e in s1.done)
    # stored pixels == an independent ingest + render of the same file
    vid0 = next(e.volume_id for e in s1.done if e.input == str(good[0]))
    np.testing.assert_allclose(ds.read_ring(vid0), _expected_ring(good[0]), rtol=1e-6, atol=1e-6)
    # preview montage beside the store, linked from the run summary
    reports = Path(rep.reports_url(str(store)))
    png = reports / "previews" / "test" / SPEC.spec_hash / f"{vid0}.png"
    im = Image.open(png)
    assert im.size == (4 * 256 + 3 * 4, 256)
    (md,) = (reports / "runs").glob("*.md")
    text = md.read_text()
    assert "| done | 2 |" in text and "| rejected: unreadable_file | 1 |" in text and png.as_uri() in text
    # rerun: nothing is ingested or rendered again
    stages = LocalStages(max_workers=2)
    with stages:
        s2 = bf.run_backfill(_params(store, [good[0], good[1], bad]), stages)
    assert s2.counts() == {"done": 0, "skipped": 2, "rejected": 1, "failed": 0}
    assert stages.attempts == {"plan-series": 1}


def test_local_retries_transient_not_bad_input(tmp_path, cohort, monkeypatch):
    good, _ = cohort
    store = tmp_path / "store"
    real = tasks.store_handle(str(store))

    class Flaky:
        """The real store whose first write_volume fails with EIO (a transient I/O error)."""

        fails = 1

        def __getattr__(self, k):
            return getattr(real, k)

        def write_volume(self, *a, **kw):
            if Flaky.fails:
                Flaky.fails -= 1
                raise OSError(errno.EIO, "injected I/O error")
            return real.write_volume(*a, **kw)

    monkeypatch.setattr(tasks, "store_handle", lambda url: Flaky())
    import xwin.pipeline.render as render_mod

    real_render = render_mod.render_ring

    from xwin.pipeline.ingest import load_candidate, plan_inputs

    (c1,), _ = plan_inputs([str(good[1])], "test")
    doomed = int(load_candidate(c1)[1].sum(dtype=np.int64))

    def render_or_fail(hu, affine, spec, backend="auto", **kw):
        if int(np.asarray(hu).sum(dtype=np.int64)) == doomed:  # a deterministic (non-transient) render failure
            raise ValueError("degenerate volume (injected)")
        return real_render(hu, affine, spec, backend, **kw)

    monkeypatch.setattr(render_mod, "render_ring", render_or_fail)
    stages = LocalStages(max_workers=2, sleep=lambda s: None)
    with stages:
        summary = bf.run_backfill(_params(store, good[:2], verify="none"), stages)
    assert [e.input for e in summary.done] == [str(good[0])]
    assert [(r.input, r.reason) for r in summary.rejected] == [(str(good[1]), RejectReason.render_failed)]
    assert "degenerate volume" in summary.rejected[0].detail
    # one transient failure retried once; the render failure was not retried
    assert stages.attempts["ingest-series"] == 3
    assert stages.attempts["render-series"] == 2


def test_local_landing_scan_processes_only_new(tmp_path, cohort):
    from xwin.flows.landing import scan_once

    good, bad = cohort
    landing = tmp_path / "landing"
    landing.mkdir()
    for p in (good[0], bad):
        (landing / p.name).write_bytes(p.read_bytes())
    store = str(tmp_path / "store")
    s1, new1 = scan_once(str(landing), "test", store, SPEC, "joseph")
    assert (len(new1), s1.counts()) == (2, {"done": 1, "skipped": 0, "rejected": 1, "failed": 0})
    s2, new2 = scan_once(str(landing), "test", store, SPEC, "joseph")
    assert new2 == [] and s2.counts() == {"done": 0, "skipped": 0, "rejected": 0, "failed": 0}
    (landing / good[1].name).write_bytes(good[1].read_bytes())
    s3, new3 = scan_once(str(landing), "test", store, SPEC, "joseph")
    assert new3 == [str(landing / good[1].name)] and s3.counts() == {
        "done": 1,
        "skipped": 0,
        "rejected": 0,
        "failed": 0,
    }


def test_cli_backfill_json_and_inspect(tmp_path, cohort):
    from xwin.flows.cli import app

    good, bad = cohort
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(SPEC.model_dump_json())
    store = tmp_path / "store"
    r = CliRunner().invoke(
        app,
        [
            "backfill",
            "--cohort",
            "test",
            "--store",
            str(store),
            "--source",
            str(good[2]),
            "--source",
            str(bad),
            "--spec",
            str(spec_file),
            "--backend",
            "joseph",
            "--no-prefect",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert [d["input"] for d in out["done"]] == [str(good[2])]
    assert [x["reason"] for x in out["rejected"]] == ["unreadable_file"]
    vid = out["done"][0]["volume_id"]
    png = tmp_path / "sheet.png"
    r = CliRunner().invoke(
        app,
        ["inspect", "--store", str(store), "--volume", vid[:10], "--out", str(png), "--big", "128", "--thumb", "32"],
    )
    assert r.exit_code == 0, r.output
    sheet = np.asarray(Image.open(png))
    ds = open_store(str(store)).dataset("test", SPEC)
    views = ds.read_ring(vid)
    yaws = [float(y) for y in ds.read_geometry(vid).yaw_deg]
    # the large frontal tile (yaw 0) sits top-left below the title line
    frontal = np.asarray(rep._tile(views[yaws.index(0.0)], 128, "yaw 0"))
    np.testing.assert_array_equal(sheet[18 + 4 : 18 + 4 + 128, 4 : 4 + 128], frontal)
    lateral = np.asarray(rep._tile(views[yaws.index(90.0)], 128, "yaw 90"))
    np.testing.assert_array_equal(sheet[22 : 22 + 128, 4 + 128 + 4 : 4 + 2 * 128 + 4], lateral)
    assert sheet.shape == (18 + 128 + 8 + 32 + 4 + 4, max(2 * 128 + 12, 8 * 36 + 4))


# ---- through a real Prefect server -----------------------------------------------------------------------------
def _task_runs(flow_run_id, name_prefix: str, expect: int | None = None, timeout_s: float = 15.0):
    """Task runs of one flow run whose name starts with ``name_prefix`` (task run records reach the server
    through its event pipeline: wait up to ``timeout_s`` for ``expect`` final ones)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = _read_task_runs(flow_run_id, name_prefix)
        if (
            expect is None
            or time.monotonic() > deadline
            or (len(runs) == expect and all(t["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for t in runs))
        ):
            return runs
        time.sleep(0.25)


def _api(path: str, body: dict) -> list[dict]:
    """POST a filter to the Prefect API with every paging field explicit (prefect 3.8.8's own sync helpers send
    null limit/offset, which this server build rejects with 422)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    r = httpx.post(PREFECT_API_URL.value().rstrip("/") + path, json={"offset": 0, "limit": 200, **body}, timeout=30)
    r.raise_for_status()
    return r.json()


def _read_task_runs(flow_run_id, name_prefix: str) -> list[dict]:
    trs = _api("/task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "sort": "ID_DESC"})
    return [t for t in trs if t["name"].startswith(name_prefix)]


def _artifact(key: str) -> dict:
    (a,) = _api("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "UPDATED_DESC", "limit": 1})
    return a


@pytest.mark.prefect
def test_prefect_backfill_three_series_then_rerun(prefect_api, tmp_path, cohort, monkeypatch):
    good, bad = cohort
    store = tmp_path / "store"
    # a transient I/O error on the first volume write: the Prefect engine retries the task
    real = tasks.store_handle(str(store))
    fails = [1]

    class Flaky:
        def __getattr__(self, k):
            return getattr(real, k)

        def write_volume(self, *a, **kw):
            if fails[0]:
                fails[0] -= 1
                raise OSError(errno.EIO, "injected I/O error")
            return real.write_volume(*a, **kw)

    monkeypatch.setattr(tasks, "store_handle", lambda url: Flaky())
    monkeypatch.setattr(bf, "ingest_series", bf.ingest_series.with_options(retry_delay_seconds=[0.1] * 3))
    kw = {
        "cohort": "test",
        "store": str(store),
        "source": [str(good[0]), str(good[1]), str(bad)],
        "spec": SPEC,
        "backend": "joseph",
    }
    state = bf.backfill_cohort(**kw, return_state=True)
    assert state.is_completed()
    s1 = state.result()
    assert len(s1.done) == 2 and not s1.skipped
    assert [(r.input, r.reason) for r in s1.rejected] == [(str(bad), RejectReason.unreadable_file)]
    fr1 = state.state_details.flow_run_id
    ingest_runs = _task_runs(fr1, "ingest-series", expect=2)
    assert sorted(t["run_count"] for t in ingest_runs) == [1, 2]  # the EIO was retried once (bad input: plan-time)
    renders = _task_runs(fr1, "render-series", expect=2)
    assert len(renders) == 2 and all(t["state_type"] == "COMPLETED" for t in renders)
    md = _artifact("backfill-test")
    assert md["flow_run_id"] == str(fr1)
    assert "| done | 2 |" in md["data"] and "| rejected: unreadable_file | 1 |" in md["data"]
    assert float(_artifact("backfill-progress-test")["data"]) == 100.0
    counts = json.loads(_artifact("backfill-test-counts")["data"])
    assert {r["outcome"]: r["series"] for r in counts} == {"done": 2, "skipped": 0, "rejected: unreadable_file": 1}
    # second run: everything skipped before any ingest/render task is submitted
    state2 = bf.backfill_cohort(**kw, return_state=True)
    s2 = state2.result()
    assert s2.counts() == {"done": 0, "skipped": 2, "rejected": 1, "failed": 0}
    fr2 = state2.state_details.flow_run_id
    assert _task_runs(fr2, "render-series") == [] and _task_runs(fr2, "ingest-series") == []


@pytest.mark.prefect
def test_prefect_backfill_killed_midway_then_resumed(prefect_api, tmp_path, cohort):
    good, bad = cohort
    store = tmp_path / "store"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(SPEC.model_dump_json())
    env = dict(os.environ, PREFECT_API_URL=prefect_api, XWIN_STAGE_THREADS="1", PREFECT_LOGGING_LEVEL="WARNING")
    cmd = [
        sys.executable,
        "-m",
        "xwin.flows.cli",
        "backfill",
        "--cohort",
        "test",
        "--store",
        str(store),
        "--spec",
        str(spec_file),
        "--backend",
        "joseph",
        "--prefect",
        "--verify",
        "none",
    ]
    for g in good:
        cmd += ["--source", str(g)]
    proc = subprocess.Popen(
        [*cmd, "--source", str(bad)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ds = open_store(str(store)).dataset("test", SPEC)
    deadline = time.monotonic() + 120
    n_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            n_at_kill = len(ds.volume_ids())
            if n_at_kill >= 1:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= n_at_kill < len(good), f"kill did not land mid-way ({n_at_kill} rings)"
    s = bf.backfill_cohort(
        cohort="test",
        store=str(store),
        source=[str(g) for g in good] + [str(bad)],
        spec=SPEC,
        backend="joseph",
        verify="deep",
    )
    assert len(s.done) + len(s.skipped) == len(good) and len(s.skipped) >= n_at_kill
    assert [r.reason for r in s.rejected] == [RejectReason.unreadable_file]
    st = open_store(str(store))
    assert st.verify().clean
    status = st.status()
    (dstat,) = status.datasets
    assert dstat.counts.get("committed") == len(good)
    assert not dstat.counts.get("in_progress") and not dstat.counts.get("stale_claim")
    assert sorted(ds.volume_ids()) == sorted({e.volume_id for e in s.done + s.skipped})


@pytest.mark.prefect
def test_prefect_backfill_on_dask_each_series_once(prefect_api, tmp_path, cohort):
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    good, _ = cohort
    store = tmp_path / "store"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flow = bf.backfill_cohort.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        state = flow(
            cohort="test",
            store=str(store),
            source=[str(g) for g in good[:4]],
            spec=SPEC,
            backend="joseph",
            verify="deep",
            return_state=True,
        )
        worker_pids = {w.process.pid for w in cluster.workers.values()}
    s = state.result()
    assert len(s.done) == 4 and not s.skipped and not s.rejected
    ids = [e.volume_id for e in s.done]
    assert len(set(ids)) == 4
    renders = _task_runs(state.state_details.flow_run_id, "render-series", expect=4)
    assert len(renders) == 4 and all(t["state_type"] == "COMPLETED" and t["run_count"] == 1 for t in renders)
    ds = open_store(str(store)).dataset("test", SPEC)
    assert sorted(ds.volume_ids()) == sorted(ids)
    writers = {ds.provenance(v)["writer"] for v in ids}
    assert len(writers) == 4  # one writer (task run) per series
    assert {int(w.split(":")[1]) for w in writers} <= worker_pids  # rendered on the Dask workers


def test_local_validation_matches_direct_reconstruction(tmp_path, cohort):
    """The validation flow body reports what xwin.flows.validate.validate_stored_ring computes, and files it."""
    from xwin.flows.validate import run_validation, validate_stored_ring

    good, _ = cohort
    spec = RenderSpec(height=96, width=96, pixel_mm=5.0, n_views=36, yaw_step_deg=10.0)
    store = tmp_path / "store"
    s = bf.run_local(
        BackfillParams(
            cohort="test",
            store=str(store),
            source=[str(good[0])],
            spec=spec,
            backend="joseph",
            verify="none",
            previews=0,
        )
    )
    vid = s.done[0].volume_id
    with LocalStages(max_workers=1) as stages:
        (res,) = run_validation(str(store), "test", spec.spec_hash, None, stages)
    st = open_store(str(store))
    direct = validate_stored_ring(st, st.open_dataset("test", spec.spec_hash), vid, backend=res["backend"])
    assert res["volume_id"] == vid
    assert res["psnr"] == pytest.approx(direct.metrics["psnr_db"], rel=1e-6)
    assert res["ssim"] == pytest.approx(direct.metrics["ssim"], rel=1e-6)
    assert res["psnr"] > 15.0  # a real reconstruction of the body, not noise
    saved = json.loads(
        (Path(rep.reports_url(str(store))) / "validation" / "test" / spec.spec_hash / f"{vid}.json").read_text()
    )
    assert saved["psnr"] == res["psnr"]


def test_sharded_runs_cover_the_cohort_exactly_once(tmp_path, cohort):
    """Two shard runs (as two GPU workers would do) into one store: every series done once, bad input once."""
    good, bad = cohort
    store = tmp_path / "store"
    srcs = [*good, bad]
    runs = [bf.run_local(_params(store, srcs, shard=f"{i}/2", verify="none", previews=0)) for i in range(2)]
    done = [e.volume_id for r in runs for e in r.done]
    assert len(done) == len(set(done)) == len(good)
    assert all(not r.skipped for r in runs)
    assert sum(len(r.rejected) for r in runs) == 1
    assert sorted(open_store(str(store)).dataset("test", SPEC).volume_ids()) == sorted(done)


def test_landing_scan_of_an_s3_prefix(tmp_path, cohort, monkeypatch):
    """The cron scan on an S3 landing prefix (moto server): new objects are staged, backfilled, then remembered."""
    import boto3
    from moto.server import ThreadedMotoServer

    from xwin.flows.landing import scan_once

    good, bad = cohort
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        ep = f"http://{host}:{port}"
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "XWIN_S3_ENDPOINT": ep,
        }.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=ep)
        s3.create_bucket(Bucket="landing")
        s3.upload_file(str(good[3]), "landing", "incoming/ct3.nii.gz")
        s3.upload_file(str(bad), "landing", "incoming/broken.nii.gz")
        store = str(tmp_path / "store")
        kw = {"staging": str(tmp_path / "staging")}
        s1, new1 = scan_once("s3://landing/incoming", "test", store, SPEC, "joseph", **kw)
        assert sorted(new1) == ["s3://landing/incoming/broken.nii.gz", "s3://landing/incoming/ct3.nii.gz"]
        assert (len(s1.done), [r.reason for r in s1.rejected]) == (1, [RejectReason.unreadable_file])
        # inputs are reported by their landing name, and the staged copies are gone after the scan
        assert [r.input for r in s1.rejected] == ["s3://landing/incoming/broken.nii.gz"]
        assert [e.input for e in s1.done] == ["s3://landing/incoming/ct3.nii.gz"]
        assert list((tmp_path / "staging").iterdir()) == []
        s2, new2 = scan_once("s3://landing/incoming", "test", store, SPEC, "joseph", **kw)
        assert new2 == [] and s2.counts() == {"done": 0, "skipped": 0, "rejected": 0, "failed": 0}
        # without a staging directory: a temporary one, removed after the scan
        s3.upload_file(str(good[2]), "landing", "incoming/ct2.nii.gz")
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", None)
        s3_, new3 = scan_once("s3://landing/incoming", "test", store, SPEC, "joseph")
        assert new3 == ["s3://landing/incoming/ct2.nii.gz"] and len(s3_.done) == 1
        assert list((tmp_path / "tmp").iterdir()) == []
    finally:
        server.stop()
