"""``xwin reconstruct``: FDK of one stored ring, scored against the stored volume (glue: storage -> pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def find_dataset(store, volume_id: str, cohort: str | None = None, spec_hash: str | None = None):
    """The dataset holding a committed ring of ``volume_id`` (cohort default: the volume's own cohort)."""
    if cohort is None:
        cohort = store.volume_record(volume_id).cohort
    infos = [d for d in store.datasets() if d.cohort == cohort and (spec_hash is None or d.spec_hash == spec_hash)]
    found = []
    for d in infos:
        ds = store.open_dataset(d.cohort, d.spec_hash)
        if ds.has_ring(volume_id):
            found.append(ds)
    if not found:
        raise LookupError(f"no stored ring of volume {volume_id!r} in cohort {cohort!r} at {store.url}")
    if len(found) > 1:
        raise LookupError(
            f"volume {volume_id!r} has rings in several datasets {[d.spec_hash for d in found]}: pass --spec-hash"
        )
    return found[0]


def reconstruct_cmd(
    store: str = typer.Option(..., "--store", help="store URL (local path or s3://bucket/prefix)"),
    volume: str = typer.Option(..., "--volume", help="volume id"),
    cohort: str | None = typer.Option(None, "--cohort", help="cohort (default: the volume's cohort)"),
    spec_hash: str | None = typer.Option(None, "--spec-hash", help="dataset spec hash when several exist"),
    backend: str = typer.Option("auto", "--backend", help="auto | numba | rtk | astra"),
    report: Path | None = typer.Option(None, "--report", help="write metrics.json + slices.png here"),
    as_json: bool = typer.Option(False, "--json", help="print the full metrics as JSON"),
) -> None:
    """Reconstruct a stored ring with FDK and print PSNR/SSIM against the stored CT."""
    from xwin.pipeline.reconstruct import validate_stored_ring
    from xwin.storage import open_store

    try:
        st = open_store(store, create=False)
        ds = find_dataset(st, volume, cohort, spec_hash)
        res = validate_stored_ring(st, ds, volume, backend=backend)
    except (LookupError, FileNotFoundError, ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    m = res.metrics
    if report is not None:
        from xwin.pipeline.reconstruct.report import write_report

        m["report"] = write_report(report, m, res.reference, res.reconstruction, res.mask, tuple(res.grid.spacing))
    short = {k: m[k] for k in ("psnr_db", "ssim", "backend", "seconds")}
    typer.echo(json.dumps(m if as_json else short, default=float, indent=None if not as_json else 1))
