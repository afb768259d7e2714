"""Stopping a run: Ctrl-C in a terminal, SIGTERM, a second signal, the Dask runner, a cancelled Prefect flow run.

The backfill runs as a user runs it (``python -m xwin.flows.cli`` in a subprocess, a real pseudo-terminal for
Ctrl-C) on 6 small CTs (the bundled CT block-averaged 8x8x4) with a 64-view 32x32 spec. The renders are slowed down
(each progress callback sleeps first; ``slow_xwin.py`` below, written by the test) so that the signal lands while a
render is in progress. Every assertion on time is a loose bound; the figures measured are printed (``-s``).

What a stopped run must show: exit 130 (SIGINT) / 143 (SIGTERM), one ``cancelled: N series not started, M stopped``
line, a summary in which every planned series is done, skipped, rejected, failed or cancelled, whose ``done`` is
exactly the set of committed rings (never a ring that is not committed), no claim left behind, and a rerun of the
same command that finishes the rest.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from procs import marked

from xwin.schemas.render import RenderSpec
from xwin.storage import open_store

SPEC = RenderSpec(height=32, width=32, pixel_mm=12.0, n_views=64, yaw_step_deg=360.0 / 64)
N = 6

SLOW_PATCH = '''
"""Slow renders: each render progress callback sleeps XWIN_TEST_SLOW_S first (also a Dask worker preload)."""
import os
import time

from xwin.flows import progress


def _slow(vid, real=progress.views_callback):  # bound now: a Dask preload may run this file twice
    cb = real(vid)

    def on_progress(done, total):
        time.sleep(float(os.environ.get("XWIN_TEST_SLOW_S", "0")))
        cb(done, total)

    return on_progress


if not hasattr(progress.views_callback, "slow"):
    _slow.slow = True
    progress.views_callback = _slow
'''

SLOW_XWIN = '''
"""The xwin command line with slow renders."""
import slow_patch  # noqa: F401 - patches the render progress callback (this script's folder is on sys.path)
from xwin.flows.cli import app

if __name__ == "__main__":  # not when a Dask worker (spawned) imports the main module
    app(prog_name="xwin")
'''


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, bundled_ct_path):
    """6 small CTs with distinct content, the spec file and the slow command line."""
    from conftest import downsample_nifti

    d = tmp_path_factory.mktemp("stop")
    base = downsample_nifti(bundled_ct_path, d / "base.nii.gz", factors=(8, 8, 4))
    img = nib.load(str(base))
    a = np.asarray(img.dataobj).astype(np.int16)
    cts = []
    for k in range(N):
        p = d / f"ct{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.where(a > -500, a + 5 * k, a).astype(np.int16), img.affine), str(p))
        cts.append(p)
    spec = d / "spec.json"
    spec.write_text(SPEC.model_dump_json())
    script = d / "slow_xwin.py"
    script.write_text(SLOW_XWIN)
    (d / "slow_patch.py").write_text(SLOW_PATCH)
    return cts, spec, script


def _argv(cohort, store: Path, *extra: str, slow: bool = True) -> list[str]:
    cts, spec, script = cohort
    head = [sys.executable, str(script)] if slow else [sys.executable, "-m", "xwin.flows.cli"]
    cmd = [*head, "backfill", "--cohort", "test", "--store", str(store), "--spec", str(spec)]
    cmd += ["--backend", "joseph", "--verify", "none", *extra]
    for c in cts:
        cmd += ["--source", str(c)]
    return cmd


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"OMP_NUM_THREADS": "1", "XWIN_TEST_SLOW_S": "0.4", "PREFECT_LOGGING_LEVEL": "WARNING", **kw})
    return env


def _committed(store: Path) -> set[str]:
    if not (store / "zarr.json").exists() and not store.exists():
        return set()
    try:
        return set(open_store(str(store)).dataset("test", SPEC).volume_ids())
    except Exception:  # noqa: BLE001 - the store is being created by the run under test
        return set()


def _claims(store: Path) -> list:
    return open_store(str(store)).dataset("test", SPEC).scope.list_claims()


def _wait_first_commit(store: Path, proc_alive, timeout: float = 240, said=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not _committed(store):
        assert proc_alive(), f"the run ended before its first commit: {said()[-3000:]}"
        assert time.monotonic() < deadline, "no ring committed in time"
        time.sleep(0.1)


class Reader(threading.Thread):
    """Drains a file descriptor (a pipe or a pty master) into ``data``, noting when each chunk arrived."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.data, self.chunks = fd, b"", []

    def run(self) -> None:
        while True:
            try:
                b = os.read(self.fd, 65536)
            except OSError:
                return
            if not b:
                return
            self.chunks.append((time.monotonic(), b))
            self.data += b

    def text(self) -> str:
        return self.data.decode(errors="replace")


