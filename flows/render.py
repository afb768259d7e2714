"""Render the ring of one committed canonical volume into a projection dataset (``xwin render``).

The backfill flow renders inside its own task (``xwin.flows.tasks.render_series``) with its run's provenance; this is
the path for volumes already in the store.
"""

from __future__ import annotations

import time

import numpy as np

from xwin.pipeline.render import backend_versions, render_ring, resolve_backend
from xwin.schemas.render import RenderSpec
from xwin.storage import Store


def render_volume_to_store(
    store: Store, volume_id: str, spec: RenderSpec, cohort: str | None = None, backend: str = "auto", **options
) -> str:
    """Render the ring of one committed canonical volume into ``store``'s dataset (cohort, spec).

    Returns "skipped" when the ring is already committed, "written" otherwise. Raises on a bad volume.
    """
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
    ds.write_ring(volume_id, views, geom.view_meta(), prov)
    return "written"
