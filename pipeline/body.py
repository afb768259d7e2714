"""The patient's body in a CT volume, and the scanner table beside it.

Used by the render (``RenderSpec.body_mask``: a radiograph has no CT table; SV-DRR renders from table-removed CTs)
and by the quality checks at ingest (``xwin.pipeline.ingest.qc``). The volume is canonical (axes closest to RAS+:
axis 1 runs posterior -> anterior, axis 2 inferior -> superior).

Above -400 HU (skin, fat, muscle, bone; the lungs are enclosed and filled), a CT splits into 3D connected parts:
the trunk (the largest), the arms when they lie apart from it, and the table, pads and cables. The **table** is a
part that lies posterior to the trunk, is at least 150 mm wide and at most 80 mm thick front to back, and runs along
at least half the scan. The **body** is every part at least 2% of the trunk's size that is not the table, holes
filled slice by slice, grown by 2 voxels in-plane (skin at partial volume) but never into the table.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from jaxtyping import Bool, Float, Integer

BODY_HU = -400.0


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sizes) of the 3D connected components of ``mask`` (sizes[0] = 0: the background)."""
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return lab, sizes


def table_parts(lab: np.ndarray, sizes: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[list[int], float]:
    """The labels of the table parts (the module docstring's rule) and the table's left-right width in mm.
    Bounding boxes only (``ndimage.find_objects``): "posterior" compares box centres front to back."""
    trunk = int(np.argmax(sizes))
    if trunk == 0:
        return [], 0.0
    sx, sy, _ = spacing_mm
    Z = lab.shape[2]
    boxes = ndi.find_objects(lab)
    tb = boxes[trunk - 1]
    trunk_y = (tb[1].start + tb[1].stop) / 2.0
    parts, width = [], 0.0
    for i in np.argsort(sizes)[::-1][1:8]:
        if sizes[i] == 0:
            break
        bx, by, bz = boxes[int(i) - 1]
        wide = (bx.stop - bx.start) * sx >= 150.0
        thin = (by.stop - by.start) * sy <= 80.0
        long_ = (bz.stop - bz.start) >= 0.5 * Z
        if wide and thin and long_ and (by.start + by.stop) / 2.0 < trunk_y:
            parts.append(int(i))
            width = max(width, float((bx.stop - bx.start) * sx))
    return parts, width


def block_any(mask: np.ndarray, k: int) -> np.ndarray:
    """Blocks of k x k voxels in-plane: True where any voxel of the block is."""
    X, Y, Z = mask.shape
    px, py = (-X) % k, (-Y) % k
    m = np.pad(mask, ((0, px), (0, py), (0, 0))) if px or py else mask
    return np.asarray(m.reshape((X + px) // k, k, (Y + py) // k, k, Z).any(axis=(1, 3)))


def _expand(mask: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    out: np.ndarray = np.repeat(np.repeat(mask, k, axis=0), k, axis=1)
    return out[: shape[0], : shape[1]]


def body_mask(
    hu: Integer[np.ndarray, "X Y Z"] | Float[np.ndarray, "X Y Z"],
    spacing_mm: tuple[float, float, float],
    threshold: float = BODY_HU,
    margin_mm: float = 2.0,
) -> Bool[np.ndarray, "X Y Z"]:
    """The body (module docstring): True inside the patient, False for the table and everything else outside.

    Found on blocks of about 2 mm in-plane (a block is tissue when any of its voxels is), then grown by
    ``margin_mm`` and brought back to the voxel grid: a few voxels of air beside the skin stay, no tissue is cut.
    ~0.5 s for a 512 x 512 x 133 chest CT instead of ~4 s on the voxel grid."""
    hu = np.asarray(hu)
    k = max(1, round(2.0 / max(min(spacing_mm[0], spacing_mm[1]), 1e-3)))
    small = block_any(hu > threshold, k)
    lab, sizes = components(small)
    if sizes.max() == 0:
        return np.zeros(hu.shape, dtype=bool)
    table, _ = table_parts(lab, sizes, (spacing_mm[0] * k, spacing_mm[1] * k, spacing_mm[2]))
    keep = (sizes >= 0.02 * sizes.max()) & (np.arange(sizes.size) > 0)
    keep[table] = False
    m = keep[lab]
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndi.generate_binary_structure(2, 1)
    m = ndi.binary_fill_holes(m, structure=in_plane)  # slice by slice: no connectivity along z
    grow = max(0, round(margin_mm / (min(spacing_mm[0], spacing_mm[1]) * k)))
    if grow:
        m = ndi.binary_dilation(m, structure=np.ones((2 * grow + 1, 2 * grow + 1, 1), bool))
    if table:
        m &= ~np.isin(lab, table)
    return _expand(m, k, hu.shape)
