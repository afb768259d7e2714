"""What every ``xwin`` command shares: option types, the one RenderSpec file loader, quiet Prefect defaults and
the exit for bad input."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from xwin.schemas.render import RenderSpec

T = TypeVar("T")

StoreOpt = Annotated[str, typer.Option("--store", help="store URL: local path, file:// or s3://bucket/prefix")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
SpecOpt = Annotated[
    Path | None, typer.Option("--spec", help="RenderSpec as a JSON or YAML file (default: X-WIN defaults)")
]
CohortOpt = Annotated[str | None, typer.Option("--cohort", help="dataset cohort (default: the volume's cohort)")]


def load_spec(path: Path | str | None) -> RenderSpec:
    """A RenderSpec from a .json/.yaml/.yml file, or the defaults when ``path`` is None."""
    if path is None:
        return RenderSpec()
    p = Path(path)
    if not p.is_file():
        raise typer.BadParameter(f"spec file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return RenderSpec.model_validate(data)


def quiet_prefect(verbose: bool) -> None:
    """Prefect reads its settings at import: set quiet defaults before the first import (the user's env wins)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # ephemeral server: no telemetry calls
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


def or_exit(
    fn: Callable[..., T],
    *args: object,
    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
    **kw: object,
) -> T:
    """``fn(*args, **kw)``; a bad input (one of ``errors``) ends the command with its message and exit status 2."""
    try:
        return fn(*args, **kw)
    except errors as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
