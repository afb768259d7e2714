"""The ``xwin`` command line. Each command is a thin wrapper over pipeline/storage/flows functions."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="xwin: CT -> DRR ring datasets -> X-WIN training")


@app.callback()
def _main() -> None:
    """xwin command line."""


if __name__ == "__main__":  # pragma: no cover
    app()
