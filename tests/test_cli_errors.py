"""Clear words at the edges of the command line (issues 14 §5 and 20).

Bad user files (RenderSpec, training config, --set) end a command with one line per problem naming the file, the
field, the value and the rule, exit status 2, no traceback; an invalid cohort name is refused before the store is
touched; a store that cannot be reached (no such store or bucket, refused credentials, endpoint down) is one line
naming the store and the cause, with no secret and no "Unclosed client session" on stderr; ``train`` never makes a
store and takes ``--cohort 2024`` as the string "2024"; a store at ``s3://bucket`` keeps its reports in its bucket;
a backfill outside a terminal prints one line per stage; the serverless path shows no Prefect telemetry notice;
every ``--help`` reads at 80 columns.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from xwin.flows.cli import app
from xwin.schemas.render import RenderSpec

TINY = RenderSpec(height=32, width=32, pixel_mm=10.0, n_views=16, yaw_step_deg=22.5)
CI_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "CIRCLECI", "BUILDKITE", "TF_BUILD")


def xwin(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
    """``xwin ARGS`` in a new process (stdin/stdout/stderr are pipes, not a terminal)."""
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "xwin.flows.cli", *args],
        env=e,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


# ---- bad files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "text", "expect"),
    [
        (
            "s.json",
            '{"height": -5, "n_views": "many", "colour": 1}',
            [
                "error: {f}: height = -5: Input should be greater than or equal to 8",
                "error: {f}: n_views = 'many': Input should be a valid integer, unable to parse string as an integer",
                "error: {f}: colour = 1: unknown field",
            ],
        ),
        ("s.json", '{"height": 64,', ["error: {f}: line 1 column 15: not valid JSON (Expecting property name"]),
        ("s.yaml", "height: [1\n", ["error: {f}: line 2 column 1: not valid YAML (expected ',' or ']'"]),
        ("s.yml", "- 1\n- 2\n", ["error: {f}: the spec must be a mapping of field: value, got a list"]),
        ("missing.json", None, ["error: spec file {f}: no such file"]),
    ],
)
def test_bad_spec_file_is_one_line_per_problem(tmp_path, name, text, expect):
    f = tmp_path / name
    if text is not None:
        f.write_text(text)
    store = tmp_path / "store"
    for cmd in (["backfill", "--cohort", "example"], ["render", "--all"]):
        r = CliRunner().invoke(app, [*cmd, "--store", str(store), "--spec", str(f)])
        assert r.exit_code == 2, r.output
        lines = error_lines(r.stderr)
        assert len(lines) == len(expect), r.stderr
        for line, want in zip(lines, expect):
            assert line.startswith(want.format(f=f)), (line, want)
        assert "Traceback" not in r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not store.exists()  # nothing was created


def test_bad_spec_in_a_real_process_has_no_traceback(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"height": -5}')
    r = xwin("backfill", "--cohort", "example", "--store", str(tmp_path / "st"), "--spec", str(f))
    assert r.returncode == 2
    assert r.stderr == f"error: {f}: height = -5: Input should be greater than or equal to 8\n"
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("cmd", [["backfill", "--cohort", "a/b"], ["ingest", "example", "--cohort", "_x"]])
def test_invalid_cohort_is_refused_before_the_store_is_created(tmp_path, cmd):
    store = tmp_path / "store"
    r = CliRunner().invoke(app, [*cmd, "--store", str(store)])
    assert r.exit_code == 2, r.output
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: --cohort: invalid cohort {cmd[-1]!r}: use 1-200 chars of [A-Za-z0-9._-]")
    assert not store.exists()


def test_unusable_manifest_is_one_line(tmp_path):
    bad = tmp_path / "metadata.csv"
    bad.write_text("Subject ID,Study UID\nP1,1.2.3\n")
    store = tmp_path / "store"
    cases = [
        (["backfill", "--cohort", "n", "--manifest", str(bad)], f"error: {bad}: not an NBIA metadata.csv"),
        (["ingest", "--manifest", str(bad)], f"error: {bad}: not an NBIA metadata.csv"),
        (["ingest", "--manifest", str(tmp_path / "no.csv")], f"error: manifest {tmp_path / 'no.csv'}: no such file"),
    ]
    for args, want in cases:
        r = CliRunner().invoke(app, [*args, "--store", str(store)])
        assert r.exit_code == 2, r.output
        (line,) = error_lines(r.stderr)
        assert line.startswith(want), line
    assert not store.exists()


def test_training_config_problems_name_their_source(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("optim:\n  lr: fast\ndata:\n  batch_size: 2\n  colour: red\n")
    r = CliRunner().invoke(
        app, ["train", "--config", str(cfg), "--preset", "tiny", "--set", "data.batch_size=lots", "--synthetic"]
    )
    assert r.exit_code == 2, r.output
    assert sorted(error_lines(r.stderr)) == sorted(
        [
            f"error: {cfg}: optim.lr = 'fast': Input should be a valid number, unable to parse string as a number",
            f"error: {cfg}: data.colour = 'red': unknown field",
            "error: --set data.batch_size=lots: data.batch_size = 'lots': Input should be a valid integer, "
            "unable to parse string as an integer",
        ]
    )
    cfg.write_text("optim: {lr: 1\n")
    r = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert r.exit_code == 2
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: {cfg}: line 2 column 1: not valid YAML")
    r = CliRunner().invoke(app, ["train", "--preset", "huge"])
    assert r.exit_code == 2 and error_lines(r.stderr) == [
        "error: unknown preset 'huge'; choose one of ['base', 'tiny']"
    ]
    r = CliRunner().invoke(app, ["train", "--preset", "tiny", "--set", "optim.lr"])
    assert r.exit_code == 2
    assert error_lines(r.stderr) == ["error: --set optim.lr: override 'optim.lr' must look like key.sub=value"]


def test_train_never_creates_a_store(tmp_path):
    store = tmp_path / "no-store"
    r = CliRunner().invoke(app, ["train", "--preset", "tiny", "--store", str(store), "--max-steps", "1"])
    assert r.exit_code == 2, r.output
    assert error_lines(r.stderr) == [f"error: no xwin store at {store} (missing xwin.json)"]
    assert not store.exists()
    # the library path (a config naming the store) refuses it too
    from xwin.training.config import load_config
    from xwin.training.loop import build_streams

    with pytest.raises(FileNotFoundError, match="no xwin store"):
        build_streams(load_config(preset="tiny", values={"data": {"store": str(store)}}))
    assert not store.exists()


def test_train_cohort_option_is_a_string(tmp_path, rendered_dataset):
    """``--cohort 2024`` is the cohort "2024" (not the number 2024); --set still parses YAML unless quoted."""
    from xwin.storage import open_store
    from xwin.training.config import parse_override

    url = str(tmp_path / "store")
    ds = open_store(url).dataset("2024", rendered_dataset.spec)
    for vid in rendered_dataset.volume_ids:
        ds.write_ring(vid, rendered_dataset.rings[vid], rendered_dataset.geometry.view_meta(), {"source": "test"})
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--store", url, "--cohort", "2024", "--max-steps", "1", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 1
    assert parse_override('data.cohort="2024"') == {"data": {"cohort": "2024"}}
    assert parse_override("optim.lr=1e-4") == {"optim": {"lr": 1e-4}}
    r = CliRunner().invoke(app, ["train", "--preset", "tiny", "--set", "data.cohort=2024", "--synthetic"])
    assert r.exit_code == 2
    assert error_lines(r.stderr) == [
        "error: --set data.cohort=2024: data.cohort = 2024: Input should be a valid string"
    ]


# ---- stores that cannot be reached ------------------------------------------------------------------------------
def _one_clean_line(r: subprocess.CompletedProcess, start: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(start), lines[0]
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr
    return lines[0]


def test_unreachable_endpoint_is_one_line(tmp_path):
    port = closed_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "XWIN_S3_ENDPOINT": f"http://127.0.0.1:{port}"}
    env |= {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123"}
    want = f"error: store s3://bkt/st: cannot reach the S3 endpoint http://127.0.0.1:{port}"
    for cmd in (["status"], ["backfill", "--cohort", "example"], ["describe", "--volume", "x"]):
        r = xwin(*cmd, "--store", "s3://bkt/st", env=env)
        assert _one_clean_line(r, want) == want
        assert "s3cr3t-value-123" not in r.stdout + r.stderr


def test_no_such_bucket_and_no_such_store_are_one_line(s3_server, tmp_path):
    from conftest import make_s3_bucket

    make_s3_bucket(s3_server, "xwin-empty")
    r = xwin("status", "--store", "s3://xwin-missing/st")
    _one_clean_line(r, "error: store s3://xwin-missing/st: no such bucket 'xwin-missing'")
    r = xwin("ingest", "example", "--store", "s3://xwin-missing/st")
    _one_clean_line(r, "error: store s3://xwin-missing/st: no such bucket 'xwin-missing'")
    r = xwin("status", "--store", "s3://xwin-empty/st")
    _one_clean_line(r, "error: no xwin store at s3://xwin-empty/st (missing xwin.json)")
    r = xwin("verify", "--store", str(tmp_path / "nothing"))
    _one_clean_line(r, f"error: no xwin store at {tmp_path / 'nothing'} (missing xwin.json)")
    assert not (tmp_path / "nothing").exists()


def test_refused_credentials_and_a_clean_exit_on_a_real_s3(seaweed_url, seaweed_s3, tmp_path, small_ct_path):
    """SeaweedFS checks signatures: a wrong secret or an unknown key is one line without the secret; a command that
    worked leaves no aiohttp session for the interpreter's exit to report."""
    r = xwin("ingest", str(small_ct_path), "--store", seaweed_url, "--cohort", "c", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["done"], r.stdout
    assert "Unclosed" not in r.stderr and "Task exception" not in r.stderr, r.stderr
    r = xwin("status", "--store", seaweed_url, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["volumes"]["counts"]["committed"] == 1
    wrong = "not-the-secret-0123456789"
    r = xwin("status", "--store", seaweed_url, env={"AWS_SECRET_ACCESS_KEY": wrong})
    _one_clean_line(r, f"error: store {seaweed_url}: the S3 server refused the credentials (SignatureDoesNotMatch")
    assert wrong not in r.stderr
    r = xwin("status", "--store", seaweed_url, env={"AWS_ACCESS_KEY_ID": "nobody"})
    _one_clean_line(r, f"error: store {seaweed_url}: the S3 server refused the credentials (InvalidAccessKeyId")
    assert seaweed_s3.env()["AWS_SECRET_ACCESS_KEY"] not in r.stderr


# ---- describe / export find the store's own dataset: tests/test_render_cli.py -----------------------------------


# ---- reports of a bucket store ------------------------------------------------------------------------------------
def test_reports_url_stays_in_the_bucket():
    from xwin.flows.reports import reports_url

    assert reports_url("s3://bkt") == "s3://bkt/reports"
    assert reports_url("s3://bkt/") == "s3://bkt/reports"
    assert reports_url("s3://bkt/x/store") == "s3://bkt/x/store-reports"
    assert reports_url("/data/example") == "/data/example-reports"


def test_backfill_into_a_bucket_store_writes_reports_inside_it(s3_server, tmp_path, small_ct_path):
    import boto3
    from conftest import make_s3_bucket

    url = make_s3_bucket(s3_server, "xwin-whole")
    spec = tmp_path / "spec.json"
    spec.write_text(TINY.model_dump_json())
    c = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    before = {b["Name"] for b in c.list_buckets()["Buckets"]}
    r = xwin(
        "backfill", "--cohort", "t", "--store", url, "--source", str(small_ct_path), "--spec", str(spec),
        "--verify", "none", "--no-prefect", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    vid = json.loads(r.stdout)["done"][0]["volume_id"]
    assert {b["Name"] for b in c.list_buckets()["Buckets"]} == before  # no "xwin-whole-reports" bucket
    keys = {o["Key"] for o in c.list_objects_v2(Bucket="xwin-whole", Prefix="reports/")["Contents"]}
    assert f"reports/previews/t/{TINY.spec_hash}/{vid}.png" in keys
    assert any(k.startswith("reports/runs/") and k.endswith(".md") for k in keys)
    assert "preview of" not in r.stderr and "not written" not in r.stderr, r.stderr


# ---- progress and quiet runs ------------------------------------------------------------------------------------
def test_backfill_outside_a_terminal_prints_one_line_per_stage(tmp_path, small_ct_path):
    spec = tmp_path / "spec.json"
    spec.write_text(TINY.model_dump_json())
    store = tmp_path / "store"
    args = ["backfill", "--cohort", "t", "--store", str(store), "--source", str(small_ct_path), "--spec", str(spec)]
    r = xwin(*args, "--backend", "joseph", "--verify", "shallow")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    m = re.search(r"preview (\w+):", r.stdout)
    assert m, r.stdout
    v = m.group(1)[:12]
    pattern = [
        r"backfill t: 1 series to process, 0 already done",
        rf"{v}: ingested in \d+\.\d s",
        rf"{v}: rendering 16 views",
        rf"{v}: rendered 16 views in \d+\.\d s \(\d+\.\d views/s\)",
        rf"{v}: committed in \d+\.\d s",
        rf"\[1/1\] done {v}( \(QC flagged: [a-z_, ]+\))?",
        r"verify \(shallow\)",
    ]
    assert len(lines) == len(pattern), r.stderr
    for line, p in zip(lines, pattern):
        assert re.fullmatch(p, line), (line, p)
    r = xwin(*args, "--verify", "none")  # a rerun: nothing to do, one line
    assert r.returncode == 0 and r.stderr.splitlines() == ["backfill t: 0 series to process, 1 already done"]


def _run_in_terminal(argv: list[str], env: dict[str, str], timeout_s: float = 300) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin/stdout/stderr; (exit status, everything it wrote)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(argv[0], argv, env)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_serverless_backfill_in_a_terminal_shows_no_telemetry_notice(tmp_path, small_ct_path):
    """A first Prefect import in a terminal prints Prefect's telemetry notice; the serverless path talks to no
    Prefect server, so it must not show it (a fresh Prefect home, no CI variables, no DO_NOT_TRACK)."""
    spec = tmp_path / "spec.json"
    spec.write_text(TINY.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k not in (*CI_VARS, "DO_NOT_TRACK", "PREFECT_API_URL")}
    env |= {"HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect-home"), "COLUMNS": "100"}
    argv = [sys.executable, "-m", "xwin.flows.cli", "backfill", "--cohort", "t", "--store", str(tmp_path / "st")]
    argv += ["--source", str(small_ct_path), "--spec", str(spec), "--verify", "none"]
    code, out = _run_in_terminal(argv, env)
    assert code == 0, out
    assert "backfill t: done 1" in out
    assert "anonymous usage data" not in out and "DO_NOT_TRACK" not in out, out


def test_render_reports_views_as_they_are_done(small_ct_path):
    import nibabel as nib

    from xwin.pipeline.render import render_ring

    img = nib.load(str(small_ct_path))
    hu, aff = np.asarray(img.dataobj), img.affine
    spec = RenderSpec(height=24, width=24, pixel_mm=12.0, n_views=20, yaw_step_deg=18.0)
    calls: list[tuple[int, int]] = []
    views, _ = render_ring(hu, aff, spec, "joseph", on_progress=lambda d, t: calls.append((d, t)))
    plain, _ = render_ring(hu, aff, spec, "joseph")
    np.testing.assert_array_equal(views, plain)  # reporting changes no value
    assert calls == [(0, 20), (16, 20), (20, 20)]  # the joseph projector works in batches of 16 views
    calls.clear()
    render_ring(hu, aff, spec, "torch", on_progress=lambda d, t: calls.append((d, t)), max_rays=5 * 24 * 24)
    assert calls == [(0, 20), (5, 20), (10, 20), (15, 20), (20, 20)]


# ---- help ---------------------------------------------------------------------------------------------------------
def _commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        out += [[name, s] for s in subs] if subs else [[name]]
    return out


def test_help_reads_at_80_columns():
    """Every option of every command: lines of at most 80 characters, and its help on one or two lines."""
    cmds = _commands()
    assert ["backfill"] in cmds and ["bench", "consumer"] in cmds and len(cmds) >= 16
    for cmd in cmds:
        r = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert max(len(line) for line in lines) <= 80, (cmd, r.output)
        body = lines[lines.index("Options:") + 1 :]
        starts = [i for i, line in enumerate(body) if line.startswith("  -")]
        assert starts, (cmd, r.output)
        for a, b in zip(starts, [*starts[1:], len(body)]):
            block = [line for line in body[a:b] if line.strip()]
            assert len(block) <= 2, (cmd, block)
            assert "<" not in body[a].split("  ")[1], (cmd, body[a])  # no <str>-style type column
