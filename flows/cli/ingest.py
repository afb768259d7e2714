"""``xwin ingest``: CT sources (NIfTI, DICOM folders, NBIA metadata.csv) -> canonical volumes in a store.

The logic lives in ``xwin.pipeline.ingest`` (ingest_sources) and ``xwin.storage``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import typer

from xwin.flows import stop
from xwin.flows.cli.common import check_cohort, check_manifest, check_sources, check_store_target
from xwin.schemas.ingest import RunSummary


def _parse_spacing(s: str | None) -> tuple[float, float, float] | None:
    if not s:
        return None
    parts = [float(x) for x in s.replace("x", ",").split(",") if x.strip()]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) <= 0:
        raise typer.BadParameter("--spacing takes one or three positive numbers (mm), e.g. 1 or 0.7,0.7,1.25")
    return (parts[0], parts[1], parts[2])


def ingest_cmd(
    sources: list[str] | None = typer.Argument(
        None, help="NIfTI files, DICOM folders, NBIA metadata.csv files, or 'example' (the bundled chest CT)"
    ),
    store: str = typer.Option(..., "--store", help="store URL: local path or s3://bucket/prefix"),
    cohort: str = typer.Option("default", "--cohort", help="cohort name recorded with every volume"),
    manifest: list[Path] | None = typer.Option(None, "--manifest", help="NBIA metadata.csv (repeatable)"),
    json_out: bool = typer.Option(False, "--json", help="print exactly one JSON object (RunSummary) on stdout"),
    spacing: str | None = typer.Option(None, "--spacing", help="resample to this spacing in mm: 'S' or 'X,Y,Z'"),
    tilt: str = typer.Option("resample", "--tilt", help="gantry-tilted series: 'resample' or 'reject'"),
    qc: str = typer.Option("flag", "--qc", help="quality checks: flag | reject:CHECK,... (docs/ingest.md)"),
) -> None:
    """Validate CT inputs and store them as canonical int16 HU volumes (RAS). Every input ends done, skipped
    (already stored), rejected with a reason code, or failed (an I/O error, timeout or full disk that outlived its
    retries: a rerun retries it); the exit status is non-zero exactly when an input failed or the run itself
    could not run."""
    from xwin.pipeline.ingest import IngestConfig, ingest_sources

    srcs = list(sources or [])
    mans = [str(m) for m in (manifest or [])]
    if not srcs and not mans:
        raise typer.BadParameter("give at least one SOURCE or --manifest")
    if tilt not in ("resample", "reject"):
        raise typer.BadParameter("--tilt must be 'resample' or 'reject'")
    from xwin.flows.params import qc_reject

    try:
        reject = qc_reject(qc)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    cfg = IngestConfig(
        spacing_mm=_parse_spacing(spacing),
        tilt=tilt,  # type: ignore[arg-type]
        qc_reject=reject,
        deid_salt=os.environ.get("XWIN_DEID_SALT") or None,  # a secret: from the environment only
    )
    check_cohort(cohort)  # before anything is created in the store
    for m in mans:
        check_manifest(m)  # a missing file or one without the NBIA header: one line, exit 2
    check_sources(srcs, option="source")  # a source that does not exist: one line each, exit 2
    check_store_target(store)  # an S3 store that cannot be reached, a local one that cannot be written: exit 2
    try:
        from xwin.storage import ClaimHeld, is_transient, open_store

        st = open_store(store)
        with stop.handle_signals():  # Ctrl-C / SIGTERM: the volume being written finishes, no other one starts
            summary = ingest_sources(
                srcs,
                cohort,
                st,
                cfg,
                manifests=mans,
                transient=is_transient,
                held=lambda e: isinstance(e, ClaimHeld),  # another `xwin ingest` writes it now: skipped, not an error
                should_stop=stop.requested,
            )
    except Exception as e:  # noqa: BLE001 - the run itself could not complete (store unreachable, bad cohort, ...)
        print(f"xwin ingest: run failed: {type(e).__name__}: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if json_out:
        sys.stdout.write(summary.model_dump_json() + "\n")
    else:
        _print_human(summary)
    if summary.cancelled:
        typer.echo(summary.cancel_line(), err=True)
        raise typer.Exit(stop.exit_code())
    if summary.failed:  # non-zero exactly when an input failed (rejections are answers, not failures)
        raise typer.Exit(1)


def _print_human(summary: RunSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    c = summary.counts()
    con.print(
        f"[bold]ingest[/bold]: {c['done']} done, {c['skipped']} skipped, {c['rejected']} rejected, "
        f"{c['failed']} failed"
        + (f", {len(summary.cancelled)} cancelled" if summary.cancelled else "")
        + f" of {summary.planned} planned"
    )
    from xwin.flows.progress import LIST_LIMIT

    def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], what: str) -> None:
        """At most LIST_LIMIT rows, then how many more there are (--json lists every one)."""
        t = Table(*header)
        for row in rows[:LIST_LIMIT]:
            t.add_row(*row)
        con.print(t)
        if len(rows) > LIST_LIMIT:
            con.print(f"  ... and {len(rows) - LIST_LIMIT} more {what} (--json lists every one)")

    if summary.done or summary.skipped:
        table(
            ("status", "input", "volume_id"),
            [("[green]done[/green]", e.input, e.volume_id) for e in summary.done]
            + [("[cyan]skipped[/cyan]", e.input, e.volume_id) for e in summary.skipped],
            "done or skipped",
        )
    if summary.rejected:
        table(
            ("rejected", "reason", "detail"),
            [(r.input, f"[red]{r.reason.value}[/red]", r.detail[:200]) for r in summary.rejected],
            "rejected",
        )
    if summary.failed:
        table(
            ("failed", "stage", "error", "a rerun"),
            [(f.input, f.stage, f"[red]{f.error[:200]}[/red]", "retries it" if f.retryable else "fix the cause")
             for f in summary.failed],
            "failed",
        )  # fmt: skip
