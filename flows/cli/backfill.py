"""``xwin backfill`` and ``xwin scan``: the backfill flow from the command line.

``xwin backfill`` runs the Prefect flow ``backfill-cohort`` when a Prefect API is configured (PREFECT_API_URL or
the active profile) or when ``--prefect`` is given (threads without an API: Prefect's ephemeral server, started
for the run and stopped with it; the Prefect flow on Dask needs a configured API). Otherwise it runs the same flow
body without a server: ``xwin.flows.backfill.run_local`` (threads) or ``run_dask`` (``--runner dask``: the same task
functions, retries and slot sizes on Dask workers). docs/orchestration.md says which mode needs what.

``--json`` prints the RunSummary: every planned series in exactly one of done, skipped, rejected, failed or
cancelled, and ``planned``. The exit status is 1 exactly when ``failed`` is not empty (or a verification found
damage). Ctrl-C or SIGTERM stops the run (``xwin.flows.stop``): no new series starts, renders in progress stop,
the summary is printed with the ``cancelled`` series and one line says so; exit status 130 (SIGINT) or 143
(SIGTERM). A second signal exits at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from xwin.flows.cli.common import (
    check_backend,
    check_cohort,
    check_manifest,
    check_sources,
    check_store_target,
    configured_prefect_api,
    fail,
    load_spec,
    prefect_server_configured,
    quiet_prefect,
    require_prefect_server,
)
from xwin.flows.cli.progress import show_progress


def backfill_cmd(
    cohort: str = typer.Option(
        ..., "--cohort", help="cohort name; cohort 'example' without --source is the bundled chest CT"
    ),
    store: str = typer.Option(..., "--store", help="store URL: a local path or s3://bucket/prefix"),
    source: list[str] | None = typer.Option(
        None, "--source", help="NIfTI file, DICOM folder or metadata.csv (repeatable)"
    ),
    manifest: Path | None = typer.Option(None, "--manifest", help="NBIA metadata.csv"),
    manifest_root: Path | None = typer.Option(
        None, "--manifest-root", help="folder the manifest paths are relative to (default: the csv's folder)"
    ),
    spec: Path | None = typer.Option(
        None, "--spec", help="RenderSpec JSON/YAML (default: X-WIN 512x512, 120 views of 3 deg)"
    ),
    backend: str | None = typer.Option(
        None, "--backend", help="render backend (default: XWIN_RENDER_BACKEND or auto = triton if CUDA else joseph)"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="process at most N planned series"),
    shard: str | None = typer.Option(None, "--shard", help="i/n: only the series hashing to shard i of n"),
    runner: str = typer.Option("threads", "--runner", help="threads | dask"),
    dask_address: str | None = typer.Option(
        None, "--dask-address", help="existing Dask scheduler (default: a LocalCluster)"
    ),
    verify: str = typer.Option("deep", "--verify", help="after the run: none | shallow | deep (checksums)"),
    prefect: bool | None = typer.Option(
        None,
        "--prefect/--no-prefect",
        help="force the Prefect flow (ephemeral server without PREFECT_API_URL) or the serverless path",
    ),
    validate: bool = typer.Option(
        True,
        "--validate/--no-validate",
        help="cohort 'example': FDK reconstruction of the ring and PSNR/SSIM after the run",
    ),
    qc: str = typer.Option("flag", "--qc", help="quality checks: flag | reject:CHECK,... (docs/ingest.md)"),
    labels: str | None = typer.Option(None, "--labels", help="example | CSV of input,labels: labels per ring"),
    as_json: bool = typer.Option(False, "--json", help="print the RunSummary as JSON"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Prefect INFO logs"),
) -> None:
    """Ingest -> render -> commit every series of a cohort; reruns skip what is done."""
    check_cohort(cohort)  # before anything is created in the store
    quiet_prefect(verbose, server=prefect if prefect is not None else prefect_server_configured())
    if runner not in ("threads", "dask"):
        raise typer.BadParameter("--runner must be threads or dask")
    if verify not in ("none", "shallow", "deep"):
        raise typer.BadParameter("--verify must be none, shallow or deep")
    spec_ = load_spec(spec)  # a bad file: one line per problem, exit 2
    from xwin.flows.params import check_shard, qc_reject

    try:
        qc_reject(qc)
    except ValueError as e:
        fail(f"--qc: {e}")
    try:
        check_shard(shard)
    except ValueError as e:
        fail(f"--shard: {e}")
    if manifest is not None:
        check_manifest(manifest)
    if manifest_root is not None and not manifest_root.is_dir():
        fail(f"--manifest-root {manifest_root}: no such folder")
    check_sources(source or [])  # a source that does not exist: one line each, exit 2, nothing created
    remote = runner == "dask" and bool(dask_address or os.environ.get("XWIN_DASK_ADDRESS"))
    check_backend(backend, here=not remote)  # unknown, or cannot run on this machine (workers elsewhere: name only)
    check_store_target(store)  # an S3 store that cannot be reached, a local one that cannot be written: exit 2
    from xwin.flows import stop
    from xwin.flows.backfill import BackfillCancelled, BackfillIncomplete, backfill_cohort_on, run_dask, run_local
    from xwin.flows.params import BackfillParams
    from xwin.flows.progress import add_listener
    from xwin.flows.runtime import prefect_api_url

    params = BackfillParams(
        cohort=cohort,
        store=store,
        source=list(source) if source else None,
        manifest=str(manifest) if manifest else None,
        manifest_root=str(manifest_root) if manifest_root else None,
        spec=spec_,
        backend=backend,
        limit=limit,
        shard=shard,
        verify=verify,
        qc=qc,
        labels=labels,
    )
    try:
        params.sources()
        for src in params.sources():
            params.label_source(src)  # a labels CSV that does not read: one line now, not per series later
    except ValueError as e:
        fail(str(e))
    use_prefect = prefect if prefect is not None else prefect_api_url() is not None
    if use_prefect and configured_prefect_api() is not None:  # a configured server must answer before anything
        require_prefect_server("xwin backfill", hint=", or run without it: --no-prefect")
    if runner == "dask" and use_prefect and prefect_api_url() is None:
        raise typer.BadParameter(
            "--runner dask --prefect needs a Prefect API every Dask worker can reach (set PREFECT_API_URL); "
            "without one, drop --prefect: the Dask runner then runs without Prefect"
        )
    end: dict = {}
    remove_end = add_listener(lambda ev: end.update(ev) if ev.get("event") == "end" else None)
    t0 = time.perf_counter()
    code = 0
    try:
        with stop.handle_signals(), show_progress(terminal=sys.stderr.isatty() and not as_json) as say:
            if use_prefect:
                f = backfill_cohort_on(runner, dask_address)
                summary = f(**params.model_dump(exclude={"spec"}), spec=params.spec)
            elif runner == "dask":
                summary = run_dask(params, dask_address)
            else:
                summary = run_local(params)
    except BackfillCancelled as e:
        summary, code = e.summary, stop.exit_code()
    except BackfillIncomplete as e:
        summary, code = e.summary, 1
    finally:
        remove_end()
    wall = time.perf_counter() - t0
    validation = None
    if code == 0 and validate and cohort == "example" and summary.done + summary.skipped and not stop.requested():
        first = [e.volume_id for e in summary.done + summary.skipped][:1]
        say(f"validate: FDK reconstruction of {first[0][:12]} from its ring, PSNR/SSIM against the volume")
        validation = _maybe_validate(params, first, use_prefect, end.get("run_id"))
    if as_json:
        typer.echo(summary.model_dump_json(indent=1))
    else:
        c = summary.counts()
        mode = "prefect" if use_prefect else ("dask" if runner == "dask" else "local")
        stopped = f", cancelled {len(summary.cancelled)}" if summary.cancelled else ""
        typer.echo(
            f"backfill {cohort}: done {c['done']}, skipped {c['skipped']}, rejected {c['rejected']}, "
            f"failed {c['failed']}{stopped} of {summary.planned} planned in {wall:.1f} s ({mode} mode)"
        )
        echo_outcomes(summary)
        if end.get("verify"):
            typer.echo(f"  verify {end['verify']}")
        from xwin.flows.progress import capped

        for line in capped([f"  preview {v}: {u}" for v, u in sorted(end.get("previews", {}).items())], "previews"):
            typer.echo(line)
        if end.get("report"):
            typer.echo(f"  summary: {end['report']}")
        if validation:
            typer.echo(f"  validation: {validation}")
    if summary.cancelled:
        typer.echo(summary.cancel_line(), err=True)
    raise typer.Exit(code)


def echo_outcomes(summary, limit: int | None = None) -> None:
    """The lines under a run's counts: QC flags and rejections (counts, then each series), failures. Each list names
    at most ``limit`` series (default ``xwin.flows.progress.LIST_LIMIT``), then how many more there are (the JSON
    summary and the markdown report list all)."""
    from xwin.flows.progress import LIST_LIMIT, capped
    from xwin.flows.reports import counts_by_reason, qc_flag_counts, qc_flagged

    n_max = LIST_LIMIT if limit is None else limit

    def listed(lines: list[str], what: str) -> None:
        for line in capped(lines, what, n_max):
            typer.echo(line)

    flags = qc_flag_counts(summary)
    if flags:
        n = len(qc_flagged(summary))
        typer.echo(f"  QC flagged {n} of {len(summary.done)} done: " + ", ".join(f"{k} {v}" for k, v in flags.items()))
        listed(
            [f"  flagged {e.input} ({e.volume_id[:12]}): {', '.join(e.qc_flags)} (xwin card shows why)"
             for e in qc_flagged(summary)],
            "flagged",
        )  # fmt: skip
    if summary.rejected:
        typer.echo("  rejected by reason: " + ", ".join(f"{k} {v}" for k, v in counts_by_reason(summary).items()))
    listed([f"  rejected {r.input}: {r.reason.value}: {r.detail}" for r in summary.rejected], "rejected")
    listed(
        [f"  FAILED {f.input} ({f.stage}): {f.error} "
         f"({'a rerun retries it' if f.retryable else 'fix the cause, then rerun'})" for f in summary.failed],
        "failed",
    )  # fmt: skip


def _maybe_validate(params, volume_ids: list[str], use_prefect: bool, backfill_run: str | None = None) -> str | None:
    """FDK PSNR/SSIM of the stored ring vs its source volume (the validation flow in Prefect mode, linked to the
    backfill run ``backfill_run``)."""
    try:
        from xwin.flows.validate import validate_volumes
    except ImportError:  # pragma: no cover - xwin.pipeline.reconstruct absent
        return None
    res = validate_volumes(
        params.store, params.cohort, params.spec, volume_ids, prefect=use_prefect, backfill_run=backfill_run
    )
    return ", ".join(
        f"{r['volume_id'][:12]} PSNR {r['psnr']:.1f} dB SSIM {r['ssim']:.3f} ({r['backend']} FDK, {r['seconds']:.0f} s)"
        for r in res
    )


def scan_cmd(
    landing: str = typer.Option(..., "--landing", help="landing dir or s3://bucket/prefix"),
    cohort: str = typer.Option(..., "--cohort", help="cohort the new series join"),
    store: str = typer.Option(..., "--store", help="store URL: a local path or s3://bucket/prefix"),
    spec: Path | None = typer.Option(None, "--spec", help="RenderSpec JSON/YAML (default: X-WIN 512x512, 120 views)"),
    backend: str | None = typer.Option(None, "--backend", help="render backend (default: XWIN_RENDER_BACKEND or auto)"),
    as_json: bool = typer.Option(False, "--json", help="print the RunSummary as JSON"),
) -> None:
    """One landing scan now (what the cron deployment does), without a server. Exit status 1 exactly when a series
    failed (those entries stay out of the ledger: the next scan retries them)."""
    check_cohort(cohort)
    quiet_prefect(False, server=False)  # the scan runs here, without a Prefect server
    spec_ = load_spec(spec)
    if "://" not in landing and not Path(landing).expanduser().is_dir():
        fail(f"--landing {landing}: no such folder")
    check_backend(backend)
    check_store_target(store)
    from xwin.flows import stop
    from xwin.flows.landing import ScanIncomplete, scan_once

    code = 0
    try:
        with stop.handle_signals():  # Ctrl-C / SIGTERM: the entries not finished stay out of the ledger
            summary, new = scan_once(landing, cohort, store, spec_, backend)
    except ScanIncomplete as e:
        summary, new, code = e.summary, e.entries, stop.exit_code() if e.summary.cancelled else 1
    if as_json:
        typer.echo(summary.model_dump_json(indent=1))
    else:
        typer.echo(f"{len(new)} new entries: {json.dumps(summary.counts())}")
        echo_outcomes(summary)
    if summary.cancelled:
        typer.echo(summary.cancel_line(), err=True)
    raise typer.Exit(code)
