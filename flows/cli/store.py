"""Commands that read the store: ``status``, ``verify``, ``inspect`` (contact sheet), ``describe`` (geometry as
JSON) and ``export`` (views or the volume as .npy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from xwin.flows.cli.common import (
    CohortOpt,
    JsonOpt,
    SpecHashOpt,
    StoreOpt,
    fail,
    load_spec,
    open_store_cli,
)


def status_cmd(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Counts per status and per cohort: canonical volumes and rings of every dataset (from the catalogs)."""
    st = open_store_cli(store).status()
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
    remove_orphans: Annotated[
        bool, typer.Option("--remove-orphans", help="delete attempt folders no commit names")
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="first repair: catalog = commit records, orphan attempts and stale claims removed (safe while "
            "writers run)",
        ),
    ] = False,
) -> None:
    """Recompute checksums of every committed volume and ring and compare each catalog with its commit records;
    exit 1 if anything is corrupt or missing, a commit is missing from its catalog (UNCATALOGED) or a catalog row
    has no commit. Leftover attempt folders of writers that were killed or fenced off are listed (ORPHAN), and
    deleted with --remove-orphans; they are garbage, not damage, and do not change the exit status. --repair first
    repairs what can be repaired without the data (REPAIRED lines), then checks."""
    rep = open_store_cli(store).verify(deep=not shallow, remove_orphans=remove_orphans, repair=repair)
    if as_json:
        typer.echo(json.dumps(rep.model_dump(mode="json"), indent=1))
    else:
        typer.echo(
            f"{rep.volumes} entries: {rep.ok} ok, {len(rep.corrupt)} corrupt, {len(rep.missing)} missing, "
            f"{len(rep.uncataloged)} uncatalogued"
        )
        groups = (
            ("REPAIRED", rep.repaired),
            ("CORRUPT", rep.corrupt),
            ("MISSING", rep.missing),
            ("UNCATALOGED", rep.uncataloged),
            ("ORPHAN", rep.orphans),
        )
        for kind, issues in groups:
            for i in issues:
                typer.echo(f"  {kind} {i.scope}/{i.volume_id}: {i.reason}")
    if not rep.clean:
        raise typer.Exit(code=1)


def inspect_cmd(
    store: str = typer.Option(..., "--store", help="store URL"),
    volume: str = typer.Option(..., "--volume", help="volume id (a unique prefix is enough)"),
    out: Path = typer.Option(..., "--out", help="PNG to write"),
    cohort: str | None = typer.Option(None, "--cohort", help="dataset cohort (when several hold the volume)"),
    spec_hash: str | None = typer.Option(None, "--spec-hash", help="dataset spec hash (idem)"),
    thumb: int = typer.Option(96, "--thumb", help="thumbnail size (px)"),
    big: int = typer.Option(512, "--big", help="frontal/lateral size (px)"),
) -> None:
    """Contact sheet of one stored ring: frontal and lateral views large, every view as a thumbnail."""
    from xwin.flows.reports import contact_sheet

    try:
        ds, vid = open_store_cli(store).find_ring(volume, cohort, spec_hash)
    except LookupError as e:
        fail(str(e))
    views = ds.read_ring(vid)
    yaws = [float(y) for y in ds.read_geometry(vid).yaw_deg]
    s = ds.spec
    title = (
        f"{ds.cohort} / {vid}  spec {ds.spec_hash}: {s.n_views} views x {s.yaw_step_deg:g} deg, "
        f"{s.height}x{s.width} @ {s.pixel_mm:g} mm"
    )
    im = contact_sheet(views, yaws, title=title, big=big, thumb=thumb)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    typer.echo(f"{out}: {im.width}x{im.height}, {len(yaws)} views of {vid}")


def describe_cmd(
    store: StoreOpt,
    volume: Annotated[str, typer.Option("--volume", help="volume id (a unique prefix is enough)")],
    cohort: CohortOpt = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="RenderSpec file (default: the store's dataset of the volume)")
    ] = None,
    spec_hash: SpecHashOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (the only format)")] = True,
) -> None:
    """Print a volume's geometry (affine, shape, frame, units) and its views' yaw and cone_vec as JSON.

    Without --spec: the dataset of the store that holds the volume's ring (else the one dataset of its cohort)."""
    from xwin.flows.describe import describe_volume

    rs = load_spec(spec) if spec is not None else None
    st = open_store_cli(store)
    try:
        d = describe_volume(st, volume, rs, cohort, spec_hash)
    except LookupError as e:
        fail(str(e))
    typer.echo(json.dumps(d, indent=1 if as_json else None))


def export_cmd(
    store: StoreOpt,
    volume: Annotated[str, typer.Option("--volume", help="volume id")],
    what: Annotated[str, typer.Option("--what", help="views (V,H,W) | labels (C,V,H,W) mm | volume (HU)")],
    out: Annotated[Path, typer.Option("--out", help="output .npy file")],
    cohort: CohortOpt = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="RenderSpec file (default: the store's dataset of the volume)")
    ] = None,
    spec_hash: SpecHashOpt = None,
) -> None:
    """Export a ring's views, its label thickness maps (channels as `describe` lists them) or the canonical HU
    volume as .npy (voxel order matches `describe`'s affine)."""
    if what not in ("views", "labels", "volume"):
        raise typer.BadParameter("--what must be 'views', 'labels' or 'volume'")
    rs = load_spec(spec) if spec is not None else None
    st = open_store_cli(store)
    try:
        if what == "volume":
            _, hu = st.read_volume(volume)
            arr = np.asarray(hu)
        else:
            if rs is None:
                ds, vid = st.find_ring(volume, cohort, spec_hash)
            else:
                ds, vid = st.dataset(cohort or st.volume_record(volume).cohort, rs, create=False), volume
            if what == "labels":
                if not ds.label_channels(vid):
                    fail(f"ring {vid} has no labels (backfill with --labels projects them)")
                arr = ds.read_labels(vid)
            else:
                arr = ds.read_ring(vid).astype(np.float32)
    except (LookupError, FileNotFoundError) as e:  # NotCommitted is a KeyError: no such volume or ring
        fail(str(e).strip("\"'") if isinstance(e, KeyError) else str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, arr)
    typer.echo(f"wrote {out} {arr.dtype} {arr.shape}")
