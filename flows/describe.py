"""``xwin describe``: what it takes to re-project a stored volume (its frame, units and every view's ray geometry)."""

from __future__ import annotations

import numpy as np

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
from xwin.schemas.render import RenderSpec
from xwin.storage import DatasetLookupError, ProjectionDataset, Store


def find_volume_dataset(
    store: Store, volume: str, cohort: str | None = None, spec_hash: str | None = None
) -> tuple[ProjectionDataset, str]:
    """(dataset, volume id) the store holds for ``volume`` (an id or a unique prefix): the dataset with its committed
    ring; else, for a committed volume, the one dataset of its cohort (``cohort`` or the volume's own) matching
    ``spec_hash``. Raises DatasetLookupError naming the candidates when none or several match."""
    try:
        return store.find_ring(volume, cohort, spec_hash)
    except DatasetLookupError as e:
        ring_error = e
    try:
        committed = store.has_volume(volume)
    except ValueError:  # not an id at all
        committed = False
    if not committed:  # no ring and no volume of that id, or a prefix of several rings
        raise ring_error
    coh = cohort or store.volume_record(volume).cohort
    cands = [
        store.open_dataset(d.cohort, d.spec_hash)
        for d in store.datasets()
        if d.cohort == coh and (spec_hash is None or d.spec_hash.startswith(spec_hash))
    ]
    holding = [ds for ds in cands if ds.has_ring(volume)]
    if len(holding) == 1:  # the ring of the volume's own cohort (others hold it too)
        return holding[0], volume
    if holding:
        raise ring_error
    if len(cands) == 1:
        return cands[0], volume
    names = ", ".join(f"{ds.cohort}/{ds.spec_hash}" for ds in cands)
    if not cands:
        have = ", ".join(f"{d.cohort}/{d.spec_hash}" for d in store.datasets()) or "none"
        raise DatasetLookupError(
            f"no dataset of cohort {coh!r} in {store.url} (datasets: {have}): give --spec to describe the ring a "
            "RenderSpec file would render"
        )
    raise DatasetLookupError(
        f"volume {volume!r} has no ring, and cohort {coh!r} has {len(cands)} datasets ({names}): give --spec-hash"
    )


def describe_volume(
    store: Store,
    volume_id: str,
    spec: RenderSpec | None = None,
    cohort: str | None = None,
    spec_hash: str | None = None,
) -> dict:
    """Everything needed to re-project a volume: affine, shape, frame, units, spec hash and per-view cone_vecs.

    Without ``spec`` the store's own dataset is described (:func:`find_volume_dataset`); with it, the dataset of
    that spec. Views come from the stored ring when it is committed (``rendered: true``), else from the spec's
    ring.
    """
    ds: ProjectionDataset | None
    if spec is None:
        ds, volume_id = find_volume_dataset(store, volume_id, cohort, spec_hash)
        spec = ds.spec
    else:
        try:
            ds = store.dataset(cohort or store.volume_record(volume_id).cohort, spec, create=False)
        except FileNotFoundError:
            ds = None
    rec = store.volume_record(volume_id)
    coh = ds.cohort if ds is not None else (cohort or rec.cohort)
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
        # the ring's label channels in order ([] without labels): `xwin export --what labels` (C, V, H, W) mm
        "labels": ds.label_channels(volume_id) if ds is not None and rendered else [],
        # the material bases (spec.materials): `xwin export --what materials` (2, V, H, W) g/cm^2
        "materials": _materials_entry(ds, volume_id, spec, rendered),
        "detector": {"height": g.height, "width": g.width},
        "views": [
            {"index": k, "yaw_deg": float(g.yaw_deg[k]), "cone_vec": [float(x) for x in g.cone_vecs[k]]}
            for k in range(len(g))
        ],
    }


def _materials_entry(ds: ProjectionDataset | None, volume_id: str, spec: RenderSpec, rendered: bool) -> dict | None:
    """``describe``'s ``materials``: the bases' names, units and model (None when the spec has no materials)."""
    if not spec.materials:
        return None
    from xwin.pipeline.materials import MATERIAL_MODEL, MATERIALS, UNITS

    c = ds.scope.get_commit(volume_id) if ds is not None and rendered else None
    if c is not None and c.material_channels:  # the stored ring's own bases and model
        return {"names": list(c.material_channels), "units": UNITS, "shape": ["2", "V", "H", "W"], "stored": True,
                "model": c.material_model}  # fmt: skip
    return {"names": list(MATERIALS), "units": UNITS, "shape": ["2", "V", "H", "W"], "stored": False,
            "model": MATERIAL_MODEL}  # fmt: skip
