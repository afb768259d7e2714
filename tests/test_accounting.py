"""Every planned series is accounted for; failures that can pass are never rejections (issues 14 §3, 22).

* RunSummary: done / skipped / rejected / failed and ``planned``; ``--json`` of backfill, ingest and scan; exit 1
  exactly when something failed.
* An I/O error (EIO, a timeout, a full disk ...) while reading an input -- at plan or load time, NIfTI or DICOM --
  is retried, then ``failed`` with ``retryable``; never ``rejected: unreadable_file``; the landing ledger keeps it
  out; the next run finishes it.
* A CUDA out-of-memory error during render: smaller chunks, then the CPU; never a rejection (injected on the CPU).
* Two backfills of one cohort at once: the second skips what the first holds; neither fails.
* The Dask runner without a Prefect API: every series, several runs in a row, a failure in a worker in `--json`,
  no process left behind; its host-wide slots are shared by processes and freed by a dead holder.

Small CTs (the bundled CT block-averaged 8x8x4) and a 32x32, 4-view spec keep each run to seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch
from procs import marked
from typer.testing import CliRunner

from xwin.flows import backfill as bf
from xwin.flows import reports as rep
from xwin.flows import tasks
from xwin.flows.params import BackfillParams
from xwin.flows.runtime import LocalStages
from xwin.pipeline.ingest import load as load_mod
from xwin.pipeline.ingest.errors import IngestError, is_read_failure
from xwin.schemas.ingest import Failure, Rejection, RejectReason, RunEntry, RunSummary
from xwin.schemas.render import RenderSpec
from xwin.storage import is_transient, open_store

SPEC = RenderSpec(height=32, width=32, pixel_mm=12.0, n_views=4, yaw_step_deg=90.0)
REPO = Path(__file__).resolve().parents[1]
EIO = OSError(errno.EIO, "Input/output error")


def _variant(src: Path, dst: Path, offset: int) -> Path:
    img = nib.load(str(src))
    a = np.asarray(img.dataobj).astype(np.int16)
    nib.save(nib.Nifti1Image(np.where(a > -500, a + offset, a).astype(np.int16), img.affine), str(dst))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_ct_path):
    """4 small CTs with distinct content (64x64x33 voxels) + a file that is not a NIfTI."""
    from conftest import downsample_nifti

    d = tmp_path_factory.mktemp("tiny")
    base = downsample_nifti(small_ct_path, d / "base.nii.gz", factors=(2, 2, 2))
    good = [_variant(base, d / f"ct{k}.nii.gz", 5 * k) for k in range(4)]
    bad = d / "broken.nii.gz"
    bad.write_bytes(b"this is not a gzip stream")
    return good, bad


@pytest.fixture
def fast_retries(monkeypatch):
    """Retries without waiting (the policy is unchanged: 3 retries of what is transient)."""
    monkeypatch.setenv("XWIN_RETRY_BASE_S", "0")
    for t in (tasks.plan_series, tasks.ingest_series, tasks.render_series):
        monkeypatch.setattr(t, "retry_delay_seconds", [0.0, 0.0, 0.0])


def _params(store, sources, **kw) -> BackfillParams:
    kw = {"verify": "none", "previews": 0, **kw}
    return BackfillParams(
        cohort="test", store=str(store), source=[str(s) for s in sources], spec=SPEC, backend="joseph", **kw
    )


class Fault:
    """NIfTI loads of ``path`` raise ``err`` while ``on`` (the first ``times`` of them); other files load as usual."""

    def __init__(self, monkeypatch, path: Path, err: OSError = EIO, times: int = 10**9) -> None:
        self.path, self.err, self.times, self.calls, self.on = str(path), err, times, 0, True
        real = load_mod._load_nifti

        def flaky(c):
            if self.on and c.paths[0] == self.path and self.calls < self.times:
                self.calls += 1
                raise self.err
            return real(c)

        monkeypatch.setattr(load_mod, "_load_nifti", flaky)


def _accounted(s: dict | RunSummary) -> None:
    d = json.loads(s.model_dump_json()) if isinstance(s, RunSummary) else s
    assert d["planned"] == len(d["done"]) + len(d["skipped"]) + len(d["rejected"]) + len(d["failed"])


# ---- the contract ----------------------------------------------------------------------------------------------
def test_run_summary_counts_every_planned_input():
    f = Failure(input="c/", stage="ingest", error="OSError: [Errno 5] Input/output error", retryable=True)
    s = RunSummary(
        done=[RunEntry(input="a", volume_id="v1")],
        rejected=[Rejection(input="b", reason=RejectReason.missing_slices, detail="gap")],
        failed=[f],
    )
    assert s.planned == 3 and s.counts() == {"done": 1, "skipped": 0, "rejected": 1, "failed": 1}
    out = json.loads(s.model_dump_json())
    assert out["planned"] == 3 and out["failed"][0] == {
        "input": "c/",
        "stage": "ingest",
        "error": "OSError: [Errno 5] Input/output error",
        "retryable": True,
        "volume_id": None,
        "series_uid": None,
    }
    assert RunSummary.model_validate(out) == s
    assert s.merge(s).planned == 6
    with pytest.raises(ValueError, match="4 planned but 3 accounted for"):
        RunSummary(done=s.done, rejected=s.rejected, failed=s.failed, planned=4)


def test_what_can_pass_and_what_is_no_verdict():
    for e in (
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.ENOTCONN, "Transport endpoint is not connected"),
        OSError(errno.EIO, "Input/output error"),
        MemoryError(),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        __import__("distributed").scheduler.KilledWorker("render-series-1", "tcp://127.0.0.1:1", 3),
    ):
        assert is_transient(e), e
    wrapped = IngestError(RejectReason.unreadable_file, "x.nii.gz: unreadable")
    wrapped.__cause__ = OSError(errno.ESTALE, "Stale file handle")
    assert is_transient(wrapped)
    for e in (
        PermissionError(errno.EACCES, "denied"),
        gzip.BadGzipFile("Not a gzipped file"),
        RuntimeError("shape mismatch"),
    ):
        assert not is_transient(e), e
    # no verdict on the input: the file system failed (even when it will not pass by itself)
    assert is_read_failure(EIO) and is_read_failure(PermissionError(errno.EACCES, "denied"))
    assert is_read_failure(TimeoutError()) and is_read_failure(ConnectionResetError())
    assert not is_read_failure(gzip.BadGzipFile("Not a gzipped file"))  # the content is bad
    assert not is_read_failure(FileNotFoundError(errno.ENOENT, "gone")) and not is_read_failure(EOFError())


# ---- transient read errors: retried, then failed; never rejected ------------------------------------------------
def test_eio_while_loading_is_retried_then_failed_then_resumed(tmp_path, tiny, monkeypatch, fast_retries):
    good, bad = tiny
    store = tmp_path / "store"
    fault = Fault(monkeypatch, good[1])
    stages = LocalStages(max_workers=2, sleep=lambda s: None)
    with stages, pytest.raises(bf.BackfillIncomplete) as ei:
        bf.run_backfill(_params(store, [good[0], good[1], bad]), stages)
    s = ei.value.summary
    _accounted(s)
    assert s.planned == 3 and [e.input for e in s.done] == [str(good[0])]
    assert [(r.input, r.reason) for r in s.rejected] == [(str(bad), RejectReason.unreadable_file)]
    (f,) = s.failed
    assert (f.input, f.stage, f.retryable) == (str(good[1]), "ingest", True)
    assert f.error == "OSError: [Errno 5] Input/output error" and f.volume_id
    assert fault.calls == 4 and stages.attempts["ingest-series"] == 1 + 4  # 3 retries of the transient error
    # the report lists it, and says a rerun can pass
    (md,) = (Path(rep.reports_url(str(store))) / "runs").glob("*.md")
    assert f"| `{good[1]}` | ingest | OSError: [Errno 5] Input/output error | yes |" in md.read_text()
    # the file system recovers: the rerun finishes it
    fault.on = False
    s2 = bf.run_local(_params(store, [good[0], good[1], bad]))
    assert [e.input for e in s2.done] == [str(good[1])] and not s2.failed
    assert sorted(open_store(str(store)).dataset("test", SPEC).volume_ids()) == sorted(
        e.volume_id for e in s.done + s2.done
    )


def test_a_read_error_that_passes_is_retried_to_done(tmp_path, tiny, monkeypatch, fast_retries):
    good, _ = tiny
    fault = Fault(monkeypatch, good[2], OSError(errno.ENOSPC, "No space left on device"), times=2)
    s = bf.run_local(_params(tmp_path / "store", [good[2]]))
    assert fault.calls == 2 and [e.input for e in s.done] == [str(good[2])] and not s.failed and s.planned == 1


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory, tiny):
    from dicom_fixtures import series_from_nifti

    d = tmp_path_factory.mktemp("dicom") / "study"
    files = series_from_nifti(tiny[0][3], d)
    return d, sorted(files)


def test_eio_reading_a_dicom_slice_fails_the_series_at_plan_and_load(
    tmp_path, tiny, dicom_series, monkeypatch, fast_retries
):
    """Today's code counts a slice it cannot read as corrupt (-> rejected unreadable_file / a volume with a gap) or
    rejects the series while loading; both are failures that a rerun finishes."""
    from xwin.pipeline.ingest import dicom_headers

    good, _ = tiny
    folder, files = dicom_series
    victim = str(files[len(files) // 2])
    store = tmp_path / "store"
    # 1. plan time: one header read fails with EIO every time
    real_header = dicom_headers.read_header
    header_calls = []

    def header(path, *a, **kw):
        if path == victim:
            header_calls.append(path)
            raise OSError(errno.EIO, "Input/output error", path)
        return real_header(path, *a, **kw)

    monkeypatch.setattr(dicom_headers, "read_header", header)
    with pytest.raises(bf.BackfillIncomplete) as ei:
        bf.run_local(_params(store, [folder, good[0]]))
    s = ei.value.summary
    _accounted(s)
    assert not s.rejected and [e.input for e in s.done] == [str(good[0])]
    (f,) = s.failed
    assert (f.input, f.stage, f.retryable) == (str(folder), "plan", True) and victim in f.error
    assert len(header_calls) == 4  # the first read and 3 retries
    monkeypatch.setattr(dicom_headers, "read_header", real_header)
    # 2. load time: reading the slice's bytes fails (a timeout of a network file system)
    import builtins

    def failing_open(path, *a, **kw):
        if str(path) == victim:
            raise OSError(errno.ETIMEDOUT, "Connection timed out", str(path))
        return builtins.open(path, *a, **kw)

    monkeypatch.setattr(load_mod, "open", failing_open, raising=False)
    with pytest.raises(bf.BackfillIncomplete) as ei:
        bf.run_local(_params(store, [folder, good[0]]))
    s = ei.value.summary
    assert not s.rejected and [e.input for e in s.skipped] == [str(good[0])]
    (f,) = s.failed
    assert (f.input, f.stage, f.retryable) == (str(folder), "ingest", True) and "Errno 110" in f.error
    # 3. the file system is back: the series is ingested whole
    monkeypatch.delattr(load_mod, "open")
    s = bf.run_local(_params(store, [folder]))
    (e,) = s.done
    rec = open_store(str(store)).volume_record(e.volume_id)
    assert rec.shape[2] == len(files) and rec.provenance.input_files == len(files)


def test_a_permission_error_fails_the_input_as_not_retryable(tmp_path, tiny, monkeypatch, fast_retries):
    good, _ = tiny
    fault = Fault(monkeypatch, good[0], PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(bf.BackfillIncomplete) as ei:
        bf.run_local(_params(tmp_path / "store", [good[0]]))
    (f,) = ei.value.summary.failed
    assert (f.stage, f.retryable) == ("ingest", False) and fault.calls == 1  # not retried: it will not pass
    assert not ei.value.summary.rejected


# ---- --json and exit status ------------------------------------------------------------------------------------
def _spec_file(tmp_path) -> Path:
    p = tmp_path / "spec.json"
    p.write_text(SPEC.model_dump_json())
    return p


def test_cli_backfill_json_lists_failed_and_exits_1(tmp_path, tiny, monkeypatch, fast_retries):
    from xwin.flows.cli import app

    good, bad = tiny
    fault = Fault(monkeypatch, good[1])
    args = ["backfill", "--cohort", "test", "--store", str(tmp_path / "store"), "--spec", str(_spec_file(tmp_path))]
    args += ["--backend", "joseph", "--no-prefect", "--verify", "none", "--json"]
    for src in (good[0], good[1], bad):
        args += ["--source", str(src)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout[r.stdout.index("{") :])
    _accounted(out)
    assert out["planned"] == 3 and [d["input"] for d in out["done"]] == [str(good[0])]
    assert [x["reason"] for x in out["rejected"]] == ["unreadable_file"]
    assert [(x["input"], x["stage"], x["retryable"]) for x in out["failed"]] == [(str(good[1]), "ingest", True)]
    assert "Errno 5" in out["failed"][0]["error"]
    fault.on = False
    r = CliRunner().invoke(app, args)
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert r.exit_code == 0, r.output
    assert (len(out["done"]), len(out["skipped"]), len(out["rejected"]), out["failed"]) == (1, 1, 1, [])


def test_cli_ingest_json_lists_failed_and_exits_1(tmp_path, tiny, monkeypatch):
    from xwin.flows.cli import app
    from xwin.pipeline.ingest import run as run_mod

    good, bad = tiny
    monkeypatch.setattr(run_mod, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    fault = Fault(monkeypatch, good[1], OSError(errno.EIO, "Input/output error"))
    args = ["ingest", str(good[0]), str(good[1]), str(bad), "--store", str(tmp_path / "st"), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    _accounted(out)
    assert out["planned"] == 3 and [d["input"] for d in out["done"]] == [str(good[0])]
    assert [x["reason"] for x in out["rejected"]] == ["unreadable_file"]
    assert [(x["input"], x["stage"], x["retryable"]) for x in out["failed"]] == [(str(good[1]), "ingest", True)]
    assert fault.calls == 4  # retried 3 times
    fault.on = False
    r = CliRunner().invoke(app, args)
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and len(out["done"]) == 1 and len(out["skipped"]) == 1 and not out["failed"]


def test_landing_ledger_keeps_failed_entries_and_scan_exits_1(tmp_path, tiny, monkeypatch, fast_retries):
    from xwin.flows.cli import app
    from xwin.flows.landing import ScanIncomplete, read_ledger, scan_once

    good, bad = tiny
    landing = tmp_path / "landing"
    landing.mkdir()
    for p in (good[0], good[1], bad):
        (landing / p.name).write_bytes(p.read_bytes())
    flaky = landing / good[1].name
    fault = Fault(monkeypatch, flaky)
    store = str(tmp_path / "store")
    with pytest.raises(ScanIncomplete) as ei:
        scan_once(str(landing), "test", store, SPEC, "joseph")
    s = ei.value.summary
    _accounted(s)
    assert [f.input for f in s.failed] == [str(flaky)] and [r.input for r in s.rejected] == [str(landing / bad.name)]
    ledger = read_ledger(rep.reports_url(store), "test")
    assert sorted(ledger) == sorted([str(landing / good[0].name), str(landing / bad.name)])  # not the failed one
    # `xwin scan --json`: the failed entry is taken up again, still failing: exit 1
    spec = str(_spec_file(tmp_path))
    args = ["scan", "--landing", str(landing), "--cohort", "test", "--store", store, "--spec", spec, "--json"]
    r = CliRunner().invoke(app, [*args, "--backend", "joseph"])
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert out["planned"] == 1 and [f["input"] for f in out["failed"]] == [str(flaky)]
    fault.on = False
    r = CliRunner().invoke(app, [*args, "--backend", "joseph"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert [d["input"] for d in out["done"]] == [str(flaky)] and out["planned"] == 1
    assert str(flaky) in read_ledger(rep.reports_url(store), "test")


# ---- CUDA out of memory ----------------------------------------------------------------------------------------
class FakeCuda:
    """The torch projector, as if on a GPU that holds chunks of at most ``fits`` samples (None: nothing fits)."""

    def __init__(self, monkeypatch, fits: int | None) -> None:
        from xwin.pipeline.render import gpu

        self.fits, self.calls = fits, []
        real = gpu.project

        def project(mu, affine, views, *, device=None, max_samples=None):
            self.calls.append((device, max_samples))
            if device == "cuda":
                if self.fits is None or (max_samples or 2**25) > self.fits:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                device = "cpu"  # stands in for the GPU
            return real(mu, affine, views, device=device, max_samples=max_samples)

        monkeypatch.setattr(gpu, "project", project)


def test_cuda_oom_retries_smaller_chunks_then_the_cpu(monkeypatch, small_ct_path):
    from xwin.pipeline.render import render_ring

    img = nib.load(str(small_ct_path))
    hu, aff = np.asarray(img.dataobj), img.affine
    want, _ = render_ring(hu, aff, SPEC, "torch", device="cpu")
    fake = FakeCuda(monkeypatch, fits=2**19)
    notes: list[str] = []
    got, _ = render_ring(hu, aff, SPEC, "torch", device="cuda", notes=notes)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert fake.calls == [("cuda", None), ("cuda", 2**22), ("cuda", 2**19)]
    assert len(notes) == 2 and "max_samples=524288" in notes[-1]
    fake.fits, fake.calls, notes = None, [], []  # nothing fits: the CPU
    got, _ = render_ring(hu, aff, SPEC, "torch", device="cuda", notes=notes)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert fake.calls[-1] == ("cpu", None) and [d for d, _ in fake.calls[:-1]] == ["cuda"] * 5
    assert "rendered on the CPU" in notes[-1]
    # other errors are not swallowed: the render's own check, or the tests' run-time shape check before it
    with pytest.raises((ValueError, TypeError), match=r"volume must be 3-D|parameter .hu."):
        render_ring(hu[0], aff, SPEC, "torch", device="cuda")


TRITON_CALLS: list[dict] = []


def _fake_triton(mu, affine, views, *, device=None, volume_dtype="float32", max_views=None, block=0):
    """Like the triton backend: views per launch (``max_views``), device storage (``volume_dtype``); here even one
    view per launch does not fit on the "GPU", and the CPU path refuses GPU-only storage."""
    from xwin.pipeline.render import joseph

    TRITON_CALLS.append({"device": device, "volume_dtype": volume_dtype, "max_views": max_views})
    if device != "cpu":
        raise RuntimeError("CUDA error: out of memory")
    if volume_dtype != "float32":
        raise ValueError("volume_dtype other than float32 needs CUDA")
    return joseph.project(mu, affine, views)


def test_cuda_oom_of_a_views_per_launch_projector(monkeypatch, small_ct_path):
    from xwin.pipeline.render import BACKENDS, render_ring
    from xwin.pipeline.render.backends import Backend

    monkeypatch.setitem(BACKENDS, "faketriton", Backend("faketriton", __name__, "_fake_triton", lambda: True, "x"))
    img = nib.load(str(small_ct_path))
    hu, aff = np.asarray(img.dataobj), img.affine
    spec16 = SPEC.model_copy(update={"n_views": 16, "yaw_step_deg": 22.5})
    TRITON_CALLS.clear()
    notes: list[str] = []
    got, _ = render_ring(hu, aff, spec16, "faketriton", device="cuda", volume_dtype="float16", notes=notes)
    np.testing.assert_allclose(got, render_ring(hu, aff, spec16, "joseph")[0], rtol=1e-6)
    assert [c["max_views"] for c in TRITON_CALLS] == [None, 2, 1, None]  # 16 views -> 2 -> 1 -> the CPU
    assert TRITON_CALLS[-1] == {"device": "cpu", "volume_dtype": "float32", "max_views": None}
    assert "max_views=2" in notes[0] and "rendered on the CPU" in notes[-1]


def test_backfill_with_cuda_oom_is_never_a_rejection(tmp_path, tiny, monkeypatch, fast_retries):
    from xwin.pipeline.render import BACKENDS, render_ring

    good, _ = tiny
    monkeypatch.setitem(BACKENDS, "gpu", dataclasses.replace(BACKENDS["gpu"], available=lambda: True))
    FakeCuda(monkeypatch, fits=None)
    store = tmp_path / "store"
    s = bf.run_local(BackfillParams(cohort="t", store=str(store), source=[str(good[0])], spec=SPEC, backend="gpu"))
    (e,) = s.done
    assert not s.rejected and not s.failed
    ds = open_store(str(store)).dataset("t", SPEC)
    prov = ds.provenance(e.volume_id)
    assert prov["backend"] == "gpu" and "rendered on the CPU" in prov["render_notes"][-1]
    rec, hu = open_store(str(store)).read_volume(e.volume_id)
    want, _ = render_ring(hu, np.asarray(rec.affine), SPEC, "torch", device="cpu")
    np.testing.assert_allclose(ds.read_ring(e.volume_id), want.astype(SPEC.store_dtype), rtol=1e-6)
    # out of memory on the CPU too: failed (memory frees), retried by the next run -- still no rejection
    from xwin.pipeline.render import gpu

    def no_memory(*a, **kw):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(gpu, "project", no_memory)
    with pytest.raises(bf.BackfillIncomplete) as ei:
        bf.run_local(BackfillParams(cohort="t", store=str(store), source=[str(good[1])], spec=SPEC, backend="gpu"))
    (f,) = ei.value.summary.failed
    assert (f.stage, f.retryable, ei.value.summary.rejected) == ("render", True, [])


# ---- two backfills of one cohort at once ------------------------------------------------------------------------
def test_a_backfill_skips_what_another_live_writer_holds(tmp_path, tiny, fast_retries):
    from xwin.pipeline.ingest import plan_inputs

    good, _ = tiny
    store = tmp_path / "store"
    st = open_store(str(store))
    ds = st.dataset("test", SPEC)
    vids = [plan_inputs([str(g)], "test")[0][0].volume_id for g in good[:3]]
    # the other run: committing volume 0, rendering ring 1 (its volume committed), nothing of series 2
    (c1,), _ = plan_inputs([str(good[1])], "test")
    st.write_volume(*load_mod.load_candidate(c1))
    with st.volumes.claim(vids[0], "other-run:7", ttl_s=120), ds.claim(vids[1], "other-run:7", ttl_s=120):
        s = bf.run_local(_params(store, good[:3]))
    assert {e.volume_id: e.stage for e in s.skipped} == {vids[0]: "claimed-elsewhere", vids[1]: "claimed-elsewhere"}
    assert [e.volume_id for e in s.done] == [vids[2]] and not s.failed and s.planned == 3
    s2 = bf.run_local(_params(store, good[:3]))  # the other run "crashed": the next run finishes both
    assert sorted(e.volume_id for e in s2.done) == sorted(vids[:2]) and not s2.failed


def test_two_backfills_of_one_cohort_at_once(tmp_path, tiny, monkeypatch, fast_retries):
    """Two runs of the same cohort into one store at the same time (threads): both finish without an error,
    every series is done by exactly one of them, and the store verifies."""
    good, bad = tiny
    real = load_mod._load_nifti

    def slow(c):  # both runs load the same series at the same time, then race to commit it
        time.sleep(0.3)
        return real(c)

    monkeypatch.setattr(load_mod, "_load_nifti", slow)
    store = tmp_path / "store"
    results: dict[int, object] = {}

    def run(k: int) -> None:
        try:
            results[k] = bf.run_local(_params(store, [*good, bad], verify="shallow"), max_workers=2)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    runs = [results[0], results[1]]
    assert all(isinstance(r, RunSummary) for r in runs), [repr(r)[:3000] for r in runs if not isinstance(r, RunSummary)]
    done = [e.volume_id for r in runs for e in r.done]  # type: ignore[union-attr]
    assert len(done) == len(set(done)) == len(good)
    for r in runs:
        assert r.planned == len(good) + 1 and not r.failed and len(r.rejected) == 1  # type: ignore[union-attr]
    st = open_store(str(store))
    assert sorted(st.dataset("test", SPEC).volume_ids()) == sorted(done) and st.verify().clean


# ---- Dask without a Prefect server ------------------------------------------------------------------------------
def _install_fault(path: str) -> None:
    """Runs inside a Dask worker: NIfTI loads of ``path`` fail with EIO."""
    from xwin.pipeline.ingest import load

    real = load._load_nifti

    def flaky(c):
        if c.paths[0] == path:
            raise OSError(errno.EIO, "Input/output error (injected in a worker)")
        return real(c)

    load._load_nifti = flaky


@pytest.fixture(scope="module")
def dask_cluster():
    """Two worker processes, retries without waiting, no Prefect API anywhere."""
    import cloudpickle
    from distributed import LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    saved = {k: os.environ.pop(k, None) for k in ("PREFECT_API_URL", "XWIN_RETRY_BASE_S")}
    os.environ["XWIN_RETRY_BASE_S"] = "0"  # read by the workers when they import xwin.flows.tasks
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            pids = [w.pid for w in cluster.workers.values()]
            yield cluster
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_dask_backfill_without_prefect_api_finishes_every_series_each_time(tmp_path, tiny, dask_cluster):
    from xwin.flows.runtime import prefect_api_url

    good, bad = tiny
    assert prefect_api_url() is None
    for k in range(3):
        store = tmp_path / f"store{k}"
        s = bf.run_dask(_params(store, [*good, bad], verify="deep"), address=dask_cluster.scheduler_address)
        assert (len(s.done), len(s.rejected), s.failed, s.planned) == (len(good), 1, [], len(good) + 1), k
        ds = open_store(str(store)).dataset("test", SPEC)
        assert sorted(ds.volume_ids()) == sorted(e.volume_id for e in s.done)
        workers = {int(ds.provenance(e.volume_id)["writer"].split(":")[1]) for e in s.done}
        assert workers <= {w.pid for w in dask_cluster.workers.values()}  # rendered in the workers


def test_dask_backfill_reports_a_worker_failure_in_json(tmp_path, tiny, dask_cluster, fast_retries):
    from distributed import Client

    from xwin.flows.cli import app

    good, _ = tiny
    with Client(dask_cluster.scheduler_address, set_as_default=False) as c:
        c.run(_install_fault, str(good[1]))
        try:
            args = ["backfill", "--cohort", "test", "--store", str(tmp_path / "store")]
            args += ["--spec", str(_spec_file(tmp_path)), "--backend", "joseph", "--verify", "none", "--json"]
            args += ["--runner", "dask", "--dask-address", dask_cluster.scheduler_address]
            for g in good:
                args += ["--source", str(g)]
            r = CliRunner().invoke(app, args)
        finally:
            c.restart()  # fresh workers without the fault
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout[r.stdout.index("{") :])
    _accounted(out)
    assert out["planned"] == len(good) and len(out["done"]) == len(good) - 1
    (f,) = out["failed"]
    assert (f["input"], f["stage"], f["retryable"]) == (str(good[1]), "ingest", True)
    assert "injected in a worker" in f["error"]


def test_cli_dask_backfill_leaves_no_process_behind(tmp_path, tiny):
    """`xwin backfill --runner dask` without PREFECT_API_URL: its own LocalCluster, no Prefect server; when the
    command exits, no process it started (scheduler, workers, ephemeral servers) is left."""
    good, _ = tiny
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(XWIN_TEST_MARK=mark, XWIN_DASK_WORKERS="2", PREFECT_LOGGING_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "xwin.flows.cli", "backfill", "--cohort", "test", "--store", str(tmp_path / "s")]
    cmd += ["--spec", str(_spec_file(tmp_path)), "--backend", "joseph", "--runner", "dask", "--json"]
    for g in good[:3]:
        cmd += ["--source", str(g)]
    seen: set[int] = set()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:  # the processes it starts, while it runs
        seen |= {p.pid for p in marked(mark)}
        time.sleep(0.5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out[out.index("{") :])
    assert len(summary["done"]) == 3 and summary["planned"] == 3 and not summary["failed"]
    assert len(seen) >= 3, seen  # the command, and at least its two Dask workers
    deadline = time.monotonic() + 15
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert not [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_cli_refuses_the_prefect_flow_on_dask_without_an_api(tmp_path, tiny, monkeypatch):
    from xwin.flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    args = ["backfill", "--cohort", "t", "--store", str(tmp_path / "s"), "--source", str(tiny[0][0])]
    r = CliRunner().invoke(app, [*args, "--runner", "dask", "--prefect"])
    assert r.exit_code == 2 and "PREFECT_API_URL" in r.output
    assert not (tmp_path / "s").exists()


def test_host_slots_are_shared_by_processes_and_freed_by_a_dead_holder(tmp_path, monkeypatch):
    """The Dask workers' slots (``runtime.host_slot``): a slot held here makes another process wait; a holder that
    dies frees its slot."""
    from xwin.flows.runtime import host_slot

    monkeypatch.setenv("XWIN_SLOT_DIR", str(tmp_path))
    child = (
        "import sys, time\n"
        "from xwin.flows.runtime import host_slot\n"
        "print('ready', flush=True)\n"
        "t = time.monotonic()\n"
        "with host_slot('xwin-render-cpu:h', 1):\n"
        "    print(f'{time.monotonic() - t:.2f}', flush=True)\n"
        "    sys.stdin.readline()\n"  # hold the slot until told (or killed)
    )
    env = dict(os.environ, XWIN_SLOT_DIR=str(tmp_path))
    with host_slot("xwin-render-cpu:h", 1):
        p = subprocess.Popen([sys.executable, "-c", child], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(1.0)
    waited = float(p.stdout.readline())
    assert waited >= 0.9  # it waited for this process to release the slot
    # the child now holds the slot; it dies without releasing it: the slot is free at once
    p.kill()
    p.wait()
    t = time.monotonic()
    with host_slot("xwin-render-cpu:h", 1):
        assert time.monotonic() - t < 1.0
    # two slots: two holders at once
    with host_slot("xwin-cpu:h", 2), host_slot("xwin-cpu:h", 2):
        pass


def test_two_copies_of_one_input_are_planned_and_the_second_skipped_with_its_reason(tmp_path, tiny):
    """The same series given twice (a second copy of the file): both inputs are planned; the first is done, the
    copy is skipped with the reason, in the backfill and in `xwin ingest` alike; a rerun skips both."""
    import shutil

    from xwin.pipeline.ingest import ingest_sources

    good, _ = tiny
    copy = tmp_path / "copy" / good[0].name
    copy.parent.mkdir()
    shutil.copy(good[0], copy)
    store = tmp_path / "store"
    s = bf.run_local(_params(store, [good[0], copy, good[1]]))
    _accounted(s)
    assert s.planned == 3 and len(s.done) == 2 and not s.failed and not s.rejected
    (dup,) = s.skipped
    assert dup.input == str(copy) and dup.reason == f"duplicate of {good[0]}: the same series given twice"
    assert dup.volume_id == next(e.volume_id for e in s.done if e.input == str(good[0]))
    s2 = bf.run_local(_params(store, [good[0], copy]))
    assert s2.planned == 2 and len(s2.skipped) == 2 and not s2.done
    assert [e.reason for e in s2.skipped] == [None, dup.reason]

    si = ingest_sources([str(good[2]), str(copy), str(good[2])], "test", open_store(tmp_path / "store2"))
    assert si.planned == 3 and [e.input for e in si.done] == [str(good[2]), str(copy)]
    (again,) = si.skipped
    assert again.input == str(good[2]) and again.reason == f"duplicate of {good[2]}: the same series given twice"
