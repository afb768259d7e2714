"""The ``xwin`` command line: one module per group of commands, each a thin wrapper over the package's functions.

ingest                      canonical volumes from NIfTI / DICOM / NBIA manifests       cli/ingest.py
render                      rings of stored volumes                                     cli/render.py
status verify inspect describe export                  read the store                   cli/store.py
backfill scan               the backfill flow (serverless, Prefect, Dask)               cli/backfill.py
deploy                      Prefect work pools, limits, deployments                     cli/deploy.py
validate reconstruct        FDK from stored rings, PSNR/SSIM                            cli/validate.py
train probe prepare-cxr     the X-WIN model                                             cli/train.py
bench consumer              benchmarks                                                  cli/bench.py
splits assign|show, card    subject-level splits of a cohort, its dataset card          cli/splits.py
train-decoder, eval          the 3-D loop from predicted views, domain gap               cli/evaluate.py
phantoms                    a phantom cohort from the bundled CT (experiments, tests)   cli/phantoms.py
"""

from __future__ import annotations

import typer

from xwin.flows.cli import backfill, bench, deploy, ingest, render, splits, store, train, validate
from xwin.flows.cli.common import HELP_OPTIONS, XwinCommand, XwinGroup, cli_errors

# rich_markup_mode=None: plain help, one line per option at 80 columns (rich's table squeezes the help column);
# XwinGroup: short value types (TEXT, PATH, INT) in every command's help, subcommands included
app = typer.Typer(
    cls=XwinGroup,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP_OPTIONS,
    help="xwin: CT -> DRR ring datasets -> X-WIN training",
)


def _version(value: bool) -> None:
    if value:
        from xwin import __version__

        typer.echo(f"xwin {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", "-V", is_eager=True, callback=_version, help="print the version and exit"
    ),
) -> None:
    """xwin command line."""


app.command("ingest", cls=XwinCommand)(cli_errors(ingest.ingest_cmd))
app.command("render", cls=XwinCommand)(cli_errors(render.render_cmd))
app.command("status", cls=XwinCommand)(cli_errors(store.status_cmd))
app.command("verify", cls=XwinCommand)(cli_errors(store.verify_cmd))
app.command("inspect", cls=XwinCommand)(cli_errors(store.inspect_cmd))
app.command("describe", cls=XwinCommand)(cli_errors(store.describe_cmd))
app.command("export", cls=XwinCommand)(cli_errors(store.export_cmd))
app.command("backfill", cls=XwinCommand)(cli_errors(backfill.backfill_cmd))
app.command("scan", cls=XwinCommand)(cli_errors(backfill.scan_cmd))
app.command("deploy", cls=XwinCommand)(cli_errors(deploy.deploy_cmd))
app.command("validate", cls=XwinCommand)(cli_errors(validate.validate_cmd))
app.command("reconstruct", cls=XwinCommand)(cli_errors(validate.reconstruct_cmd))
app.command("train", cls=XwinCommand)(cli_errors(train.train))
app.command("probe", cls=XwinCommand)(cli_errors(train.probe))
app.command("prepare-cxr", cls=XwinCommand)(cli_errors(train.prepare_cxr))
app.add_typer(bench.bench_app, name="bench")
app.add_typer(splits.splits_app, name="splits")
app.command("card", cls=XwinCommand)(cli_errors(splits.card_cmd))

from xwin.flows.cli import evaluate  # noqa: E402 - its own import: the import line above is edited by other work

app.command("train-decoder", cls=XwinCommand)(cli_errors(evaluate.train_decoder_cmd))
app.add_typer(evaluate.eval_app, name="eval")

from xwin.flows.cli import phantoms  # noqa: E402

app.command("phantoms", cls=XwinCommand)(cli_errors(phantoms.phantoms_cmd))

__all__ = ["app"]
