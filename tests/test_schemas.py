"""JSON round trips of the ingest contracts (schemas/ingest.py); others may append tests for their schemas."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from xwin.schemas.ingest import (
    HUStats,
    InputKind,
    ManifestRow,
    Provenance,
    Rejection,
    RejectReason,
    RunEntry,
    RunSummary,
    SeriesChoice,
    SeriesRecord,
    VolumeRecord,
)


def roundtrip(model):
    js = model.model_dump_json()
    back = type(model).model_validate_json(js)
    assert back == model
    assert json.loads(back.model_dump_json()) == json.loads(js)
    return back


@pytest.fixture
def record() -> VolumeRecord:
    aff = np.eye(4)
    aff[:3, :3] = np.diag([0.703125, 0.703125, 2.5]) @ np.array([[1, 0, 0], [0, 0.9998, -0.02], [0, 0.02, 0.9998]])
    aff[:3, 3] = [-193.296875, -187.5968780517578, -340.0]
    return VolumeRecord(
        volume_id="ff7035fd40bd483024e79a2c",
        cohort="nlst",
        source="/data/NLST/100012#1.2.3",
        kind=InputKind.dicom,
        subject_id="100012",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        shape=(512, 512, 133),
        spacing_mm=(0.703125, 0.703125, 2.5),
        affine=aff.tolist(),
        hu=HUStats(min=-1024, max=3071, mean=-603.97, std=487.44, p01=-1024, p99=420, air_fraction=0.47),
        provenance=Provenance(
            reader="pydicom",
            versions={"pydicom": "3.0.2"},
            input_checksum="ab" * 32,
            input_files=133,
            notes=["dropped 1 duplicate"],
        ),
        series_choices=[
            SeriesChoice(
                series_uid="1.2.3.4",
                chosen=True,
                reason="chosen: thin",
                n_slices=133,
                slice_thickness_mm=2.5,
                kernel="B30f",
            ),
            SeriesChoice(series_uid="1.2.3.5", chosen=False, reason="localizer: scout", n_slices=1),
        ],
    )


def test_volume_record_roundtrip_keeps_affine_exactly(record):
    back = roundtrip(record)
    assert np.array_equal(np.asarray(back.affine), np.asarray(record.affine))  # floats survive JSON bit-exactly
    assert back.provenance.created_at == record.provenance.created_at


def test_volume_record_from_real_ingest_roundtrips(small_ct_path):
    from xwin.pipeline.ingest import load_candidate, plan_inputs

    cands, _ = plan_inputs([str(small_ct_path)], "t")
    rec, _ = load_candidate(cands[0])
    roundtrip(rec)


def test_volume_record_validation(record):
    bad = json.loads(record.model_dump_json())
    bad["affine"][3] = [0, 0, 1, 1]
    with pytest.raises(ValidationError):
        VolumeRecord.model_validate(bad)
    extra = json.loads(record.model_dump_json())
    extra["unexpected"] = 1
    with pytest.raises(ValidationError):
        VolumeRecord.model_validate(extra)


def test_rejections_and_run_summary():
    for reason in RejectReason:
        roundtrip(Rejection(input="x", reason=reason, detail=f"because {reason.value}", series_uid=None))
    s = RunSummary(
        done=[RunEntry(input="a.nii.gz", volume_id="v1")],
        skipped=[RunEntry(input="b/", volume_id="v2", series_uid="1.2", stage="render")],
        rejected=[Rejection(input="c/", reason=RejectReason.missing_slices, detail="gap")],
    )
    back = roundtrip(s)
    assert back.counts() == {"done": 1, "skipped": 1, "rejected": 1, "failed": 0}
    assert json.loads(s.model_dump_json())["rejected"][0]["reason"] == "missing_slices"
    assert s.merge(back).counts() == {"done": 2, "skipped": 2, "rejected": 2, "failed": 0}
    with pytest.raises(ValidationError):
        Rejection(input="x", reason="not_a_reason", detail="")  # closed enum


def test_manifest_row_aliases_and_series_record():
    row = ManifestRow.model_validate(
        {
            "Series UID": "1.2",
            "File Location": "./NLST/1/2/3",
            "Number of Images": "1,234",
            "Modality": "CT",
            "Subject ID": "100012",
            "Ignored Column": "x",
        }
    )
    assert row.number_of_images == 1234 and row.subject_id == "100012"
    back = ManifestRow.model_validate_json(row.model_dump_json(by_alias=True))
    assert back == row
    assert (
        ManifestRow.model_validate({"Series UID": "1", "File Location": "x", "Number of Images": ""}).number_of_images
        is None
    )
    roundtrip(
        SeriesRecord(
            series_uid="1.2",
            n_files=133,
            image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
            transfer_syntax="1.2.840.10008.1.2.1",
            kernel="B30f",
            slice_thickness_mm=1.25,
        )
    )


def test_view_meta_is_the_geometry_storage_keeps():
    """ViewMeta carries a ring's action metadata across the storage boundary and refuses mismatched shapes;
    ConeBeamViews turns it back into the same rays."""
    from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume
    from xwin.schemas.render import RenderSpec, ViewMeta

    spec = RenderSpec(height=16, width=24, n_views=6, yaw_step_deg=60.0)
    rays = ring_for_volume(spec, np.eye(4), (8, 8, 8))
    meta = rays.view_meta()
    assert len(meta) == 6 and (meta.height, meta.width) == (16, 24)
    assert meta.index.dtype == np.int32 and meta.cone_vec.shape == (6, 12)
    np.testing.assert_allclose(meta.yaw_deg, spec.yaws_deg)
    back = ConeBeamViews.from_view_meta(meta)
    np.testing.assert_array_equal(back.cone_vecs, rays.cone_vecs)
    np.testing.assert_array_equal(back.pixel_centres(2), rays.pixel_centres(2))
    with pytest.raises(ValueError, match="cone_vec has shape"):
        ViewMeta(meta.index, meta.yaw_deg, meta.cone_vec[:, :9], meta.world_from_camera, meta.intrinsics, 16, 24)
