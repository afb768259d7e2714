"""The ``xwin`` command line: one module per group of commands, each a thin wrapper over the package's functions.

ingest                      canonical volumes from NIfTI / DICOM / NBIA manifests       cli/ingest.py
render                      rings of stored volumes                                     cli/render.py
status verify inspect describe export                  read the store                   cli/store.py
backfill scan               the backfill flow (serverless, Prefect, Dask)               cli/backfill.py
deploy                      Prefect work pools, limits, deployments                     cli/deploy.py
validate reconstruct        FDK from stored rings, PSNR/SSIM                            cli/validate.py
train probe prepare-cxr     the X-WIN model                                             cli/train.py
bench consumer              benchmarks                                                  cli/bench.py
"""

from __future__ import annotations

import typer

from xwin.flows.cli import backfill, bench, deploy, ingest, render, store, train, validate

app = typer.Typer(add_completion=False, no_args_is_help=True, help="xwin: CT -> DRR ring datasets -> X-WIN training")


@app.callback()
def _main() -> None:
    """xwin command line."""


app.command("ingest")(ingest.ingest_cmd)
app.command("render")(render.render_cmd)
app.command("status")(store.status_cmd)
app.command("verify")(store.verify_cmd)
app.command("inspect")(store.inspect_cmd)
app.command("describe")(store.describe_cmd)
app.command("export")(store.export_cmd)
app.command("backfill")(backfill.backfill_cmd)
app.command("scan")(backfill.scan_cmd)
app.command("deploy")(deploy.deploy_cmd)
app.command("validate")(validate.validate_cmd)
app.command("reconstruct")(validate.reconstruct_cmd)
app.command("train")(train.train)
app.command("probe")(train.probe)
app.command("prepare-cxr")(train.prepare_cxr)
app.add_typer(bench.bench_app, name="bench")

__all__ = ["app"]
