"""Commands that read the store: ``status``, ``verify``, ``inspect`` (contact sheet), ``describe`` (geometry as
JSON) and ``export`` (views or the volume as .npy; geometry and datasets for other tools, cli/interop.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from xwin.flows.cli.common import (
    CohortOpt,
    DatasetStoreOpt,
    JsonOpt,
    SpecHashOpt,
    StoreOpt,
    check_output,
    dataset_options,
    fail,
    load_look,
    load_spec,
    open_store_cli,
)


def status_cmd(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Counts per status and per cohort: canonical volumes and rings of every dataset (from the catalogs)."""
    st = open_store_cli(store).status()
    if as_json:
        typer.echo(st.model_dump_json(indent=1))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # fits 80 columns whole: the spec hash and the counts never wrap or get cut; a long cohort name folds
    t = Table(title=f"xwin store {st.url}", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("scope", no_wrap=True)
    t.add_column("cohort", overflow="fold")
    t.add_column("spec hash", no_wrap=True, min_width=16)
    for col in ("committed", "in progress", "stale claims"):
        t.add_column(col, justify="right", no_wrap=True)
    v = st.volumes
    for cohort, n in sorted(v.per_cohort.items()) or [("-", 0)]:
        t.add_row("volumes", cohort, "-", str(n), "", "")
    t.add_row("volumes", "(all)", "-", *(str(v.counts.get(k, 0)) for k in ("committed", "in_progress", "stale_claim")))
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
    store: DatasetStoreOpt,
    volume: str = typer.Option(..., "--volume", help="volume id (a unique prefix is enough)"),
    out: Path = typer.Option(..., "--out", help="PNG to write"),
    cohort: str | None = typer.Option(None, "--cohort", help="dataset cohort (when several hold the volume)"),
    spec_hash: str | None = typer.Option(None, "--spec-hash", help="dataset spec hash (idem)"),
    thumb: int = typer.Option(96, "--thumb", help="thumbnail size (px)"),
    big: int = typer.Option(512, "--big", help="frontal/lateral size (px)"),
    look: Path | None = typer.Option(
        None, "--look", help="look file (YAML/JSON): show radiographs made from the ring's material bases"
    ),
) -> None:
    """Contact sheet of one stored ring: frontal and lateral views large, every view as a thumbnail. With --look,
    the radiographs that look makes from the ring's material bases (docs/appearance.md)."""
    from xwin.flows.reports import contact_sheet

    store, cohort, spec_hash = dataset_options(store, cohort, spec_hash)
    check_output(out, folder=False)
    try:
        ds, vid = open_store_cli(store).find_ring(volume, cohort, spec_hash)
    except LookupError as e:
        fail(str(e))
    lk = load_look(look) if look is not None else None
    views = ds.read_ring(vid) if lk is None else _radiographs(ds, vid, lk)
    yaws = [float(y) for y in ds.read_geometry(vid).yaw_deg]
    s = ds.spec
    title = (
        f"{ds.cohort} / {vid}  spec {ds.spec_hash}: {s.n_views} views x {s.yaw_step_deg:g} deg, "
        f"{s.height}x{s.width} @ {s.pixel_mm:g} mm"
    )
    if lk is not None:
        title += f"  look {lk.kvp:g} kVp {lk.output}"
    im = contact_sheet(views, yaws, title=title, big=big, thumb=thumb)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, format="PNG")  # whatever the name ends in: PIL would refuse a name without a known extension
    typer.echo(f"{out}: {im.width}x{im.height}, {len(yaws)} views of {vid}")


def describe_cmd(
    store: DatasetStoreOpt,
    volume: Annotated[str, typer.Option("--volume", help="volume id (a unique prefix is enough)")],
    cohort: CohortOpt = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="RenderSpec file (default: the store's dataset of the volume)")
    ] = None,
    spec_hash: SpecHashOpt = None,
    _json: Annotated[bool, typer.Option("--json", hidden=True)] = False,  # accepted: the output is always JSON
) -> None:
    """Print a volume's geometry (affine, shape, frame, units) and its views' yaw and cone_vec as JSON (always).

    Without --spec: the dataset of the store that holds the volume's ring (else the one dataset of its cohort)."""
    from xwin.flows.describe import describe_volume

    store, cohort, spec_hash = dataset_options(store, cohort, spec_hash)
    rs = load_spec(spec) if spec is not None else None
    st = open_store_cli(store)
    try:
        d = describe_volume(st, volume, rs, cohort, spec_hash)
    except LookupError as e:
        fail(str(e))
    typer.echo(json.dumps(d, indent=1))


