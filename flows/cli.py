"""The ``xwin`` command line. Each command is a thin wrapper over pipeline/storage/flows functions."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="xwin: CT -> DRR ring datasets -> X-WIN training")


@app.callback()
def _main() -> None:
    """xwin command line."""


# ---- ingest (helper "ingest"): body in flows/ingest_cli.py ----
from xwin.flows.ingest_cli import ingest_cmd as _ingest_cmd  # noqa: E402

app.command("ingest")(_ingest_cmd)

# ---- storage (helper "storage"): bodies in storage/cli.py ----
from xwin.storage.cli import status_cmd as _status_cmd  # noqa: E402
from xwin.storage.cli import verify_cmd as _verify_cmd

app.command("status")(_status_cmd)
app.command("verify")(_verify_cmd)

# ---- orchestration (helper "flows"): bodies in flows/commands.py ----
from xwin.flows import commands as _flows_cmds  # noqa: E402

app.command("backfill")(_flows_cmds.backfill_cmd)
app.command("inspect")(_flows_cmds.inspect_cmd)
app.command("deploy")(_flows_cmds.deploy_cmd)
app.command("scan")(_flows_cmds.scan_cmd)
app.command("validate")(_flows_cmds.validate_cmd)

# ---- benchmarks: `xwin bench <name>`; add subcommands in flows/bench_cli.py (consumer: helper "consumer") ----
from xwin.flows.bench_cli import bench_app as _bench_app  # noqa: E402

app.add_typer(_bench_app, name="bench")

# ---- training (helper "model"): bodies in training/cli.py ----
from xwin.training import cli as _train_cli  # noqa: E402

app.command("train")(_train_cli.train)
app.command("probe")(_train_cli.probe)
app.command("prepare-cxr")(_train_cli.prepare_cxr)

# ---- reconstruction (helper "recon"): body in flows/reconstruct_cli.py ----
from xwin.flows.reconstruct_cli import reconstruct_cmd as _reconstruct_cmd  # noqa: E402

app.command("reconstruct")(_reconstruct_cmd)

# ---- rendering (helper "render"): bodies in pipeline/render/cli.py ----
from xwin.pipeline.render import cli as _render_cli  # noqa: E402

app.command("render")(_render_cli.render_cmd)
app.command("describe")(_render_cli.describe_cmd)
app.command("export")(_render_cli.export_cmd)


if __name__ == "__main__":  # pragma: no cover
    app()
