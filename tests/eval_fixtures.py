"""Helpers of the 3-D loop tests (tests/test_decoder.py, tests/test_eval3d.py): a tiny world-model checkpoint and a
store holding the small CT *and* its rendered ring (the volume metrics need the source CT)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np


def tiny_checkpoint(out: Path, store_url: str, steps: int = 20) -> Path:
    """An ``xwin train --preset tiny`` checkpoint after ``steps`` CPU steps on ``store_url`` (no real stream)."""
    from xwin.training.config import load_config
    from xwin.training.loop import Trainer, build_streams

    cfg = load_config(
        preset="tiny",
        overrides=[
            f"out_dir={out}",
            f"data.store={store_url}",
            "data.num_workers=0",
            "data.draws_per_volume=4",
            "log_every=1000",
            "ckpt_every=0",
        ],
    )
    sim, real = build_streams(cfg)
    tr = Trainer(cfg, sim, real)
    tr.run(max_steps=steps)
    path = tr.save(out / "world.pt")
    tr.close()
    return path


def store_with_volume(root: Path, small_ct_path, rendered_dataset, volume_ids=("small-a",)) -> SimpleNamespace:
    """A local store, cohort "c1": the small CT as each of ``volume_ids`` (its record and HU) and the rendered
    ring of ``rendered_dataset`` (scale 1.0: the ring of exactly this CT) under the same ids."""
    from xwin.schemas.ingest import HUStats, Provenance, VolumeRecord
    from xwin.storage import open_store

    img = nib.as_closest_canonical(nib.load(str(small_ct_path)))
    hu = np.asarray(img.dataobj).astype(np.int16)
    A = np.asarray(img.affine, dtype=np.float64)
    url = str(root / "store")
    store = open_store(url)
    ds = store.dataset("c1", rendered_dataset.spec)
    ring = rendered_dataset.rings["small-a"]  # scale 1.0
    for vid in volume_ids:
        rec = VolumeRecord(
            volume_id=vid,
            cohort="c1",
            source="small_ct.nii.gz",
            kind="nifti",
            shape=hu.shape,
            spacing_mm=tuple(np.linalg.norm(A[:3, :3], axis=0)),
            affine=A.tolist(),
            hu=HUStats(min=-1000, max=1500, mean=0, std=1, p01=-1000, p99=1000, air_fraction=0.3),
            provenance=Provenance(reader="nibabel", versions={}, input_checksum=vid, input_files=1),
        )
        store.write_volume(rec, hu)
        ds.write_ring(vid, ring, rendered_dataset.geometry.view_meta(), {})
    return SimpleNamespace(url=url, cohort="c1", dataset_url=f"{url}#c1", hu=hu, affine=A, ring=ring, ids=volume_ids)