def export_cmd(
    store: DatasetStoreOpt,
    what: Annotated[
        str,
        typer.Option(
            "--what",
            help="views|labels|materials|radiograph|volume: a .npy; geometry|dataset: a folder (--format)",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="output .npy file (geometry, dataset: a folder)")],
    volume: Annotated[
        str | None, typer.Option("--volume", help="volume id, a unique prefix is enough (not for --what dataset)")
    ] = None,
    cohort: CohortOpt = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="RenderSpec file (default: the store's dataset of the volume)")
    ] = None,
    spec_hash: SpecHashOpt = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="geometry: rtk | astra | diffdrr; dataset: webdataset | hf")
    ] = None,
    per: Annotated[str, typer.Option("--per", help="dataset: one sample per ring or per view")] = "ring",
    rings_per_shard: Annotated[int, typer.Option("--rings-per-shard", help="dataset: rings in each shard")] = 8,
    look: Annotated[Path | None, typer.Option("--look", help="look file (YAML/JSON) for --what radiograph")] = None,
) -> None:
    """Export a ring's views (V,H,W), its label thickness maps (C,V,H,W) mm (channels as `describe` lists them), its
    material bases (2,V,H,W) g/cm^2, radiographs (V,H,W) of a look made from them, or the canonical HU volume as
    .npy (voxel order matches `describe`'s affine; all float32 but the volume); a ring's geometry for RTK, ASTRA or
    DiffDRR, or a cohort's rings as WebDataset shards or a Hugging Face dataset, as a folder (docs/interop.md)."""
    store, cohort, spec_hash = dataset_options(store, cohort, spec_hash)
    if what in ("geometry", "dataset"):  # files other tools read: flows/cli/interop.py
        from xwin.flows.cli import interop

        rs = load_spec(spec) if spec is not None else None
        check_output(out, folder=True)
        if what == "geometry":
            interop.export_geometry(store, volume, fmt, out, cohort, spec_hash or (rs.spec_hash if rs else None))
        else:
            interop.export_dataset(store, fmt, out, cohort, rs, spec_hash, per, rings_per_shard)
        return
    if what not in ("views", "labels", "materials", "radiograph", "volume"):
        raise typer.BadParameter(
            "--what must be 'views', 'labels', 'materials', 'radiograph', 'volume', 'geometry' or 'dataset'"
        )
    if not volume:
        fail(f"--volume: required with --what {what}")
    if what == "radiograph" and look is None:
        raise typer.BadParameter("--what radiograph needs --look LOOK (a look file, docs/appearance.md)")
    lk = load_look(look) if look is not None else None
    rs = load_spec(spec) if spec is not None else None
    check_output(out, folder=False)
    st = open_store_cli(store)
    try:
        if what == "volume":
            from xwin.flows.describe import find_volume_dataset
            from xwin.storage import DatasetLookupError

            # a unique prefix of a volume with a ring names it, as for views; a whole id of a volume without a ring
            # stays as given (read_volume says when there is none)
            with contextlib.suppress(DatasetLookupError):
                _, volume = find_volume_dataset(st, volume, cohort, spec_hash)
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
            elif what in ("materials", "radiograph"):
                if not ds.material_channels(vid):
                    fail(f"ring {vid} has no material bases (render with a spec that has materials: true)")
                arr = ds.read_materials(vid) if lk is None else _radiographs(ds, vid, lk)
            else:
                arr = ds.read_ring(vid).astype(np.float32)
    except (LookupError, FileNotFoundError) as e:  # NotCommitted is a KeyError: no such volume or ring
        fail(str(e).strip("\"'") if isinstance(e, KeyError) else str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # the path as given: np.save(path) would add ".npy" to a name without it
        np.save(f, arr)
    typer.echo(f"wrote {out} {arr.dtype} {arr.shape}")


def _radiographs(ds, vid: str, look) -> np.ndarray:
    """(V, H, W) float32 radiographs of ``look`` made from the ring's material bases (one line and exit 2 when the
    ring has none)."""
    from xwin.pipeline.radiograph import radiograph

    if not ds.material_channels(vid):
        fail(f"ring {vid} has no material bases (render with a spec that has materials: true)")
    return radiograph(ds.read_materials(vid), look, pixel_mm=ds.spec.pixel_mm)
