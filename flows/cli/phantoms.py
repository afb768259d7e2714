"""``xwin phantoms``: a phantom cohort (variations of the bundled chest CT, lung nodules of known size and place)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xwin.flows.cli.common import fail, or_exit


def phantoms_cmd(
    out: Path = typer.Option(..., "--out", help="folder for ct/, labels/, truth.csv, labels.csv, cohort.json"),
    n: int = typer.Option(48, "--n", min=1, help="number of subjects"),
    seed: int = typer.Option(0, "--seed", help="the cohort is a pure function of the seed and the settings"),
    downsample: str = typer.Option(
        "2,2,1", "--downsample", help="block-average factors X,Y,Z of the bundled 0.7x0.7x2.5 mm grid"
    ),
    nodule_fraction: float = typer.Option(0.5, "--nodule-fraction", min=0.0, max=1.0, help="share with a nodule"),
    as_json: bool = typer.Option(False, "--json", help="print the truth table as JSON"),
) -> None:
    """Write N phantom subjects (NIfTI CT + labelmap + a truth table): one anatomy varied, not a population."""
    from xwin.pipeline.phantoms import PhantomConfig, write_cohort

    try:
        f = tuple(int(v) for v in downsample.split(","))
    except ValueError:
        fail(f"--downsample {downsample!r}: not three comma-separated integers")
    if len(f) != 3 or min(f) < 1:
        fail(f"--downsample {downsample!r}: need three factors >= 1 (X,Y,Z)")
    if (out / "truth.csv").exists():
        fail(f"--out {out}: already holds a phantom cohort (truth.csv); choose another folder")
    cfg = or_exit(PhantomConfig, n=n, seed=seed, downsample=f, nodule_fraction=nodule_fraction)
    log = None if as_json else typer.echo
    rows = or_exit(write_cohort, out, cfg, log=log, errors=(ValueError, FileExistsError))
    if as_json:
        typer.echo(json.dumps({"out": str(out), "subjects": rows}))
        return
    k = sum(int(r["nodule"]) for r in rows)
    typer.echo(f"{len(rows)} phantom subjects ({k} with a nodule) in {out}: truth.csv, labels.csv, cohort.json")