def _summary_checks(summary: dict, store: Path) -> None:
    """Every planned series in exactly one list; ``done`` is exactly what is committed; no claim left."""
    lists = ("done", "skipped", "rejected", "failed", "cancelled")
    assert summary["planned"] == N == sum(len(summary[k]) for k in lists), summary
    assert summary["cancelled"], "the signal came after the first commit: something was left"
    assert {e["volume_id"] for e in summary["done"]} == _committed(store)
    assert not {c["volume_id"] for c in summary["cancelled"]} & _committed(store)
    assert not _claims(store), _claims(store)


def _rerun_finishes(cohort, store: Path, done_before: int) -> None:
    r = subprocess.run(_argv(cohort, store, "--json", slow=False), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout[r.stdout.index("{") :])
    assert (len(s["done"]), len(s["skipped"]), s["cancelled"]) == (N - done_before, done_before, [])
    assert len(_committed(store)) == N


def _sigterm_after_first_commit(
    argv: list[str], env: dict[str, str], store: Path, wait_s: float, what: str, watch=None
) -> tuple[subprocess.Popen, int, float, Reader, Reader]:
    """Run ``argv``, send SIGTERM once its first ring is committed (``watch()`` called at each look meanwhile), wait
    for its exit: (process, exit status, seconds from the signal to the exit, stdout, stderr readers)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Reader(proc.stdout.fileno()), Reader(proc.stderr.fileno())
    out.start()
    err.start()

    def alive() -> bool:
        if watch is not None:
            watch()
        return proc.poll() is None

    _wait_first_commit(store, alive, said=err.text)
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(wait_s)
    dt = time.monotonic() - t_sig
    out.join(5)
    err.join(5)
    print(f"\nSIGTERM{what} -> exit: {dt:.2f} s")
    return proc, rc, dt, out, err


def test_ctrl_c_in_a_terminal(tmp_path, cohort):
    """Ctrl-C (the terminal's interrupt character) during a backfill with the live display: the display stops,
    no series starts, the render in progress stops, the summary and the one `cancelled:` line are printed, exit
    130 within seconds; the rerun finishes the rest."""
    store = tmp_path / "s"
    pid, master = pty.fork()
    if pid == 0:  # the child: a session whose controlling terminal is the pty (as a shell would start it)
        os.execve(sys.executable, _argv(cohort, store), _env(COLUMNS="100", TERM="xterm"))
    reader = Reader(master)
    reader.start()
    status: list[int] = []

    def alive() -> bool:
        if status:
            return False
        p, st = os.waitpid(pid, os.WNOHANG)
        if p:
            status.append(st)
        return not p

    _wait_first_commit(store, alive)
    t_sig = time.monotonic()
    os.write(master, b"\x03")  # Ctrl-C: the line discipline sends SIGINT to the foreground process group
    while alive():
        assert time.monotonic() - t_sig < 60, "no exit within 60 s of Ctrl-C"
        time.sleep(0.05)
    dt = time.monotonic() - t_sig
    reader.join(5)
    out = reader.text()
    print(f"\nCtrl-C -> exit: {dt:.2f} s")
    assert os.WIFEXITED(status[0]) and os.WEXITSTATUS(status[0]) == 130, (status, out[-2000:])
    assert dt < 30, dt  # a few seconds plus one commit, on a loaded machine
    m = re.search(r"cancelled: (\d+) series not started, (\d+) stopped; run the same command again to continue", out)
    assert m, out[-2000:]
    done = re.search(r"backfill test: done (\d+), skipped 0, rejected 0, failed 0, cancelled (\d+) of 6 planned", out)
    assert done, out[-2000:]
    assert int(done.group(1)) == len(_committed(store)) >= 1
    assert int(done.group(2)) == int(m.group(1)) + int(m.group(2)) == N - int(done.group(1))
    # the live display stopped: no redraw (cursor up / erase line) after the stop notice
    i = reader.data.index(b"stopping: ")
    assert b"\x1b[2K" not in reader.data[i:] and b"\x1b[1A" not in reader.data[i:], reader.data[i:][:500]
    assert b"\x1b[2K" in reader.data[:i]  # it was live before
    assert not _claims(store)
    _rerun_finishes(cohort, store, int(done.group(1)))


def test_sigterm_without_a_terminal_prints_the_json_summary(tmp_path, cohort):
    """SIGTERM (docker stop, Kubernetes, a Prefect worker shutting down) off a terminal with --json: exit 143, the
    JSON summary with the cancelled series, the run report written; the rerun finishes the rest."""
    store = tmp_path / "s"
    _proc, rc, dt, out, err = _sigterm_after_first_commit(_argv(cohort, store, "--json"), _env(), store, 60, "")
    assert rc == 143, err.text()[-3000:]
    assert dt < 30, dt
    summary = json.loads(out.text())
    _summary_checks(summary, store)
    assert "stopping: no new work starts" in err.text()
    line = [x for x in err.text().splitlines() if x.startswith("cancelled: ")]
    stopped = sum(c["started"] for c in summary["cancelled"])
    assert line == [
        f"cancelled: {len(summary['cancelled']) - stopped} series not started, {stopped} stopped; "
        "run the same command again to continue"
    ]
    (report,) = (tmp_path / "s-reports" / "runs").glob("*.json")
    assert json.loads(report.read_text())["summary"] == summary
    md = report.with_suffix(".md").read_text()
    assert "## Cancelled" in md and all(c["input"] in md for c in summary["cancelled"])
    _rerun_finishes(cohort, store, len(summary["done"]))


def test_a_second_signal_exits_at_once(tmp_path, cohort):
    """Two SIGINTs: the second ends the process at once with one line and no summary; the claims it held are
    recovered by the rerun (their holder is dead), which finishes every series."""
    store = tmp_path / "s"
    env = _env(XWIN_TEST_SLOW_S="2")  # a render in progress reaches its next stop point within 2 s
    proc = subprocess.Popen(_argv(cohort, store, "--json"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Reader(proc.stdout.fileno()), Reader(proc.stderr.fileno())
    out.start()
    err.start()
    _wait_first_commit(store, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first signal waits for the render in progress to reach its next step
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(30)
    dt = time.monotonic() - t_sig
    out.join(5)
    err.join(5)
    print(f"\nsecond SIGINT -> exit: {dt:.2f} s")
    assert rc == 130 and dt < 3, (rc, dt)
    assert out.text() == ""  # no summary
    assert err.text().rstrip().splitlines()[-1] == "stopped at once (SIGINT); run the same command again to continue"
    _rerun_finishes(cohort, store, len(_committed(store)))


def test_sigterm_stops_the_dask_runner_and_leaves_no_process(tmp_path, cohort):
    """`--runner dask` (no Prefect): SIGTERM after the first commit cancels the futures, closes the LocalCluster,
    exits 143 with the summary; no worker process is left."""
    store = tmp_path / "s"
    mark = uuid.uuid4().hex
    preload = json.dumps([str(cohort[2].with_name("slow_patch.py"))])  # the workers' renders are slow too
    env = _env(XWIN_TEST_MARK=mark, XWIN_DASK_WORKERS="2", DASK_DISTRIBUTED__WORKER__PRELOAD=preload)
    seen: set[int] = set()
    argv = _argv(cohort, store, "--json", "--runner", "dask")
    watch = lambda: seen.update(p.pid for p in marked(mark))  # noqa: E731
    _proc, rc, dt, out, err = _sigterm_after_first_commit(argv, env, store, 90, " (dask)", watch)
    assert rc == 143, err.text()[-3000:]
    assert dt < 45, dt
    summary = json.loads(out.text())
    assert (
        summary["planned"] == N == sum(len(summary[k]) for k in ("done", "skipped", "rejected", "failed", "cancelled"))
    )
    assert {e["volume_id"] for e in summary["done"]} == _committed(store)
    assert not summary["failed"]
    assert len(seen) >= 3, seen  # the command and its two workers
    deadline = time.monotonic() + 15
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.cmdline()) for p in left]
    _rerun_finishes(cohort, store, len(summary["done"]))


# ---- in this process ------------------------------------------------------------------------------------------
@pytest.fixture
def slow_renders(monkeypatch):
    """Renders in this process sleep 0.4 s before each progress callback."""
    from xwin.flows import progress

    real = progress.views_callback

    def slow(vid):
        cb = real(vid)

        def on_progress(done, total):
            time.sleep(0.4)
            cb(done, total)

        return on_progress

    monkeypatch.setattr(progress, "views_callback", slow)


# ---- Prefect -------------------------------------------------------------------------------------------------
def _flow_run(client, flow_run_id):
    return client.read_flow_run(flow_run_id)


def _task_runs_show_the_stop(client, flow_run_id, done: int | None = None, summary: dict | None = None) -> list:
    """The flow run's task runs as the API (and so the UI) shows them once the run has ended: none Failed or left
    unfinished; those a stop ended are Cancelled with the stage in their message, run once (never retried); the
    rest Completed (``done``: the number of rings committed, each a Completed render task run). With the run's
    ``summary``: the renders it says were stopped part-way are the task runs Cancelled "stopped: render"."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + 30  # task run states are recorded from the engine's events: a moment late
    while True:
        runs = client.read_task_runs(flow_run_filter=flt)
        if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    shown = [(r.name, r.state_type, r.state.message if r.state else None) for r in runs]
    print(f"\ntask runs: {shown}")
    assert all(r.state is not None and r.state.is_final() for r in runs), shown
    assert not [r for r in runs if r.state_type in (StateType.FAILED, StateType.CRASHED)], shown
    stopped = [r for r in runs if r.state_type == StateType.CANCELLED]  # (those cancelled before they began: none)
    for r in stopped:
        assert re.match(r"stopped: (ingest|render)", r.state.message or ""), shown
        assert r.run_count <= 1, (r.name, r.run_count)  # a Cancelled state is final: no retry
    assert {r.state_type for r in runs} <= {StateType.COMPLETED, StateType.CANCELLED}, shown
    if done is not None:
        renders = [r for r in runs if r.name.startswith("render-series") and r.state_type == StateType.COMPLETED]
        assert len(renders) == done, shown
    if summary is not None:
        assert not summary["rejected"], summary["rejected"]  # every CT is valid: a stop is never a rejection
        part_way = [c for c in summary["cancelled"] if c["stage"] == "render" and c["started"]]
        said = [r for r in stopped if r.state.message == "stopped: render"]
        assert len(said) == len(part_way), (shown, summary["cancelled"])
    return runs


def test_a_flow_run_cancelled_through_the_api_ends_cancelled_with_its_summary(
    prefect_api, tmp_path, cohort, slow_renders
):
    """The backfill flow run cancelled from the API (as the UI does: state Cancelling): no new series starts, the
    render in progress stops, the flow run ends Cancelled and its summary artifact lists the cancelled series."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    from xwin.flows import stop
    from xwin.flows.backfill import backfill_cohort
    from xwin.flows.progress import artifact_key

    store = tmp_path / "s"
    cts = [str(c) for c in cohort[0]]
    got: dict = {}

    def run() -> None:
        try:
            got["state"] = backfill_cohort(
                cohort="test",
                store=str(store),
                source=cts,
                spec=SPEC,
                backend="joseph",
                verify="none",
                previews=0,
                return_state=True,
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            got["error"] = e

    stop.reset()
    t = threading.Thread(target=run)
    t.start()
    try:
        _wait_first_commit(store, t.is_alive)
        with get_client(sync_client=True) as client:
            running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
            runs = client.read_flow_runs(flow_run_filter=running)
            (fr,) = [r for r in runs if r.parameters.get("store") == str(store)]  # other tests' runs may be running
            t_cancel = time.monotonic()
            client.set_flow_run_state(fr.id, Cancelling(), force=True)
            t.join(90)
            dt = time.monotonic() - t_cancel
            print(f"\nflow run cancelled through the API -> flow returned: {dt:.2f} s")
            assert not t.is_alive() and "error" not in got, got
            assert got["state"].is_cancelled(), got["state"]
            assert dt < 40, dt
            assert client.read_flow_run(fr.id).state.type == StateType.CANCELLED
            (report,) = (tmp_path / "s-reports" / "runs").glob("*.json")
            summary = json.loads(report.read_text())["summary"]
            _task_runs_show_the_stop(client, fr.id, len(summary["done"]), summary)
            art = client.read_latest_artifacts()
            md = next(a for a in art if a.key == artifact_key("backfill", "test")).data
    finally:
        t.join(90)
        stop.reset()
    assert "## Cancelled" in md and "cancelled, not started" in md
    assert len(_committed(store)) < N
    assert not _claims(store)


def test_prefect_task_runs_a_stop_ends_are_cancelled_never_retried_or_left_pending(prefect_api):
    """The Prefect runner's own cases, in one flow run on one thread: a task whose function a stop ends (it raises
    ``stop.Cancelled``) ends Cancelled and is not retried (its retry condition would retry anything); the task that
    waits on it, which Prefect leaves Pending ("NotReady"), is set Cancelled (not started); a task cancelled before
    it started is never created. ``result`` gives back ``stop.Cancelled`` with the stage and whether it started."""
    import concurrent.futures

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    from xwin.flows import stop
    from xwin.flows.runtime import PrefectStages

    go = threading.Event()

    @task(name="ingest-toy", retries=2, retry_condition_fn=lambda *_: True, persist_result=False)
    def first() -> int:
        go.wait(30)
        stop.request()
        raise stop.Cancelled("ingest", started=True)

    @task(name="render-toy", persist_result=False)
    def second(x: int) -> int:
        return x + 1

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1), persist_result=False)
    def toy() -> dict:
        stages = PrefectStages()
        fa = stages.submit(first)
        fb = stages.submit(second, fa)
        fc = stages.submit(second, 1)
        stages.cancel_pending([fc])  # queued behind the others (one thread): not started
        go.set()
        got: dict = {"id": FlowRunContext.get().flow_run.id, "ids": (fa.task_run_id, fb.task_run_id, fc.task_run_id)}
        for k, f in zip("abc", (fa, fb, fc), strict=True):
            try:
                got[k] = stages.result(f)
            except (stop.Cancelled, concurrent.futures.CancelledError) as e:
                got[k] = e
        return got

    stop.reset()
    try:
        got = toy()
    finally:
        stop.reset()
    a, b, c = got["a"], got["b"], got["c"]
    assert isinstance(a, stop.Cancelled) and (a.what, a.started) == ("ingest", True), a
    assert isinstance(b, stop.Cancelled) and (b.what, b.started) == ("render-toy", False), b
    assert isinstance(c, concurrent.futures.CancelledError), c
    with get_client(sync_client=True) as client:
        runs = {r.id: r for r in _task_runs_show_the_stop(client, got["id"])}
    ia, ib, _ = got["ids"]
    assert set(runs) == {ia, ib}  # the one cancelled before it started was never created
    assert (runs[ia].state.message, runs[ia].run_count) == ("stopped: ingest", 1)
    assert runs[ib].state.message == "stopped: render-toy (not started)"


def test_sigterm_to_a_prefect_flow_run_ends_it_cancelled(prefect_api, tmp_path, cohort):
    """SIGTERM to the process running the backfill flow (a Prefect worker shutting down, docker stop): the flow run
    ends Cancelled -- never left Running -- and the command exits 143 with its summary."""
    from prefect.client.orchestration import get_client

    store = tmp_path / "s"
    env = _env(PREFECT_API_URL=prefect_api)
    argv = _argv(cohort, store, "--json", "--prefect")
    _proc, rc, _dt, out, err = _sigterm_after_first_commit(argv, env, store, 90, " (prefect)")
    assert rc == 143, err.text()[-3000:]
    summary = json.loads(out.text())
    _summary_checks(summary, store)
    (report,) = (tmp_path / "s-reports" / "runs").glob("*.json")
    run_id = report.stem  # the flow run id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_cancelled()
        _task_runs_show_the_stop(client, run_id, len(summary["done"]), summary)


# ---- training ------------------------------------------------------------------------------------------------
def test_train_stopped_saves_a_checkpoint_and_resume_continues(tmp_path):
    """`xwin train` stopped with Ctrl-C (SIGINT): the step in progress finishes, a checkpoint of that step is saved,
    exit 130; `--resume auto` continues from that step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "xwin.flows.cli", "train", "--preset", "tiny", "--synthetic", "--out", str(out)]
    cmd += ["--set", "log_every=1", "--json"]
    proc = subprocess.Popen([*cmd, "--max-steps", "100000"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    o, e = Reader(proc.stdout.fileno()), Reader(proc.stderr.fileno())
    o.start()
    e.start()
    log = out / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and sum('"event": "step"' in x for x in log.read_text().splitlines()) >= 2):
        assert proc.poll() is None, e.text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(120)
    dt = time.monotonic() - t_sig
    o.join(5)
    e.join(5)
    print(f"\nSIGINT (train) -> exit: {dt:.2f} s")
    assert rc == 130, e.text()[-3000:]
    assert dt < 60, dt
    summary = json.loads(o.text().strip().splitlines()[-1])
    k = summary["steps"]
    assert summary["stopped"] is True and 2 <= k < 100000
    assert summary["checkpoint"].endswith(f"step_{k:08d}.pt") and (out / "checkpoints" / "latest.pt").exists()
    assert f"cancelled: stopped at step {k}; run it again with --resume auto to continue" in e.text()
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert {"event": "stopped", "step": k}.items() <= next(x for x in events if x["event"] == "stopped").items()
    r = subprocess.run(
        [*cmd, "--max-steps", str(k + 1), "--resume", "auto"], env=_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["steps"] == k + 1 and "stopped" not in again
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in events if x["event"] == "resume"] == [k]


# ---- the other long commands (in-process: the signal is sent to this process from inside the work) ----------
@pytest.fixture
def restore_stop():
    from xwin.flows import stop

    yield stop
    stop.reset()


def test_ingest_stopped_by_sigterm_accounts_for_every_input(tmp_path, cohort, monkeypatch, restore_stop):
    """`xwin ingest`: SIGTERM while the first volume loads: it is written, no other input starts; --json lists the
    rest as cancelled, exit 143; the rerun skips the first and ingests the rest."""
    from typer.testing import CliRunner

    from xwin.flows.cli import app
    from xwin.pipeline.ingest import run as run_mod

    real = run_mod.load_candidate
    calls: list[str] = []

    def load_and_signal(c):
        calls.append(c.input)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the command's handler: a stop request
        return real(c)

    monkeypatch.setattr(run_mod, "load_candidate", load_and_signal)
    args = ["ingest", *map(str, cohort[0]), "--store", str(tmp_path / "s"), "--cohort", "test", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 143, res.output
    s = json.loads(res.stdout)
    assert (len(s["done"]), len(s["cancelled"]), s["planned"]) == (1, N - 1, N)
    assert all(not c["started"] and c["stage"] == "ingest" for c in s["cancelled"])
    assert len(calls) == 1 and open_store(str(tmp_path / "s")).has_volume(s["done"][0]["volume_id"])
    assert f"cancelled: {N - 1} series not started, 0 stopped" in res.stderr
    monkeypatch.setattr(run_mod, "load_candidate", real)
    res = CliRunner().invoke(app, args)
    s = json.loads(res.stdout)
    assert res.exit_code == 0 and (len(s["done"]), len(s["skipped"]), s["cancelled"]) == (N - 1, 1, [])


def test_a_stop_while_an_ingest_waits_for_its_slot_is_a_cancellation_not_a_rejection(
    tmp_path, cohort, monkeypatch, restore_stop
):
    """A stop that comes while an ingest waits for its CPU slot: the ingest raises ``stop.Cancelled`` (not
    started), never a rejection of the input as unreadable; nothing of it is written."""
    import contextlib

    from xwin.flows import tasks
    from xwin.pipeline.ingest import plan_inputs

    stop = restore_stop
    (cand,), rejected = plan_inputs([str(cohort[0][0])], "test")
    assert not rejected

    @contextlib.contextmanager
    def slot_then_stop(name, slots):  # the stop lands while the slot is being taken
        stop.request()
        yield

    monkeypatch.setattr(tasks, "slot", slot_then_stop)
    stop.reset()
    store = tmp_path / "s"
    with pytest.raises(stop.Cancelled) as got:
        tasks.ingest_series.fn(cand, str(store))
    assert (got.value.what, got.value.started) == ("ingest", False)
    assert not open_store(str(store)).has_volume(cand.volume_id)


def test_render_stopped_mid_ring_commits_nothing_of_it(tmp_path, cohort, monkeypatch, restore_stop):
    """`xwin render --all`: SIGINT during the first ring's views stops that render at its next chunk (nothing of
    it committed), no other ring starts, exit 130; the rerun renders every ring."""
    from typer.testing import CliRunner

    from xwin.flows import render as render_mod
    from xwin.flows.cli import app
    from xwin.pipeline.ingest import ingest_sources

    st = open_store(str(tmp_path / "s"), create=True)
    assert len(ingest_sources(cohort[0][:3], "test", st).done) == 3
    real = render_mod.render_volume_to_store
    started: list[str] = []

    def render_and_signal(store, vid, spec, cohort_, name, on_progress):
        started.append(vid)

        def cb(done, total):
            if done == 16:
                os.kill(os.getpid(), signal.SIGINT)
            on_progress(done, total)

        return real(store, vid, spec, cohort_, name, on_progress=cb)

    monkeypatch.setattr(render_mod, "render_volume_to_store", render_and_signal)
    args = ["render", "--store", str(tmp_path / "s"), "--all", "--spec", str(cohort[1]), "--backend", "joseph"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    assert len(started) == 1
    assert "0 written, 0 skipped, 0 failed, 3 cancelled" in res.stdout
    assert "cancelled: 2 series not started, 1 stopped" in res.stderr
    assert open_store(str(tmp_path / "s")).dataset("test", SPEC).volume_ids() == []
    monkeypatch.setattr(render_mod, "render_volume_to_store", real)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "3 written, 0 skipped, 0 failed" in res.stdout, res.output


def test_a_stopped_landing_scan_keeps_unfinished_entries_out_of_its_ledger(
    tmp_path, cohort, restore_stop, slow_renders
):
    """A landing scan stopped after its first ring: the entries not finished stay out of the ledger (the next scan
    takes them up), the finished one is in it."""
    import shutil

    from xwin.flows.landing import ScanIncomplete, read_ledger, scan_once
    from xwin.flows.progress import add_listener
    from xwin.flows.reports import reports_url

    landing = tmp_path / "landing"
    landing.mkdir()
    for c in cohort[0][:4]:
        shutil.copy(c, landing / c.name)
    store = str(tmp_path / "s")
    stop = restore_stop

    def first_done(ev):
        if ev.get("event") == "series" and ev.get("status") == "done":
            stop.request()

    remove = add_listener(first_done)
    try:
        with pytest.raises(ScanIncomplete) as ei:
            scan_once(str(landing), "test", store, SPEC, "joseph")
    finally:
        remove()
    s = ei.value.summary
    assert s.cancelled and not s.failed and s.planned == 4 == len(s.done) + len(s.cancelled)
    ledger = read_ledger(reports_url(store), "test")
    assert sorted(ledger) == sorted(e.input for e in s.done)
    stop.reset()
    s2, new = scan_once(str(landing), "test", store, SPEC, "joseph")
    assert sorted(new) == sorted(c.input for c in s.cancelled) and len(s2.done) == len(s.cancelled)
    assert len(read_ledger(reports_url(store), "test")) == 4


def test_a_command_without_stop_points_is_interrupted_with_one_line(tmp_path, monkeypatch, restore_stop):
    """`xwin reconstruct` (one FDK, no stop point inside): SIGTERM interrupts it where it is -- as Ctrl-C does --
    with one line and exit 143, not a traceback or a silent death."""
    from typer.testing import CliRunner

    from xwin.flows import validate as validate_mod
    from xwin.flows.cli import app

    open_store(str(tmp_path / "s"), create=True)
    reached: list[float] = []

    def long_fdk(*a, **kw):
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # half a second into the work
        t0 = time.monotonic()
        try:
            time.sleep(60)
        finally:
            reached.append(time.monotonic() - t0)

    monkeypatch.setattr(validate_mod, "validate_stored_ring", long_fdk)
    monkeypatch.setattr("xwin.storage.Store.find_ring", lambda self, *a: (None, "v"), raising=False)
    res = CliRunner().invoke(app, ["reconstruct", "--store", str(tmp_path / "s"), "--volume", "v"])
    assert res.exit_code == 143, res.output
    assert res.stderr.strip() == "cancelled: stopped before it finished; run the same command again to continue"
    assert reached and 0.4 < reached[0] < 5  # interrupted, not waited for


def test_a_stop_before_or_right_after_planning_starts_nothing(tmp_path, cohort, restore_stop):
    """The same flow body (threads): stopped before planning, the run ends cancelled with nothing planned; stopped
    when the plan is made, every series is cancelled as not started and nothing is written."""
    from xwin.flows.backfill import BackfillCancelled, run_local
    from xwin.flows.params import BackfillParams
    from xwin.flows.progress import add_listener

    stop = restore_stop
    store = tmp_path / "s"
    p = BackfillParams(
        cohort="test",
        store=str(store),
        source=[str(c) for c in cohort[0][:3]],
        spec=SPEC,
        backend="joseph",
        verify="none",
        previews=0,
    )
    stop.request()
    with pytest.raises(BackfillCancelled) as ei:
        run_local(p)
    assert ei.value.summary.planned == 0
    stop.reset()
    remove = add_listener(lambda ev: stop.request() if ev.get("event") == "start" else None)
    try:
        with pytest.raises(BackfillCancelled) as ei:
            run_local(p)
    finally:
        remove()
    s = ei.value.summary
    assert s.planned == 3 == len(s.cancelled) and not s.done
    assert [(c.stage, c.started) for c in s.cancelled] == [("ingest", False)] * 3
    assert not _committed(store) and not any(open_store(str(store)).has_volume(c.volume_id) for c in s.cancelled)


def test_sigterm_to_the_prefect_flow_on_dask(prefect_api, tmp_path, cohort):
    """`--runner dask --prefect` (the flow's DaskTaskRunner): SIGTERM after the first commit: the tasks no worker
    has started are cancelled (a render in progress on a worker finishes and commits), the flow run ends
    Cancelled, exit 143 with the summary; no process is left."""
    from prefect.client.orchestration import get_client

    store = tmp_path / "s"
    mark = uuid.uuid4().hex
    preload = json.dumps([str(cohort[2].with_name("slow_patch.py"))])
    env = _env(
        PREFECT_API_URL=prefect_api,
        XWIN_TEST_MARK=mark,
        XWIN_DASK_WORKERS="2",
        DASK_DISTRIBUTED__WORKER__PRELOAD=preload,
    )
    argv = _argv(cohort, store, "--json", "--prefect", "--runner", "dask")
    _proc, rc, _dt, out, err = _sigterm_after_first_commit(argv, env, store, 120, " (prefect on dask)")
    assert rc == 143, err.text()[-3000:]
    summary = json.loads(out.text())
    assert (
        summary["planned"] == N == sum(len(summary[k]) for k in ("done", "skipped", "rejected", "failed", "cancelled"))
    )
    assert summary["cancelled"] and not summary["failed"]
    assert {e["volume_id"] for e in summary["done"]} == _committed(store)
    (report,) = (tmp_path / "s-reports" / "runs").glob("*.json")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(report.stem).state.is_cancelled()
        _task_runs_show_the_stop(client, report.stem, len(summary["done"]), summary)
    deadline = time.monotonic() + 15
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.cmdline()) for p in left]
