"""A backfill through the faults a real cluster has, into a real S3 server (SeaweedFS): 12 small series with
``--runner dask``; one Dask worker SIGKILLed, the S3 server frozen (SIGSTOP, then SIGCONT), then the whole run
SIGKILLed; a plain rerun must account for every series, leave catalog = commit records and a clean verify, and a
third run skips them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from procs import marked
from test_accounting import _spec_file, _variant

from xwin.storage import open_store

N_SERIES = 12


def _backfill(url: str, sources: list, spec, env: dict) -> list[str]:
    cmd = [sys.executable, "-m", "xwin.flows.cli", "backfill", "--cohort", "faults", "--store", url]
    cmd += ["--spec", str(spec), "--backend", "joseph", "--runner", "dask", "--json", "--verify", "shallow"]
    for s in sources:
        cmd += ["--source", str(s)]
    return cmd


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.3)
    return False


@pytest.fixture
def small_series(tmp_path, small_ct_path):
    """12 small CTs (the bundled CT block-averaged, 64x64x33 voxels) with distinct content."""
    from conftest import downsample_nifti

    base = downsample_nifti(small_ct_path, tmp_path / "base.nii.gz", factors=(2, 2, 2))
    return [_variant(base, tmp_path / f"s{k:02d}.nii.gz", 40 * (k + 1)) for k in range(N_SERIES)]


def test_backfill_through_worker_kill_server_freeze_and_run_kill(tmp_path, small_series, seaweed_s3, seaweed_url):
    sources = small_series
    spec = _spec_file(tmp_path)
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(seaweed_s3.env(), XWIN_TEST_MARK=mark, XWIN_DASK_WORKERS="2", PREFECT_LOGGING_LEVEL="WARNING")
    store = open_store(seaweed_url)
    commits = lambda: len(store.backend.list("volumes/_commits/"))  # noqa: E731

    def rings() -> int:
        return sum("/_commits/" in k for k in store.backend.list("datasets/"))

    cmd = _backfill(seaweed_url, sources, spec, env)

    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert _wait(lambda: commits() >= 2, 240), run.stderr.read().decode()[-3000:] if run.poll() else "slow"
        workers = [p for p in marked(mark) if p.pid != run.pid and "multiprocessing" in " ".join(p.cmdline())]
        assert workers, [p.cmdline() for p in marked(mark)]
        workers[-1].send_signal(signal.SIGKILL)  # one Dask worker dies under its task
        time.sleep(1.0)
        weed = os.getpgid(seaweed_s3.proc.pid)
        os.killpg(weed, signal.SIGSTOP)  # the S3 server freezes ...
        time.sleep(5.0)
        os.killpg(weed, signal.SIGCONT)  # ... and comes back
        _wait(lambda: rings() >= 4 or run.poll() is not None, 180)  # some rings committed, the others not yet
        killed_mid_run = run.poll() is None
        os.killpg(run.pid, signal.SIGKILL)  # the whole run dies: scheduler, workers, everything
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    _wait(lambda: not [p for p in marked(mark) if p.status() != psutil.STATUS_ZOMBIE], 20)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    s = json.loads(second.stdout[second.stdout.index("{") :])
    assert s["planned"] == N_SERIES and not s["failed"] and not s["rejected"], s
    assert s["skipped"] or not killed_mid_run, s  # what the killed run committed is skipped (and catalogued)
    assert sorted(e["input"] for e in s["done"] + s["skipped"]) == sorted(map(str, sources))
    assert all(e.get("stage") != "claimed-elsewhere" for e in s["skipped"]), s["skipped"]

    store = open_store(seaweed_url)
    ds = store.find_dataset(cohort="faults")
    assert sorted(ds.volume_ids()) == ds.scope.list_commits() and len(ds.volume_ids()) == N_SERIES
    assert sorted(r.volume_id for r in store.volume_catalog()) == store.volumes.list_commits()
    rep = store.verify()
    assert rep.clean and rep.ok == 2 * N_SERIES, rep

    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-4000:]
    s3 = json.loads(third.stdout[third.stdout.index("{") :])
    assert len(s3["skipped"]) == N_SERIES and not s3["done"] and s3["planned"] == N_SERIES, s3
    print(f"fault test: run killed mid-run {killed_mid_run}; rerun done {len(s['done'])}, skipped {len(s['skipped'])}")
