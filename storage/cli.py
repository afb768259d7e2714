"""Bodies of ``xwin status`` and ``xwin verify`` (registered in flows/cli.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

StoreOpt = Annotated[str, typer.Option("--store", help="store URL: local path, file:// or s3://bucket/prefix")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def status_cmd(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Counts per status and per cohort: canonical volumes and rings of every dataset (from the catalogs)."""
    from xwin.storage import open_store

    st = open_store(store, create=False).status()
    if as_json:
        typer.echo(st.model_dump_json(indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"xwin store {st.url}")
    for col in ("scope", "cohort", "spec_hash", "committed", "in_progress", "stale_claim"):
        t.add_column(col)
    v = st.volumes
    for cohort, n in sorted(v.per_cohort.items()) or [("-", 0)]:
        t.add_row("volumes", cohort, "-", str(n), "", "")
    t.add_row(
        "volumes (all)", "*", "-", *(str(v.counts.get(k, 0)) for k in ("committed", "in_progress", "stale_claim"))
    )
    for d in st.datasets:
        t.add_row(
            "rings",
            d.cohort or "",
            d.spec_hash or "",
            *(str(d.counts.get(k, 0)) for k in ("committed", "in_progress", "stale_claim")),
        )
    Console().print(t)


def verify_cmd(
    store: StoreOpt,
    as_json: JsonOpt = False,
    shallow: Annotated[bool, typer.Option("--shallow", help="check presence only, skip checksums")] = False,
) -> None:
    """Recompute checksums of every committed volume and ring; exit 1 if anything is corrupt or missing."""
    from xwin.storage import open_store

    rep = open_store(store, create=False).verify(deep=not shallow)
    if as_json:
        typer.echo(json.dumps(rep.model_dump(mode="json"), indent=1))
    else:
        typer.echo(f"{rep.volumes} entries: {rep.ok} ok, {len(rep.corrupt)} corrupt, {len(rep.missing)} missing")
        for kind, issues in (("CORRUPT", rep.corrupt), ("MISSING", rep.missing), ("UNCATALOGED", rep.uncataloged)):
            for i in issues:
                typer.echo(f"  {kind} {i.scope}/{i.volume_id}: {i.reason}")
    if not rep.clean:
        raise typer.Exit(code=1)
