"""Quality checks of a canonical HU volume, each a measured value and a rule (docs/ingest.md, "Quality checks").

The volume is the canonical one: int16 HU, voxel axes closest to RAS+ (axis 1 runs posterior -> anterior, axis 2
inferior -> superior), padding already air. Everything is measured on a copy reduced to about 4 mm in-plane (the
checks look for structures of centimetres)

- ``truncated``: the body cut by the field of view. Per axial slice, the length of the body's contact with the left,
  right and anterior image borders; value = fraction of slices where it exceeds 50 mm (arms resting on the edge of
  the field touch it over a few centimetres; a torso cut by it, over its whole depth). Flagged above 0.25.
- ``table``: the scanner table: a body-sized structure separate from the body, posterior to it, thin
  front-to-back and running along most of the scan. Value = its left-right width in mm (0 without one). Flagged
  when present (it projects into every DRR; a radiograph has none: ``RenderSpec.body_mask`` removes it).
- ``hu_air`` / ``hu_tissue``: the histogram peaks where air (-1000) and soft tissue (fat to muscle, -150..100) must
  be; value = the peak's HU. Flagged outside [-1100, -900] and [-200, 150] (a missing rescale, a wrong intercept).
- ``metal``: cc of voxels >= 3000 HU (metal implants, wires; undiluted IV contrast in an arm vein reaches it too).
  Flagged above 0.5 cc.
- ``contrast``: the DICOM ContrastBolusAgent (value 1 when one is named, 0 when the header says none or is silent;
  None for inputs without headers). No image-based test is attempted: telling an enhanced aorta from a plain one
  needs a segmentation.

Near-duplicate reconstructions need other volumes and are checked per cohort (``xwin.pipeline.splits``).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Integer

from xwin.pipeline.body import BODY_HU, components, table_parts
from xwin.pipeline.ingest.kernels import KERNEL_LOCK, block_max_and_count
from xwin.schemas.ingest import QCCheck

QC_CHECKS = ("truncated", "table", "hu_air", "hu_tissue", "metal", "contrast")


def _reduce(hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Every k-th voxel in-plane so that the step is about 4 mm (no interpolation: thresholds only)."""
    k = max(1, round(4.0 / max(min(spacing[0], spacing[1]), 1e-3)))
    return hu[::k, ::k, :], (spacing[0] * k, spacing[1] * k, spacing[2])


