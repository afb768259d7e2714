"""The content fingerprint of a canonical volume (``xwin.schemas.ingest.ContentFingerprint``): an exact hash of its
voxels and a small descriptor for near-duplicates, so that the split assignment can bind copies of one CT that reach
a cohort under different subject ids (a re-ingest under another de-identification salt, a site re-export, a second
reconstruction of one acquisition).

The descriptor samples the volume on a fixed physical grid (``cells``^3 points ``step_mm`` apart, centred on the
volume's world box), after block-averaging and a Gaussian smoothing to the grid's scale, so that it does not depend
on the voxel size, the slice thickness or the reconstruction kernel. The body's outline, which every chest CT shares,
is removed by subtracting a smoother copy (a band-pass), and the result is scaled to unit variance, 32 per unit,
as int8. Similarity of two descriptors is their Pearson correlation (:func:`similarity`).
"""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
from jaxtyping import Integer

from xwin.schemas.ingest import ContentFingerprint

CELLS = 12
STEP_MM = 20.0
MIN_INSIDE = CELLS**3 // 8  # fewer grid points inside the volume: no descriptor (exact matches only)
SCALE = 32.0  # int8 units per standard deviation


def exact_hash(hu: np.ndarray, spacing: tuple[float, ...]) -> str:
    """``sha256:`` of JSON [shape, spacing rounded to 1e-4 mm] followed by the int16 little-endian C-order voxels.

    The spacing is rounded to 1e-6 mm first: a float32 affine (NIfTI) and a float64 one (DICOM) of one oblique
    grid differ by ~1e-8 mm, and common pixel spacings (400 mm / 512 = 0.78125) lie exactly half-way between two
    1e-4 steps, where a single rounding would split the two copies about as often as not."""
    vol = np.ascontiguousarray(hu, dtype="<i2")
    h = hashlib.sha256(json.dumps([list(vol.shape), [round(round(float(s), 6), 4) for s in spacing]]).encode())
    h.update(vol.data.cast("B"))
    return "sha256:" + h.hexdigest()


def near_descriptor(
    hu: np.ndarray, affine: np.ndarray, cells: int = CELLS, step_mm: float = STEP_MM
) -> np.ndarray | None:
    """The ``cells``^3 int8 descriptor of the module docstring (flattened, C order), or None (too small, uniform)."""
    import scipy.ndimage as ndi

    aff = np.asarray(affine, float)
    sp = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    # block means to at most half a grid step (cheap and memory-light), then smoothing to the grid's scale
    f = np.maximum(1, np.floor(step_mm / 2 / np.maximum(sp, 1e-6))).astype(int)
    n = [s - s % k for s, k in zip(hu.shape, f)]
    if min(n) == 0:
        return None
    small = (
        np.asarray(hu)[: n[0], : n[1], : n[2]]
        .reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2])
        .mean(axis=(1, 3, 5), dtype=np.float32)
    )
    a2 = aff.copy()
    a2[:3, :3] = aff[:3, :3] @ np.diag(f)
    a2[:3, 3] = aff[:3, :3] @ ((f - 1) / 2.0) + aff[:3, 3]
    small = ndi.gaussian_filter(small, step_mm / 2 / (sp * f), mode="nearest")
    corners = np.array([[i, j, k, 1.0] for i in (0, hu.shape[0] - 1) for j in (0, hu.shape[1] - 1)
                        for k in (0, hu.shape[2] - 1)])  # fmt: skip
    world = (aff @ corners.T).T[:, :3]
    centre = (world.min(axis=0) + world.max(axis=0)) / 2
    ax = (np.arange(cells) - (cells - 1) / 2.0) * step_mm
    pts = np.stack(np.meshgrid(*(centre[d] + ax for d in range(3)), indexing="ij"), axis=-1).reshape(-1, 3)
    ijk = (np.linalg.inv(a2) @ np.c_[pts, np.ones(len(pts))].T)[:3]
    inside = np.all((ijk >= -0.5) & (ijk <= np.asarray(small.shape)[:, None] - 0.5), axis=0)
    if inside.sum() < MIN_INSIDE:
        return None
    s = ndi.map_coordinates(small, ijk, order=1, mode="nearest").reshape((cells,) * 3)
    m = inside.reshape((cells,) * 3).astype(np.float64)
    s = np.where(m > 0, s, 0.0)
    weight = np.maximum(ndi.gaussian_filter(m, 1.5, mode="constant"), 1e-6)
    low = ndi.gaussian_filter(s * m, 1.5, mode="constant") / weight
    r = (s - low)[m > 0]
    r = r - r.mean()
    sd = float(r.std())
    if sd < 1e-3:
        return None
    out = np.zeros((cells,) * 3, np.float64)
    out[m > 0] = r / sd * SCALE
    return np.clip(np.rint(out), -127, 127).astype(np.int8).ravel()


def content_fingerprint(hu: Integer[np.ndarray, "X Y Z"], affine: np.ndarray) -> ContentFingerprint:
    """The fingerprint of one canonical volume (int16 HU, voxel -> world ``affine``)."""
    aff = np.asarray(affine, float)
    spacing = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    desc = near_descriptor(hu, aff)
    near = None if desc is None else base64.b64encode(desc.tobytes()).decode()
    return ContentFingerprint(exact=exact_hash(hu, spacing), near=near, near_cells=CELLS, near_step_mm=STEP_MM)


def decode_near(fp: ContentFingerprint) -> np.ndarray | None:
    """The int8 descriptor of ``fp`` (None without one, or on another grid than this version's)."""
    if fp.near is None or fp.near_cells != CELLS or fp.near_step_mm != STEP_MM:
        return None
    return np.frombuffer(base64.b64decode(fp.near), dtype=np.int8)


def similarity(a: ContentFingerprint, b: ContentFingerprint) -> float | None:
    """Pearson correlation of two fingerprints' descriptors (None when either has none)."""
    da, db = decode_near(a), decode_near(b)
    if da is None or db is None:
        return None
    x, y = da.astype(np.float64), db.astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / den) if den > 0 else None
