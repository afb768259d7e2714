"""A stream of real chest radiographs (masked image modelling, domain adaptation): same tensors as the DRR stream.

Inputs: a directory of PNG / JPEG / DICOM files (searched recursively), or the MIMIC-CXR-JPG layout:
``<root>/mimic-cxr-2.0.0-metadata.csv[.gz]`` (columns dicom_id, subject_id, study_id, ViewPosition) and images at
``<root>/files/p<first 2 digits of subject>/p<subject>/s<study>/<dicom_id>.jpg``, filtered by ViewPosition
(default AP and PA).

Each image becomes ``image`` (1,S,S) float32 in [0,1] with bright bone (the -log-window look of the DRRs):
DICOM gets its modality and VOI LUTs and MONOCHROME1 is inverted; then the image is centre-cropped to a square
(shorter side), resized with antialiasing to S, and min-max normalised (X-WIN's per-image convention).
Bad images (unreadable, missing, wrong channels, tiny, blank) are skipped with a logged reason and counted in
``stream.skipped`` (per process); they never stop an epoch.
"""

from __future__ import annotations

import csv
import gzip
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xwin.pipeline.render import appearance
from xwin.schemas.cohort import SplitPolicy

from .stream import ResumableStream
from .transforms import resize

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MIMIC_CSV = "mimic-cxr-2.0.0-metadata.csv"


class BadImage(Exception):
    """An image the stream skips. ``reason``: unreadable | missing | wrong_channels | too_small | blank."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def find_mimic_csv(root: Path) -> Path | None:
    for name in (MIMIC_CSV, MIMIC_CSV + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def mimic_paths(csv_path: str | Path, views: Sequence[str] = ("AP", "PA")) -> list[str]:
    """Relative image paths of the MIMIC-CXR-JPG rows whose ViewPosition is in ``views``."""
    p = Path(csv_path)
    opener = gzip.open if p.suffix == ".gz" else open
    want = {v.upper() for v in views}
    out = []
    with opener(p, "rt", newline="") as f:
        r = csv.DictReader(f)
        missing = {"dicom_id", "subject_id", "study_id", "ViewPosition"} - set(r.fieldnames or [])
        if missing:
            raise ValueError(f"{p}: not a MIMIC-CXR metadata CSV (missing columns {sorted(missing)})")
        for row in r:
            if (row["ViewPosition"] or "").strip().upper() not in want:
                continue
            subj = row["subject_id"].strip()
            out.append(f"files/p{subj[:2]}/p{subj}/s{row['study_id'].strip()}/{row['dicom_id'].strip()}.jpg")
    return out


def real_subject(key: str, mimic: bool) -> str:
    """The subject of a real image's relative path: MIMIC's ``files/pXX/p<subject_id>/`` folder (with or without its
    metadata CSV), else the first folder."""
    parts = Path(key).parts
    if len(parts) > 3 and parts[0] == "files" and parts[1].startswith("p") and parts[2].startswith("p"):
        return parts[2][1:]
    if mimic:
        return parts[0]
    if len(parts) < 2:
        raise ValueError(f"{key}: a split of real images needs one folder per subject below the root")
    return parts[0]


def read_radiograph(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Any supported file -> (H,W) float32, bright = attenuating (bone). Raises BadImage.

    ``min_side``: the caller only needs an image whose sides are at least this long (it will shrink it anyway).
    JPEGs are then decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL ``Image.draft``), the largest
    reduction that keeps both sides >= ``min_side``: a MIMIC-CXR JPEG (~2500 x 3000) bound for 512² decodes at 1/4.
    """
    p = Path(path)
    if not p.is_file():
        raise BadImage("missing", f"no file {p}")
    if p.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(p)
    try:
        from PIL import Image

        with Image.open(p) as im:
            if min_side and im.format == "JPEG":
                im.draft(im.mode, (int(min_side), int(min_side)))
            im.load()
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    if arr.ndim == 3:
        c = arr.shape[2]
        if (
            c in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
        ) or c == 2:
            arr = arr[..., 0]
        else:
            raise BadImage("wrong_channels", f"{c}-channel colour image")
    if arr.ndim != 2:
        raise BadImage("wrong_channels", f"array of shape {arr.shape}")
    return arr.astype(np.float32)


