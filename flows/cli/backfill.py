"""``xwin backfill`` and ``xwin scan``: the backfill flow from the command line.

``xwin backfill`` runs the Prefect flow ``backfill-cohort`` when a Prefect API is configured (PREFECT_API_URL or
the active profile), when ``--prefect`` is given (no API: Prefect's ephemeral server, started for the run) or
with ``--runner dask``. Otherwise it runs the same flow body without a server (``xwin.flows.backfill.run_local``:
the same task functions, retries and slot sizes on a thread pool). docs/orchestration.md says which mode needs what.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from xwin.flows.cli.common import load_spec, quiet_prefect

if TYPE_CHECKING:
    from rich.progress import TaskID


class _Bar:
    """rich progress bar fed by the events of ``xwin.flows.progress`` (terminal only)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tally]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.tally = {"done": 0, "skipped": 0, "rejected": 0}

    def __enter__(self) -> _Bar:
        self.p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.p.stop()

    def __call__(self, ev: dict) -> None:
        e = ev.get("event")
        if e == "start":
            self.tally["skipped"] = ev["skipped"]
            self.task = self.p.add_task(f"backfill {ev['cohort']}", total=ev["total"], tally=self._t())
        elif e == "series" and self.task is not None:
            if ev["status"] in self.tally:
                self.tally[ev["status"]] += 1
            self.p.update(self.task, advance=1, tally=self._t())
        elif e == "stage" and self.task is not None:
            self.p.update(self.task, description=ev["name"])

    def _t(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.tally.items())


def backfill_cmd(
    cohort: str = typer.Option(..., "--cohort", help="cohort name ('example': the bundled chest CT by default)"),
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
        None, "--backend", help="render backend (default: XWIN_RENDER_BACKEND or auto = gpu if CUDA else joseph)"
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
        help="example cohort: FDK PSNR/SSIM check after the backfill (when xwin.pipeline.reconstruct provides it)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the RunSummary as JSON"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Prefect INFO logs"),
) -> None:
    """Ingest -> render -> commit every series of a cohort; reruns skip what is done."""
    quiet_prefect(verbose)
    if runner not in ("threads", "dask"):
        raise typer.BadParameter("--runner must be threads or dask")
    if verify not in ("none", "shallow", "deep"):
        raise typer.BadParameter("--verify must be none, shallow or deep")
    from xwin.flows.backfill import BackfillIncomplete, backfill_cohort_on, run_local
    from xwin.flows.params import BackfillParams
    from xwin.flows.progress import add_listener
    from xwin.flows.runtime import prefect_api_url

    params = BackfillParams(
        cohort=cohort,
        store=store,
        source=list(source) if source else None,
        manifest=str(manifest) if manifest else None,
        manifest_root=str(manifest_root) if manifest_root else None,
        spec=load_spec(spec),
        backend=backend,
        limit=limit,
        shard=shard,
        verify=verify,
    )
    try:
        params.sources()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    use_prefect = prefect if prefect is not None else (runner == "dask" or prefect_api_url() is not None)
    if runner == "dask" and not use_prefect:
        raise typer.BadParameter("--runner dask runs the Prefect flow (drop --no-prefect)")
    end: dict = {}
    remove_end = add_listener(lambda ev: end.update(ev) if ev.get("event") == "end" else None)
    bar = _Bar() if (sys.stderr.isatty() and not as_json) else None
    remove_bar = add_listener(bar) if bar else (lambda: None)
    t0 = time.perf_counter()
    code = 0
    try:
        with bar if bar else _Null():
            if use_prefect:
                f = backfill_cohort_on(runner, dask_address)
                summary = f(**params.model_dump(exclude={"spec"}), spec=params.spec)
            else:
                summary = run_local(params)
    except BackfillIncomplete as e:
        summary, code = e.summary, 1
    finally:
        remove_end()
        remove_bar()
    wall = time.perf_counter() - t0
    validation = None
    if code == 0 and validate and cohort == "example" and summary.done + summary.skipped:
        validation = _maybe_validate(params, [e.volume_id for e in summary.done + summary.skipped][:1], use_prefect)
    if as_json:
        typer.echo(summary.model_dump_json(indent=1))
    else:
        c = summary.counts()
        typer.echo(
            f"backfill {cohort}: done {c['done']}, skipped {c['skipped']}, rejected {c['rejected']} "
            f"in {wall:.1f} s ({'prefect' if use_prefect else 'local'} mode)"
        )
        for r in summary.rejected:
            typer.echo(f"  rejected {r.input}: {r.reason.value}: {r.detail}")
        for i, err in end.get("failed", []):
            typer.echo(f"  FAILED {i}: {err}")
        if end.get("verify"):
            typer.echo(f"  verify {end['verify']}")
        for vid, url in sorted(end.get("previews", {}).items()):
            typer.echo(f"  preview {vid}: {url}")
        if end.get("report"):
            typer.echo(f"  summary: {end['report']}")
        if validation:
            typer.echo(f"  validation: {validation}")
    raise typer.Exit(code)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _maybe_validate(params, volume_ids: list[str], use_prefect: bool) -> str | None:
    """FDK PSNR/SSIM of the stored ring vs its source volume (the validation flow in Prefect mode)."""
    try:
        from xwin.flows.validate import validate_volumes
    except ImportError:  # pragma: no cover - xwin.pipeline.reconstruct absent
        return None
    res = validate_volumes(params.store, params.cohort, params.spec, volume_ids, prefect=use_prefect)
    return ", ".join(
        f"{r['volume_id'][:12]} PSNR {r['psnr']:.1f} dB SSIM {r['ssim']:.3f} ({r['backend']} FDK, {r['seconds']:.0f} s)"
        for r in res
    )


def scan_cmd(
    landing: str = typer.Option(..., "--landing", help="landing dir or s3://bucket/prefix"),
    cohort: str = typer.Option(..., "--cohort"),
    store: str = typer.Option(..., "--store"),
    spec: Path | None = typer.Option(None, "--spec"),
    backend: str | None = typer.Option(None, "--backend"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One landing scan now (what the cron deployment does), without a server."""
    from xwin.flows.landing import scan_once

    summary, new = scan_once(landing, cohort, store, load_spec(spec), backend)
    if as_json:
        typer.echo(summary.model_dump_json(indent=1))
    else:
        typer.echo(f"{len(new)} new entries: {json.dumps(summary.counts())}")
