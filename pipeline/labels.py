"""CT labels projected into the ring's views: per-structure thickness maps in the same geometry (docs/render.md,
"Labels").

Input: a labelmap aligned with the CT (a multi-label NIfTI with a structures table ``id,structure``, a DICOM
Segmentation object, or a TotalSegmentator output folder with one binary mask per structure,
``<structure>.nii.gz``). It is brought into the canonical voxel order of the stored volume (the same axis flips
ingest applies) and checked against the volume's grid: same shape and affine (within ``tol_mm``) is used as it is;
the same world frame on another grid is resampled nearest-neighbour; anything else is rejected with its reason
(:class:`LabelError`) and the CT renders without labels.

Channels: a :class:`LabelSpec` maps structures (fnmatch patterns over their names) to output channels; the defaults
follow CheXanatomy-style groups. Each channel's value per pixel is the thickness in mm of its structures along the
ray: the line integral of the channel's indicator, rendered by the same backend, volume model (trilinear/Joseph
sampling of the indicator) and rays as the views.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float, Float32, Int
from pydantic import BaseModel, ConfigDict, Field

from xwin.pipeline.geometry import ConeBeamViews

DEFAULT_GROUPS: dict[str, list[str]] = {
    "lungs": ["lung_*"],
    "heart": ["heart", "atrial_appendage_left"],
    "aorta": ["aorta"],
    "liver": ["liver"],
    "spleen": ["spleen"],
    "kidneys": ["kidney_left", "kidney_right"],
    "stomach": ["stomach"],
    "spine": ["vertebrae_*", "sacrum"],
    "ribs": ["rib_*"],
    "shoulder_girdle": ["clavicula_*", "scapula_*"],
}


class LabelError(ValueError):
    """A labelmap that cannot be used with its CT (``reason``: a short code, the message says the specifics)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class LabelSpec(BaseModel):
    """Structures -> output channels (in order). Part of a ring's commit record; ``label_hash`` names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_GROUPS.items()})

    @property
    def channels(self) -> list[str]:
        return list(self.groups)

    @property
    def label_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]

    def channel_ids(self, names: dict[int, str]) -> list[list[int]]:
        """The label ids of each channel (a structure may match several channels; each match counts)."""
        return [
            sorted(i for i, n in names.items() if any(fnmatch.fnmatchcase(n, p) for p in pats))
            for pats in self.groups.values()
        ]


def read_structures(path: str | Path) -> dict[int, str]:
    """A structures table (CSV with columns ``id`` and ``structure`` or ``name``): label id -> structure name."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "id" not in rows[0] or not ({"structure", "name"} & set(rows[0])):
        raise LabelError("bad_structures", f"{path}: needs columns id and structure (or name)")
    col = "structure" if "structure" in rows[0] else "name"
    return {int(r["id"]): r[col].strip() for r in rows}


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types on a bad file
        raise LabelError("unreadable", f"{path}: {type(e).__name__}: {e}") from e


