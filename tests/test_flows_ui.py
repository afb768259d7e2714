"""What a user sees of a run in the Prefect UI: xwin's stage lines and warnings in the run's logs (read back from a
real server), the preview sheet inside the summary artifact (bounded for any cohort size), and the validation run
named after its cohort and linked to the backfill run it checks."""

from __future__ import annotations

import base64
import io
import logging
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xwin.flows import backfill as bf
from xwin.flows import reports as rep
from xwin.flows import tasks
from xwin.flows.cli.progress import ProgressLog
from xwin.flows.progress import add_listener
from xwin.schemas.render import RenderSpec

SPEC = RenderSpec(height=64, width=64, pixel_mm=6.0, n_views=8, yaw_step_deg=45.0)


def _montage(seed: int) -> Image.Image:
    """A preview-like row of 4 smooth 256-px tiles (what render_series writes), distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:1036].astype(np.float32)
    a = 127 + 100 * np.sin(x / (20 + 5 * rng.random()) + seed) * np.cos(y / (30 + 5 * rng.random()))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def _decode_data_url(md: str) -> tuple[str, Image.Image, int]:
    m = re.search(r"!\[([^\]]*)\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", md)
    assert m, md[:500]
    raw = base64.b64decode(m.group(2))
    return m.group(1), Image.open(io.BytesIO(raw)), len(raw)


# ---- preview sheet: bounded, and it shows the previews it names --------------------------------------------------
def test_preview_sheet_of_a_large_cohort_stays_within_budget(tmp_path):
    previews = {}
    for k in range(40):
        vid = f"{k:04d}" + "ab" * 10
        previews[vid] = rep.write_bytes(str(tmp_path / f"{vid}.png"), rep.png_bytes(_montage(k)))
    sheet, shown = rep.sheet_of(previews)
    assert shown == rep.pick_evenly(previews, rep.SHEET_SERIES)
    assert len(shown) == rep.SHEET_SERIES and shown[0] == min(previews) and shown[-1] == max(previews)
    md = rep.summary_markdown(
        _summary(), cohort="big", spec_hash="h", store="s", previews=previews, sheet=sheet, shown=shown
    )
    alt, im, nbytes = _decode_data_url(md)
    assert alt == f"previews: {rep.SHEET_SERIES} of 40 series"
    assert nbytes <= rep.SHEET_BYTES and im.width <= rep.SHEET_WIDTH
    assert len(md) < rep.SHEET_BYTES * 4 / 3 + 4000  # the links are capped too: 12 listed + one "more" line
    assert md.count("](file://") == rep.SHEET_SERIES and "- and 28 more in `" in md
    # the first tile is the first series' montage: compare with an independent resize of that PNG
    first = Image.open(previews[shown[0]]).convert("L")
    a = np.asarray(im, dtype=np.float32)
    pad, head = 4, 14
    tw = (im.width - 3 * pad) // 2
    tile = a[pad + head : pad + head + round(first.height * tw / first.width), pad : pad + tw]
    ref = np.asarray(first.resize((tile.shape[1], tile.shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.corrcoef(tile.ravel(), ref.ravel())[0, 1] > 0.95
    other = np.asarray(
        Image.open(previews[shown[1]]).convert("L").resize((tile.shape[1], tile.shape[0])), dtype=np.float32
    )
    assert np.corrcoef(tile.ravel(), other.ravel())[0, 1] < 0.9  # and not the second series'
    # a tight budget: smaller, still within it; an impossible one: no image (the links stay)
    small = rep.preview_sheet([(v, _montage(i)) for i, v in enumerate(shown)], max_bytes=30_000)
    assert small is not None and len(small) <= 30_000
    assert rep.preview_sheet([(v, _montage(i)) for i, v in enumerate(shown)], max_bytes=500) is None


def _summary():
    from xwin.schemas.ingest import RunSummary

    return RunSummary(done=[], skipped=[], rejected=[], failed=[], planned=0)


def test_run_log_handler_is_silent_outside_a_run():
    """xwin's loggers carry the run log handler everywhere; outside a Prefect run it sends nothing and warns
    nothing (no 'attempted to send logs to the API without a flow run id')."""
    from xwin.flows.runlogs import RunLogHandler

    assert any(isinstance(h, RunLogHandler) for h in logging.getLogger("xwin").handlers)
    assert any(isinstance(h, RunLogHandler) for h in logging.getLogger("xwin.stages").handlers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging.getLogger("xwin.flows.tasks").warning("a warning outside any run")
        logging.getLogger("xwin.stages").info("a stage line outside any run")
    assert [str(w.message) for w in caught] == []


# ---- against a real Prefect server ----------------------------------------------------------------------------
def _api(path: str, body: dict) -> list[dict]:
    import httpx
    from prefect.settings import PREFECT_API_URL

    r = httpx.post(PREFECT_API_URL.value().rstrip("/") + path, json={"offset": 0, "limit": 200, **body}, timeout=30)
    r.raise_for_status()
    return r.json()


def _logs(flow_run_id, until: str, timeout_s: float = 60) -> list[dict]:
    """The run's logs (oldest first) once a message starting with ``until`` is among them."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = _api("/logs/filter", {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "TIMESTAMP_ASC"})
        if any(lg["message"].startswith(until) for lg in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def _task_ids(flow_run_id, prefix: str) -> set[str]:
    trs = _api("/task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})
    return {t["id"] for t in trs if t["name"].startswith(prefix)}


@pytest.fixture(scope="module")
def two_cts(tmp_path_factory, small_ct_path):
    import nibabel as nib

    d = tmp_path_factory.mktemp("ui_cohort")
    img = nib.load(str(small_ct_path))
    a = np.asarray(img.dataobj).astype(np.int16)
    out = []
    for k in range(2):
        p = d / f"ct{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.where(a > -500, a + 5 * k, a).astype(np.int16), img.affine), str(p))
        out.append(p)
    bad = d / "broken.nii.gz"
    bad.write_bytes(b"not a gzip stream")
    return out, bad


@pytest.mark.prefect
def test_prefect_run_logs_preview_sheet_and_linked_validation(prefect_api, tmp_path, two_cts, monkeypatch):
    from xwin.flows.validate import validate_volumes

    good, bad = two_cts
    store = tmp_path / "store"
    # the first preview cannot be written (its folder is a file): a warning of a render task
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    real_url, calls = rep.preview_url, []

    def preview_url(*a):
        calls.append(a)
        return str(blocker / "x.png") if len(calls) == 1 else real_url(*a)

    monkeypatch.setattr(tasks.rep, "preview_url", preview_url)
    terminal = io.StringIO()
    remove = add_listener(ProgressLog(terminal))  # what `xwin backfill` prints outside a terminal
    try:
        state = bf.backfill_cohort(
            cohort="uitest",
            store=str(store),
            source=[str(good[0]), str(good[1]), str(bad)],
            spec=SPEC,
            backend="joseph",
            return_state=True,
        )
    finally:
        remove()
    s = state.result()
    assert len(s.done) == 2 and len(s.rejected) == 1
    fr = str(state.state_details.flow_run_id)
    (run,) = _api("/flow_runs/filter", {"flow_runs": {"id": {"any_": [fr]}}})
    assert run["name"] == "backfill-uitest"

    logs = _logs(fr, "backfill uitest: done 2")
    msgs = [lg["message"] for lg in logs]
    # every line the terminal showed is in the run's logs, once
    shown = terminal.getvalue().splitlines()
    assert len(shown) == 1 + 2 * 5 + 1  # start, 5 lines per series, verify
    for line in shown:
        assert msgs.count(line) == 1, (line, msgs)
    by_msg = {lg["message"]: lg for lg in logs}
    ingest_ids, render_ids = _task_ids(fr, "ingest-series"), _task_ids(fr, "render-series")
    for e in s.done:
        v = e.volume_id[:12]
        (ing,) = [lg for lg in logs if re.fullmatch(rf"{v}: ingested in \d+\.\d s", lg["message"])]
        assert ing["task_run_id"] in ingest_ids and ing["name"] == "xwin.stages" and ing["level"] == logging.INFO
        for pat in (rf"{v}: rendering 8 views", rf"{v}: rendered 8 views in .*views/s\)", rf"{v}: committed in .*"):
            (lg,) = [lg for lg in logs if re.fullmatch(pat, lg["message"])]
            assert lg["task_run_id"] in render_ids
    assert (
        by_msg["backfill uitest: 2 series to process, 0 already done, 1 rejected while planning"]["task_run_id"] is None
    )  # the flow's own
    assert by_msg["verify (shallow)"]["flow_run_id"] == fr
    (end,) = [m for m in msgs if m.startswith("backfill uitest: done 2, skipped 0, rejected 1, failed 0 of 3 planned")]
    assert f"rejected {bad}: unreadable_file" in end
    (warn,) = [lg for lg in logs if "not written" in lg["message"]]
    assert warn["level"] == logging.WARNING and warn["task_run_id"] in render_ids
    assert warn["message"].startswith("preview of ")

    # the summary artifact shows the one preview that was written, inline
    (md,) = _api("/artifacts/filter", {"artifacts": {"key": {"any_": ["backfill-uitest"]}}, "sort": "UPDATED_DESC"})[:1]
    assert md["flow_run_id"] == fr
    alt, im, nbytes = _decode_data_url(md["data"])
    assert alt == "previews: every series" and nbytes <= rep.SHEET_BYTES
    png = Path(rep.reports_url(str(store))) / "previews" / "uitest" / SPEC.spec_hash
    (written,) = list(png.glob("*.png"))
    assert written.stem[:12] in {e.volume_id[:12] for e in s.done}
    ref = Image.open(written).convert("L")
    tile = np.asarray(im, dtype=np.float32)[18 : 18 + round(ref.height * (im.width - 8) / ref.width), 4:-4]
    ref_a = np.asarray(ref.resize((tile.shape[1], tile.shape[0])), dtype=np.float32)
    assert np.corrcoef(tile.ravel(), ref_a.ravel())[0, 1] > 0.95

    # the validation: a run named after its cohort, linked both ways to this backfill run
    (res,) = validate_volumes(str(store), "uitest", SPEC, [s.done[0].volume_id], prefect=True, backfill_run=fr)
    vruns = _api("/flow_runs/filter", {"flow_runs": {"name": {"any_": ["validate-uitest"]}}})
    assert len(vruns) == 1
    vfr = vruns[0]["id"]
    (to_backfill,) = _api("/artifacts/filter", {"artifacts": {"key": {"any_": ["validation-uitest-backfill"]}}})
    assert to_backfill["flow_run_id"] == vfr and f"/runs/flow-run/{fr})" in to_backfill["data"]
    (to_validation,) = _api("/artifacts/filter", {"artifacts": {"key": {"any_": ["backfill-uitest-validation"]}}})
    assert to_validation["flow_run_id"] == fr and f"/runs/flow-run/{vfr})" in to_validation["data"]
    vlogs = [lg["message"] for lg in _logs(vfr, s.done[0].volume_id[:12] + ": FDK reconstruction")]
    assert any(m.startswith(f"validate uitest/{SPEC.spec_hash}: 1 rings, FDK (") for m in vlogs), vlogs
    (line,) = [m for m in vlogs if m.startswith(s.done[0].volume_id[:12] + ": FDK reconstruction")]
    assert f"PSNR {res['psnr']:.1f} dB, SSIM {res['ssim']:.3f}" in line


@pytest.mark.prefect
def test_prefect_run_logs_from_dask_workers(prefect_api, tmp_path, two_cts):
    """Task runs on Dask worker processes send their stage lines to the same flow run."""
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    good, _ = two_cts
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flow = bf.backfill_cohort.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        state = flow(
            cohort="uidask",
            store=str(tmp_path / "store"),
            source=[str(g) for g in good],
            spec=SPEC,
            backend="joseph",
            verify="none",
            previews=0,
            return_state=True,
        )
    s = state.result()
    fr = str(state.state_details.flow_run_id)
    logs = _logs(fr, "backfill uidask: done 2")
    render_ids = _task_ids(fr, "render-series")
    for e in s.done:
        v = e.volume_id[:12]
        (lg,) = [lg for lg in logs if re.fullmatch(rf"{v}: rendered 8 views in .*", lg["message"])]
        assert lg["task_run_id"] in render_ids


def test_run_log_handler_leaves_a_record_to_prefects_own_handler(monkeypatch):
    """With PREFECT_LOGGING_EXTRA_LOGGERS=xwin, Prefect attaches its own API handler to ``xwin``: inside a run a
    record of an ``xwin`` logger is then sent once (by Prefect's handler), not a second time by xwin's."""
    from prefect.logging.handlers import APILogHandler

    from xwin.flows import runlogs

    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(runlogs, "in_prefect_run", lambda: True)
    monkeypatch.setattr(APILogHandler, "emit", lambda self, rec: sent.append((type(self).__name__, rec.getMessage())))
    logging.getLogger("xwin.flows.tasks").warning("w1")
    logging.getLogger("xwin.stages").info("s1")
    assert sent == [("RunLogHandler", "w1"), ("RunLogHandler", "s1")]  # alone: xwin's handler sends each once
    theirs = APILogHandler()
    logging.getLogger("xwin").addHandler(theirs)
    try:
        sent.clear()
        logging.getLogger("xwin.flows.tasks").warning("w2")
        logging.getLogger("xwin.stages").info("s2")  # does not propagate to "xwin": only xwin's handler has it
    finally:
        logging.getLogger("xwin").removeHandler(theirs)
    assert sent == [("APILogHandler", "w2"), ("RunLogHandler", "s2")]
