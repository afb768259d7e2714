"""``xwin validate`` (a cohort's stored rings) and ``xwin reconstruct`` (one ring): FDK from the stored views,
PSNR/SSIM against the stored volume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from xwin.flows.cli.common import (
    check_output,
    configured_prefect_api,
    dataset_options,
    fail,
    load_spec,
    open_store_cli,
    or_exit,
    prefect_server_configured,
    quiet_prefect,
    require_prefect_server,
    resolve_dataset,
    resolve_volumes,
)

if TYPE_CHECKING:
    from xwin.pipeline.reconstruct import ValidationResult


def validate_cmd(
    store: str = typer.Option(..., "--store", help="store URL, or the dataset: <store url>#<cohort>[/<spec hash>]"),
    cohort: str | None = typer.Option(None, "--cohort", help="cohort of the dataset (default: the store's only one)"),
    spec: Path | None = typer.Option(None, "--spec", help="RenderSpec file of the dataset (instead of --spec-hash)"),
    spec_hash: str | None = typer.Option(
        None, "--spec-hash", help="spec hash (or a unique prefix) when the cohort has several"
    ),
    volume: list[str] | None = typer.Option(
        None, "--volume", help="volume id or unique prefix (repeatable; default: every ring)"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many rings"),
    prefect: bool | None = typer.Option(
        None, "--prefect/--no-prefect", help="run as a Prefect flow (default: when PREFECT_API_URL is set)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Prefect INFO logs"),
) -> None:
    """FDK-reconstruct stored rings of a cohort and score PSNR/SSIM against their source volumes."""
    quiet_prefect(verbose, server=prefect if prefect is not None else prefect_server_configured())
    if spec is not None:
        if spec_hash is not None:
            fail("give --spec or --spec-hash, not both")
        spec_hash = load_spec(spec).spec_hash
    _, ds, _ = resolve_dataset(store, cohort, spec_hash)  # exists, can be reached, names one dataset
    store, cohort, sh = dataset_options(store)[0], ds.cohort, ds.spec_hash
    volume = resolve_volumes(ds, volume, "--volume") if volume else None
    from xwin.flows.runtime import LocalStages, prefect_api_url
    from xwin.flows.validate import run_validation, validate_cohort

    use_prefect = prefect if prefect is not None else prefect_api_url() is not None
    if use_prefect and configured_prefect_api() is not None:
        require_prefect_server("xwin validate", hint=", or run without it: --no-prefect")
    if use_prefect:
        res = validate_cohort(store=store, cohort=cohort, spec_hash=sh, volume_ids=volume, limit=limit)
    else:
        with LocalStages(max_workers=1) as stages:
            res = run_validation(store, cohort, sh, volume, stages, limit)
    if as_json:
        typer.echo(json.dumps(res, indent=1, default=str))
    else:
        for r in res:
            typer.echo(
                f"{r['volume_id']}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f} ({r['backend']}, "
                f"{r['seconds']:.1f} s)"
            )


def reconstruct_cmd(
    store: str = typer.Option(..., "--store", help="store URL, or the dataset: <store url>#<cohort>[/<spec hash>]"),
    volume: str = typer.Option(..., "--volume", help="volume id (a unique prefix is enough)"),
    cohort: str | None = typer.Option(None, "--cohort", help="cohort (default: the one holding its ring)"),
    spec_hash: str | None = typer.Option(None, "--spec-hash", help="dataset spec hash when several exist"),
    backend: str = typer.Option("auto", "--backend", help="auto | numba | rtk | astra"),
    report: Path | None = typer.Option(None, "--report", help="write metrics.json + slices.png here"),
    as_json: bool = typer.Option(False, "--json", help="print the full metrics as JSON"),
) -> None:
    """Reconstruct a stored ring with FDK and print PSNR/SSIM against the stored CT."""
    quiet_prefect(False, server=False)  # runs here; the module imports Prefect for its flow
    from xwin.flows.validate import validate_stored_ring

    store, cohort, spec_hash = dataset_options(store, cohort, spec_hash)
    if report is not None:
        check_output(report, folder=True, option="--report")  # before minutes of reconstruction, not after
    st = open_store_cli(store)

    def run() -> ValidationResult:
        ds, vid = st.find_ring(volume, cohort, spec_hash)  # the one committed ring of this id or unique prefix
        return validate_stored_ring(st, ds, vid, backend=backend)

    res = or_exit(run, errors=(LookupError, FileNotFoundError, ValueError, RuntimeError))
    m = res.metrics
    if report is not None:
        from xwin.pipeline.reconstruct.report import write_report

        m["report"] = write_report(report, m, res.reference, res.reconstruction, res.mask, tuple(res.grid.spacing))
    short = {k: m[k] for k in ("psnr_db", "ssim", "backend", "seconds")}
    typer.echo(json.dumps(m if as_json else short, default=float, indent=None if not as_json else 1))