def _peak(values: np.ndarray, lo: int, hi: int) -> float | None:
    """Centre of the most populated 10 HU bin of ``values`` in [lo, hi) (None when empty)."""
    v = values[(values >= lo) & (values < hi)]
    if v.size == 0:
        return None
    counts = np.bincount((v.astype(np.int32) - lo) // 10)
    return float(lo + 10 * int(np.argmax(counts)) + 5)


def quality_checks(
    hu: Integer[np.ndarray, "X Y Z"],
    spacing_mm: tuple[float, float, float],
    contrast_agent: str | None = None,
    has_header: bool = True,
) -> list[QCCheck]:
    """Every check of the module docstring on one canonical volume."""
    hu = np.asarray(hu)
    small, (sx, sy, _) = _reduce(hu, spacing_mm)  # every k-th voxel: the histograms
    k = round(sx / spacing_mm[0])
    # one pass: each block's maximum (tissue anywhere in a block keeps thin parts such as a table top whole) and
    # the count of voxels at metal density
    with KERNEL_LOCK:
        bmax, n_metal = block_max_and_count(hu.astype(np.int16, copy=False), k, 3000)
    lab, sizes = components(bmax > BODY_HU)
    body = int(np.argmax(sizes))
    out: list[QCCheck] = []
    if body == 0:  # no body: truncation and table cannot be judged; the histogram, metal and contrast checks still run
        out.append(QCCheck(name="truncated", value=None, flagged=True, rule="a body must exist", detail="no body"))
        out.append(QCCheck(name="table", value=None, flagged=False, rule="needs a body", detail="no body"))
        return out + _value_checks(small, np.zeros(small.shape, bool), n_metal, spacing_mm, contrast_agent, has_header)
    bm = lab == body
    # truncated: contact of the body with the left, right and anterior borders, per slice
    contact_mm = np.maximum.reduce(
        [bm[0, :, :].sum(0) * sy, bm[-1, :, :].sum(0) * sy, bm[:, -1, :].sum(0) * sx]
    )  # (Z,)
    frac = float((contact_mm > 50.0).mean())
    out.append(
        QCCheck(
            name="truncated",
            value=round(frac, 4),
            flagged=frac > 0.25,
            rule="slices whose body touches the left/right/anterior border over > 50 mm: at most 25%",
            detail=f"longest contact {float(contact_mm.max()):.0f} mm",
        )
    )
    # table: a part apart from the body, posterior, wide, thin front to back, along most of the scan
    _, width = table_parts(lab, sizes, (sx, sy, spacing_mm[2]))
    out.append(
        QCCheck(
            name="table",
            value=round(width, 1),
            flagged=width > 0,
            rule="a part apart from the body, posterior, >= 150 mm wide, <= 80 mm thick, along >= 50% of z",
        )
    )
    return out + _value_checks(small, bm, n_metal, spacing_mm, contrast_agent, has_header)


def _value_checks(
    small: np.ndarray,
    bm: np.ndarray,
    n_metal: int,
    spacing_mm: tuple[float, float, float],
    contrast_agent: str | None,
    has_header: bool,
) -> list[QCCheck]:
    """The checks that need no body outline: the HU peaks, metal and contrast."""
    out: list[QCCheck] = []
    air = _peak(small[small != -1000], -1200, -700)  # padding became exactly -1000: it would hide a wrong rescale
    tissue = _peak(small[bm], -250, 200) if bm.any() else None
    out.append(
        QCCheck(
            name="hu_air",
            value=air,
            flagged=air is None or not (-1100.0 <= air <= -900.0),
            rule="air histogram peak in [-1100, -900] HU",
        )
    )
    out.append(
        QCCheck(
            name="hu_tissue",
            value=tissue,
            flagged=tissue is None or not (-200.0 <= tissue <= 150.0),
            rule="soft-tissue histogram peak inside the body in [-200, 150] HU",
        )
    )
    vox_cc = spacing_mm[0] * spacing_mm[1] * spacing_mm[2] / 1000.0
    metal_cc = float(n_metal * vox_cc)
    out.append(
        QCCheck(
            name="metal",
            value=round(metal_cc, 3),
            flagged=metal_cc > 0.5,
            rule="volume at >= 3000 HU at most 0.5 cc",
            detail="metal, wires, or undiluted IV contrast in a vein",
        )
    )
    agent = (contrast_agent or "").strip()
    none_words = {"", "NONE", "NO", "N/A", "NA", "-"}
    out.append(
        QCCheck(
            name="contrast",
            value=(1.0 if agent.upper() not in none_words else 0.0) if has_header else None,
            flagged=agent.upper() not in none_words,
            rule="DICOM ContrastBolusAgent names no agent",
            detail=f"ContrastBolusAgent {agent!r}" if agent else "",
        )
    )
    return out


def duplicate_score(
    hu_a: Integer[np.ndarray, "X Y Z"],
    affine_a: np.ndarray,
    hu_b: Integer[np.ndarray, "U V W"],
    affine_b: np.ndarray,
    step_mm: float = 4.0,
    min_overlap_mm: float = 40.0,
) -> float | None:
    """Pearson correlation of two volumes' HU on a common ``step_mm`` grid over the world box both cover (None when
    they overlap by less than ``min_overlap_mm`` along z). Two reconstructions of one acquisition (another kernel or
    slice thickness) score above 0.9; two exams of one subject (breathing, position) well below."""
    import scipy.ndimage as ndi

    def box(hu: np.ndarray, aff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[i, j, k, 1.0] for i in (0, hu.shape[0] - 1) for j in (0, hu.shape[1] - 1)
                            for k in (0, hu.shape[2] - 1)])  # fmt: skip
        w = (np.asarray(aff, float) @ corners.T).T[:, :3]
        return w.min(0), w.max(0)

    lo_a, hi_a = box(hu_a, affine_a)
    lo_b, hi_b = box(hu_b, affine_b)
    lo, hi = np.maximum(lo_a, lo_b), np.minimum(hi_a, hi_b)
    if np.any(hi - lo < step_mm) or hi[2] - lo[2] < min_overlap_mm:
        return None
    axes = [np.arange(lo[d], hi[d] + 1e-6, step_mm) for d in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    world = np.c_[grid, np.ones(len(grid))].T

    def sample(hu: np.ndarray, aff: np.ndarray) -> np.ndarray:
        ijk = (np.linalg.inv(np.asarray(aff, float)) @ world)[:3]
        return ndi.map_coordinates(np.asarray(hu, np.float32), ijk, order=1, mode="nearest")

    a, b = sample(hu_a, affine_a), sample(hu_b, affine_b)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
