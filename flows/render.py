"""Render the ring of one committed canonical volume into a projection dataset (``xwin render``), and the ring
provenance every render path writes (``ring_provenance``).

Two paths render rings: the backfill flow inside its own task (``xwin.flows.tasks.render_series``: claim, render slot,
progress events, out-of-memory fallback), and :func:`render_volume_to_store` for volumes already in the store (the
body of ``xwin render``). Both build the ring's provenance with :func:`ring_provenance`, so a ring records the same
fields whichever path wrote it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from xwin.pipeline.render import backend_versions, render_ring, resolve_backend
from xwin.schemas.render import RenderSpec
from xwin.storage import Store

UNITS = "line integral of mu [1/mm] * mm"
VOLUME_MODEL = "trilinear in the voxel box [-1/2, N-1/2]^3, zero outside"


def ring_provenance(
    *,
    volume_id: str,
    source: str | None,
    spec: RenderSpec,
    backend: str,
    render_seconds: float,
    writer: str | None = None,
    series_uid: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The provenance of a rendered ring (stored in its commit record): where the volume came from, the backend that
    rendered it and its library versions, the spec (and hash), units, mu_water, the volume model, how long the render
    took, when, by whom, and any render notes (e.g. "rendered on the CPU" after a GPU out-of-memory fallback)."""
    prov: dict[str, Any] = {
        "source": source,
        "canonical_volume_id": volume_id,
        "series_uid": series_uid,
        "backend": backend,
        "backend_versions": backend_versions(backend),
        "spec_hash": spec.spec_hash,
        "spec": spec.model_dump(mode="json"),
        "units": UNITS,
        "mu_water_per_mm": spec.mu_water_per_mm,
        "volume_model": VOLUME_MODEL,
        "render_seconds": round(float(render_seconds), 3),
        "rendered_at": datetime.now(UTC).isoformat(),
        "writer": writer,
    }
    if notes:
        prov["render_notes"] = list(notes)
    return prov


def material_bases(hu: Any, affine: Any, spec: RenderSpec, geom: Any, backend: str, **options: Any) -> dict[str, Any]:
    """The write_ring keywords of a ring's material bases (``materials``, ``material_model``) when ``spec.materials``
    (rendered through the backend and rays of the views, xwin.pipeline.materials), else {}."""
    if not spec.materials:
        return {}
    from xwin.pipeline.materials import MATERIAL_MODEL, MATERIALS, render_ring_materials

    bases = render_ring_materials(hu, np.asarray(affine, np.float64), spec, geom, backend=backend, **options)
    return {"materials": bases, "material_channels": list(MATERIALS), "material_model": dict(MATERIAL_MODEL)}


def render_volume_to_store(
    store: Store, volume_id: str, spec: RenderSpec, cohort: str | None = None, backend: str = "auto", **options
) -> str:
    """Render the ring of one committed canonical volume into ``store``'s dataset (cohort, spec), with the same
    provenance as the backfill (:func:`ring_provenance`).

    Returns "skipped" when the ring is already committed, "written" otherwise. Raises on a bad volume.
    """
    rec = store.volume_record(volume_id)
    ds = store.dataset(cohort or rec.cohort, spec)
    if ds.settled(volume_id):  # committed and catalogued (a missing catalog row is re-added)
        return "skipped"
    rec, hu = store.read_volume(volume_id)
    name = resolve_backend(backend)
    notes: list[str] = []
    t0 = time.perf_counter()
    views, geom = render_ring(hu, np.asarray(rec.affine, dtype=np.float64), spec, backend=name, notes=notes, **options)
    mat_kw = material_bases(hu, rec.affine, spec, geom, name, notes=notes, **options)
    prov = ring_provenance(
        volume_id=volume_id,
        source=rec.source,
        spec=spec,
        backend=name,
        render_seconds=time.perf_counter() - t0,
        series_uid=rec.series_uid,
        notes=notes,
    )
    ds.write_ring(volume_id, views, geom.view_meta(), prov, **mat_kw)
    return "written"