def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_labelmap(source: str | Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(label ids (X,Y,Z) int, voxel->RAS affine, id -> name) of a labelmap file (with ``structures.csv`` beside it,
    or ``<file>.csv``), a DICOM Segmentation file (:func:`read_dicom_seg`) or a TotalSegmentator folder (one
    ``<structure>.nii.gz`` mask per structure)."""
    p = Path(source)
    if p.is_dir():
        masks = sorted(p.glob("*.nii.gz")) + sorted(p.glob("*.nii"))
        if not masks:
            raise LabelError("empty", f"{p}: no NIfTI masks in the folder")
        lab: np.ndarray | None = None
        aff0: np.ndarray | None = None
        names: dict[int, str] = {}
        for i, m in enumerate(masks, start=1):
            arr, aff = _load_nifti(m)
            if lab is None or aff0 is None:
                lab, aff0 = np.zeros(arr.shape, np.int16), aff
            elif arr.shape != lab.shape or not np.allclose(aff, aff0, atol=1e-3):
                raise LabelError("inconsistent_masks", f"{m}: its grid differs from {masks[0].name}'s")
            lab[np.asarray(arr) > 0] = i
            names[i] = m.name.removesuffix(".gz").removesuffix(".nii")
        assert lab is not None and aff0 is not None
        return lab, aff0, names
    if not p.exists():
        raise LabelError("not_found", f"{p} does not exist")
    if p.suffix.lower() in (".dcm", ".dicom") or _is_dicom(p):
        return read_dicom_seg(p)
    arr, aff = _load_nifti(p)
    for table in (p.with_name("structures.csv"), Path(str(p).removesuffix(".gz").removesuffix(".nii") + ".csv")):
        if table.exists():
            return np.rint(arr).astype(np.int16), aff, read_structures(table)
    raise LabelError("no_structures", f"{p}: no structures table beside it (structures.csv or {p.stem}.csv)")


def align_labels(
    labels: np.ndarray,
    affine: np.ndarray,
    ct_shape: tuple[int, int, int],
    ct_affine: np.ndarray,
    tol_mm: float = 0.01,
) -> tuple[Int[np.ndarray, "X Y Z"], str]:
    """The labelmap on the CT's (canonical) voxel grid, and how it got there ("same grid" / "resampled").

    The labelmap is first put in canonical RAS order (axis flips and permutations only, as ingest does). Then: same
    shape and affine within ``tol_mm`` -> as it is; the same axis directions (within 1e-3) on another grid ->
    nearest-neighbour resampling onto the CT grid (outside -> 0); otherwise LabelError ``misaligned``."""
    import scipy.ndimage as ndi
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    lab = apply_orientation(np.asarray(labels), ornt)
    aff = np.asarray(affine, np.float64) @ inv_ornt_aff(ornt, np.asarray(labels).shape)
    A = np.asarray(ct_affine, np.float64)
    if lab.shape == tuple(ct_shape) and np.allclose(aff, A, atol=tol_mm):
        return np.ascontiguousarray(lab, dtype=np.int16), "same grid"
    dirs = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)
    ct_dirs = A[:3, :3] / np.linalg.norm(A[:3, :3], axis=0)
    if not np.allclose(dirs, ct_dirs, atol=1e-3):
        raise LabelError(
            "misaligned",
            f"labelmap axes {np.round(dirs, 3).tolist()} differ from the CT's {np.round(ct_dirs, 3).tolist()}",
        )
    # CT voxel (i,j,k) -> label voxel coordinates; nearest neighbour, 0 outside
    m = np.linalg.inv(aff) @ A
    out = ndi.affine_transform(lab.astype(np.int16), m[:3, :3], offset=m[:3, 3], output_shape=tuple(ct_shape),
                               order=0, mode="grid-constant", cval=0)  # fmt: skip
    if not out.any():
        raise LabelError("misaligned", "the labelmap does not overlap the CT")
    return out.astype(np.int16), "resampled"


def _crop(ind: np.ndarray, affine: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The indicator's bounding box grown by ``margin`` voxels (within the volume), as float32, and its affine: the
    same line integrals as the whole volume at a fraction of the cost for an organ. Inside the volume the margin
    holds the zeros the projector's interpolation reads; at the volume's own border nothing is added, so the
    projector's edge handling is the same as on the whole volume."""
    nz = np.nonzero(ind.any(axis=(1, 2)))[0], np.nonzero(ind.any(axis=(0, 2)))[0], np.nonzero(ind.any(axis=(0, 1)))[0]
    lo = [max(0, int(a[0]) - margin) for a in nz]
    hi = [min(n, int(a[-1]) + 1 + margin) for a, n in zip(nz, ind.shape)]
    sub = np.ascontiguousarray(ind[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(lo, np.float64) + affine[:3, 3]
    return sub, shifted


def render_labels(
    labels: Int[np.ndarray, "X Y Z"],
    names: dict[int, str],
    affine: Float[np.ndarray, "4 4"],
    views: ConeBeamViews,
    spec: LabelSpec,
    backend: str = "auto",
    on_channel: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Float32[np.ndarray, "C V H W"]:
    """Thickness (mm) of each channel's structures along every ray of ``views``: (C, V, H, W) float32."""
    from xwin.pipeline.render import render_views

    ids = spec.channel_ids(names)
    V, H, W = len(views), views.height, views.width
    out = np.zeros((len(ids), V, H, W), np.float32)
    A = np.asarray(affine, np.float64)
    for c, want in enumerate(ids):
        if want:
            ind = np.isin(labels, want)
            if ind.any():
                sub, sub_affine = _crop(ind, A)
                out[c] = render_views(sub, sub_affine, views, backend=backend, is_mu=True, **options)
        if on_channel is not None:
            on_channel(c + 1, len(ids))
    return out


def read_dicom_seg(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(label ids (X,Y,Z) int16, voxel->RAS affine, id -> segment label) of a DICOM Segmentation (BINARY or
    FRACTIONAL, one frame per segment and plane). Frames are placed by their ImagePositionPatient along the normal of
    the shared ImageOrientationPatient; segment ``n`` gets label id ``n`` (SegmentLabel as its name). Overlapping
    segments: the later segment number wins."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    if str(getattr(ds, "SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise LabelError(
            "not_seg", f"{path}: not a DICOM Segmentation (SOPClassUID {getattr(ds, 'SOPClassUID', None)})"
        )
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, np.float64)
        dr, dc = (float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing)
        frames = ds.PerFrameFunctionalGroupsSequence
        pos = np.asarray([f.PlanePositionSequence[0].ImagePositionPatient for f in frames], np.float64)
        seg_of = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in frames]
        names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
        pixels = np.asarray(ds.pixel_array).reshape(len(frames), int(ds.Rows), int(ds.Columns))
    except (AttributeError, IndexError, KeyError, ValueError) as e:
        raise LabelError("bad_seg", f"{path}: {type(e).__name__}: {e}") from e
    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    d = pos @ normal
    planes = np.unique(np.round(d, 3))
    step = float(np.median(np.diff(planes))) if len(planes) > 1 else float(getattr(shared.PixelMeasuresSequence[0],
                                                                                 "SliceThickness", 1.0))  # fmt: skip
    k_of = np.rint((d - planes[0]) / step).astype(int)
    X, Y, Z = int(ds.Columns), int(ds.Rows), int(k_of.max()) + 1
    lab = np.zeros((X, Y, Z), np.int16)
    fractional = str(getattr(ds, "SegmentationType", "BINARY")).upper() == "FRACTIONAL"
    thr = 0.5 * float(getattr(ds, "MaximumFractionalValue", 255)) if fractional else 0.5
    for f in np.argsort(seg_of, kind="stable"):
        on = thr < pixels[f].T  # (rows, cols) -> (x = column, y = row)
        lab[:, :, k_of[f]][on] = seg_of[f]
    first = pos[int(np.argmin(d))]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = r * dc, c * dr, normal * step, first
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return lab, ras, names