def _read_dicom(p: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(p)
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    spp = int(getattr(ds, "SamplesPerPixel", 1))
    if spp != 1 or arr.ndim != 2:
        raise BadImage("wrong_channels", f"DICOM with SamplesPerPixel={spp}, pixel array {arr.shape}")
    try:
        arr = apply_modality_lut(arr, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds)
    except Exception as e:  # noqa: BLE001
        raise BadImage("unreadable", f"LUT: {type(e).__name__}: {e}") from None
    arr = np.asarray(arr, dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1: low values are bright; flip so bone is bright
    return arr


def to_tensor(arr: np.ndarray, size: int, min_size: int = 64) -> torch.Tensor:
    """(H,W) radiograph -> (1,size,size) float32 in [0,1]: centre square crop, antialiased resize, min-max."""
    h, w = arr.shape
    if min(h, w) < min_size:
        raise BadImage("too_small", f"{h}x{w} < {min_size} pixels")
    if not np.all(np.isfinite(arr)):
        raise BadImage("unreadable", "non-finite pixels")
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    t = torch.from_numpy(np.ascontiguousarray(arr[y0 : y0 + s, x0 : x0 + s], dtype=np.float32))[None, None]
    t = resize(t, size)[0]
    if not float(t.max()) > float(t.min()):
        raise BadImage("blank", "constant image")
    return appearance.minmax(t, eps=0.0).clamp_(0.0, 1.0)


class RealCXRStream(ResumableStream):
    """Real radiographs as ``{"image": (1,S,S), "path": str, "position", "epoch"}`` with the stream guarantees.

    root: a directory of images, or a MIMIC-CXR-JPG root (detected by its metadata CSV, or given ``mimic_csv``).
    views: MIMIC ViewPosition filter. Other keyword arguments: ``ResumableStream`` (seed, batch_size, ...).
    split: only the images of subjects in that split of ``split_policy`` (default ``SplitPolicy()``: train 0.8, val
    0.1, test 0.1), assigned per subject by the same hash as CT cohorts (``xwin.pipeline.splits``). The subject is
    MIMIC's ``subject_id``, or for a plain directory the first folder below the root (one folder per patient).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int = 512,
        mimic_csv: str | Path | None = None,
        views: Sequence[str] = ("AP", "PA"),
        min_size: int = 64,
        split: str | None = None,
        split_policy: SplitPolicy | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.split = split
        self.split_policy = split_policy or SplitPolicy()
        if split is not None and split not in self.split_policy.fractions:
            raise ValueError(f"split {split!r} is not one of {sorted(self.split_policy.fractions)}")
        self.root = Path(root)
        self.image_size = int(image_size)
        self.mimic_csv = Path(mimic_csv) if mimic_csv is not None else find_mimic_csv(self.root)
        self.views = tuple(views)
        self.min_size = int(min_size)
        self.skipped: Counter[str] = Counter()
        self._skip_lock = threading.Lock()

    def batch_layout(self, b: int) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Batches stack their images into one reusable buffer (``ResumableStream._collate``)."""
        S = self.image_size
        return {"image": (0, (b, 1, S, S))}

    def _keys(self) -> list[str]:
        keys = self._all_keys()
        if self.split is None:
            return keys
        from xwin.pipeline.splits import split_for, unit_hash

        pol = self.split_policy
        out = []
        for k in keys:
            subject = real_subject(k, mimic=self.mimic_csv is not None)
            if split_for(unit_hash(pol.salt, subject), pol.fractions) == self.split:
                out.append(k)
        return out

    def _all_keys(self) -> list[str]:
        if self.mimic_csv is not None:
            return mimic_paths(self.mimic_csv, self.views)
        if not self.root.is_dir():
            raise FileNotFoundError(f"real CXR root {self.root} is not a directory")
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )

    def _load(self, key: str, draw: int, rng: np.random.Generator) -> dict | None:
        try:
            arr = read_radiograph(self.root / key, min_side=max(self.image_size, self.min_size))
            img = to_tensor(arr, self.image_size, self.min_size)
        except BadImage as e:
            with self._skip_lock:
                self.skipped[e.reason] += 1
            log.warning("real CXR skipped: %s: %s (%s)", key, e.reason, e.detail)
            return None
        return {"image": img, "path": key}
