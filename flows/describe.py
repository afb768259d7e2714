"""``xwin describe``: what it takes to re-project a stored volume (its frame, units and every view's ray geometry)."""

from __future__ import annotations

import numpy as np

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.schemas.render import RenderSpec
from xwin.storage import Store


def describe_volume(store: Store, volume_id: str, spec: RenderSpec, cohort: str | None = None) -> dict:
    """Everything needed to re-project a volume: affine, shape, frame, units, spec hash and per-view cone_vecs.

    Views come from the stored ring when it is committed (``rendered: true``), else from the spec's ring.
    """
    rec = store.volume_record(volume_id)
    coh = cohort or rec.cohort
    try:
        ds = store.dataset(coh, spec, create=False)
    except FileNotFoundError:
        ds = None
    rendered = bool(ds is not None and ds.has_ring(volume_id))
    g = (
        ConeBeamViews.from_view_meta(ds.read_geometry(volume_id))
        if ds is not None and rendered
        else ring_for_volume(spec, np.asarray(rec.affine), rec.shape)
    )
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
