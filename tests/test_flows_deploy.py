"""The docker-compose topology without docker: the session Prefect server + a process worker started here,
running a deployment of the backfill flow registered by ``xwin.flows.deploy`` (what ``xwin deploy`` does)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from xwin.flows.deploy import DeploymentSpec, deployment_specs, register
from xwin.schemas.render import RenderSpec
from xwin.storage import open_store

REPO = Path(__file__).resolve().parents[1]
SPEC = RenderSpec(height=64, width=64, pixel_mm=6.0, n_views=8, yaw_step_deg=45.0)


def test_prefect_yaml_matches_xwin_deploy():
    """prefect.yaml and ``xwin deploy`` name the same deployments, pools, entrypoints and schedules."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    ours = {(s.name, s.work_pool, s.flow_entrypoint, s.cron) for s in deployment_specs("s3://b/store", "s3://b/in")}
    theirs = {
        (d["name"], d["work_pool"]["name"], d["entrypoint"], (d.get("schedules") or [{}])[0].get("cron"))
        for d in doc["deployments"]
    }
    assert ours == theirs
    for _, _, entry, _ in ours:  # every entrypoint is a module path to a Prefect flow object of the package
        module, attr = entry.rsplit(".", 1)
        assert module.startswith("xwin.flows."), entry
        mod = importlib.import_module(module)
        assert hasattr(getattr(mod, attr), "deploy"), entry


def _wait_state(client, flow_run_id, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fr = client.read_flow_run(flow_run_id)
        if fr.state is not None and fr.state.is_final():
            return fr
        time.sleep(1.0)
    return client.read_flow_run(flow_run_id)


@pytest.mark.prefect
def test_deployment_runs_on_process_worker(prefect_api, tmp_path, small_ct_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    store = tmp_path / "store"
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    pool = "xwin-test-cpu"
    env = {"XWIN_RENDER_BACKEND": "joseph", "PREFECT_LOGGING_LEVEL": "WARNING"}
    specs = [
        DeploymentSpec(
            "xwin.flows.backfill.backfill_cohort", "test", pool, {"store": str(store), "backend": "joseph"}, env
        ),
        DeploymentSpec(
            "xwin.flows.landing.scan_landing",
            "landing",
            pool,
            {"landing": str(tmp_path / "landing"), "cohort": "landing", "store": str(store)},
            cron="*/15 * * * *",
            concurrency_limit=1,
        ),
    ]
    register(specs, code_dir=REPO, gpu_ids=["test-gpu-0"])
    wenv = dict(
        os.environ,
        PREFECT_API_URL=prefect_api,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
        cwd=tmp_path,
        env=wenv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        fr = run_deployment(
            "backfill-cohort/test",
            timeout=0,
            parameters={
                "cohort": "deployed",
                "source": [str(small_ct_path), str(bad)],
                "spec": SPEC.model_dump(mode="json"),
                "verify": "deep",
            },
        )
        with get_client(sync_client=True) as client:
            fr = _wait_state(client, fr.id, 180)
            assert fr.state.is_completed(), (fr.state, worker.poll())
            dep = client.read_deployment_by_name("scan-landing/landing")
            assert [s.schedule.cron for s in dep.schedules] == ["*/15 * * * *"]
            assert dep.concurrency_limit == 1 or dep.global_concurrency_limit is not None
        # the run's stage lines reached the server from the worker's flow-run process (read while the worker runs:
        # stopping it stops the flow-run process, which may still be sending its last lines)
        deadline, msgs = time.monotonic() + 60, []
        while time.monotonic() < deadline and not any(m.startswith("backfill deployed: done") for m in msgs):
            body = {"logs": {"flow_run_id": {"any_": [str(fr.id)]}}, "offset": 0, "limit": 200}
            msgs = [lg["message"] for lg in httpx.post(f"{prefect_api}/logs/filter", json=body, timeout=10).json()]
            time.sleep(0.5)
        assert "backfill deployed: 1 series to process, 0 already done, 1 rejected while planning" in msgs, msgs
        assert any(re.fullmatch(r"\w{12}: rendered 8 views in .*", m) for m in msgs), msgs
        (end,) = [m for m in msgs if m.startswith("backfill deployed: done 1, skipped 0, rejected 1, failed 0 of 2")]
        assert f"rejected {bad}: unreadable_file" in end
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    ds = open_store(str(store)).dataset("deployed", SPEC)
    assert len(ds.volume_ids()) == 1
    assert ds.provenance(ds.volume_ids()[0])["source"] == str(small_ct_path)
    # the GPU slot that xwin deploy creates, strict=True needs it
    r = httpx.get(f"{prefect_api}/v2/concurrency_limits/xwin-gpu:test-gpu-0", timeout=10)
    assert r.status_code == 200 and r.json()["limit"] == 1
