"""Choose one series per study, the way public NLST code does (docs/ingest.md, REFERENCE §6).

First each series is split into its axial stack and stray images (:func:`split_strays`: localizers, secondary
captures, dose reports, images of another orientation or size that share the SeriesInstanceUID); the strays are
left out and recorded. Excluded outright: series with no CT image left, localizer-only series, non-axial series,
series with too few slices.
Remaining series are ranked: thin slices (<= 2.5 mm) first, then soft kernels, then the most slices, then the
SeriesInstanceUID (deterministic). The caller validates the geometry of the best one and falls back to the next
if it fails; every series ends with a :class:`xwin.schemas.SeriesChoice` saying why it was or was not chosen.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.dicom_headers import SliceHeader
from xwin.schemas.ingest import ExcludedImage, RejectReason, SeriesChoice, StrayReason

# SOP classes of CT images; anything else sharing a CT series (secondary capture, dose SR, ...) is not in its stack.
CT_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
# Direction cosines differing by more than this (about 0.6 deg) are another orientation: such images are strays.
# Smaller differences stay in the stack, where series_geometry rejects them (inconsistent_geometry) beyond 1e-4.
STRAY_IOP_DIFF = 0.01

_SIEMENS = re.compile(r"^[BIDHJQTUVY]R?(\d{2})[A-Z]?", re.I)  # B30f, I26f, Br40, Qr36 ...
_TOSHIBA = re.compile(r"^FC(\d{2})", re.I)
SOFT_WORDS = ("STANDARD", "SOFT", "SMOOTH", "BODY", "ABDOMEN", "MEDIASTIN", "STND")
SHARP_WORDS = ("LUNG", "BONE", "SHARP", "EDGE", "DETAIL", "CHEST", "HIGH", "ULTRA", "YA", "YB", "YC", "YD")


def kernel_class(kernel: str | None) -> str:
    """'soft' | 'sharp' | 'unknown' for a ConvolutionKernel string.

    Siemens B/I/Br/Qr <= 40 (B30f, B31f, I26f) and Toshiba FC01-FC19 and GE STANDARD/SOFT and Philips A/B/C are
    soft; Siemens >= 41 (B50f, B70f), Toshiba >= FC20, GE LUNG/BONE/BONEPLUS/EDGE/DETAIL, Philips D/E/L/Y* sharp.
    """
    if not kernel:
        return "unknown"
    k = kernel.split("\\")[0].strip().upper()
    m = _TOSHIBA.match(k)
    if m:
        return "soft" if int(m.group(1)) < 20 else "sharp"
    m = _SIEMENS.match(k)
    if m:
        return "soft" if int(m.group(1)) <= 40 else "sharp"
    if any(w in k for w in SOFT_WORDS):
        return "soft"
    if any(w in k for w in SHARP_WORDS):
        return "sharp"
    if k in ("A", "B", "C", "UB", "CB"):
        return "soft"
    if k in ("D", "E", "L", "EB", "LC"):
        return "sharp"
    return "unknown"


_KERNEL_RANK = {"soft": 0, "unknown": 1, "sharp": 2}


Stray = tuple[SliceHeader, StrayReason, str]  # (image, reason, detail)


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _axial_cos(iop: tuple[float, ...]) -> float:
    return float(abs(np.cross(iop[:3], iop[3:])[2]))


def split_strays(headers: list[SliceHeader], min_axial_cos: float = 0.7) -> tuple[list[SliceHeader], list[Stray]]:
    """(axial stack, stray images) of one series, headers only.

    An image is stray, checked in this order, when its SOPClassUID is not a CT image (secondary capture, dose SR),
    its Modality is not CT, it is a localizer/scout (ImageType or SeriesDescription), it lacks
    ImageOrientationPatient/ImagePositionPatient while other images have them, its orientation differs (by more
    than STRAY_IOP_DIFF in a direction cosine) from the stack's: the most common axial orientation of the remaining
    images (|normal . z| >= ``min_axial_cos``; the most common of all when none is axial; ties: the more axial),
    or its Rows x Columns differ from the most common size of those (ties: the larger). Stack and strays keep file
    order; the stack is empty when every image is stray (a localizer-only series)."""
    stack: list[SliceHeader] = []
    strays: list[Stray] = []
    for h in headers:
        if h.sop_class_uid and h.sop_class_uid.strip() not in CT_IMAGE_CLASSES:
            strays.append((h, StrayReason.not_ct_image, f"SOP class {_sop_class_name(h.sop_class_uid.strip())}"))
        elif h.modality != "CT":
            strays.append((h, StrayReason.wrong_modality, f"Modality {h.modality}"))
        elif h.is_localizer:
            why = f"ImageType {'/'.join(h.image_type)}, description {h.description!r}"
            strays.append((h, StrayReason.localizer, f"localizer/scout ({why})"))
        else:
            stack.append(h)
    if any(h.iop is not None and h.ipp is not None for h in stack):
        placed = []
        for h in stack:
            if h.iop is None or h.ipp is None:
                lacks = " and ".join(n for n, v in (("orientation", h.iop), ("position", h.ipp)) if v is None)
                strays.append((h, StrayReason.no_position, f"no image {lacks} (the other images have them)"))
            else:
                placed.append(h)
        stack = placed
        groups: list[tuple[np.ndarray, list[SliceHeader]]] = []
        for h in stack:
            iop = np.asarray(h.iop, float)
            for ref, members in groups:
                if np.max(np.abs(iop - ref)) <= STRAY_IOP_DIFF:
                    members.append(h)
                    break
            else:
                groups.append((iop, [h]))

        def rank(g: tuple[np.ndarray, list[SliceHeader]]) -> tuple:
            cos = _axial_cos(tuple(g[0]))
            return (cos >= min_axial_cos, len({h.sop_uid for h in g[1]}), cos)

        best_iop, stack = max(groups, key=rank)
        for _, members in groups:
            if members is stack:
                continue
            for h in members:
                detail = (
                    f"ImageOrientationPatient {[round(float(x), 6) for x in h.iop or ()]} vs the stack's "
                    f"{[round(float(x), 6) for x in best_iop]}"
                )
                strays.append((h, StrayReason.orientation, detail))
    sizes = Counter((h.rows, h.cols) for h in stack)
    if len(sizes) > 1:
        size = max(sizes, key=lambda rc: (sizes[rc], (rc[0] or 0) * (rc[1] or 0)))
        kept = []
        for h in stack:
            if (h.rows, h.cols) == size:
                kept.append(h)
            else:
                strays.append(
                    (h, StrayReason.size, f"Rows x Columns {h.rows}x{h.cols} vs the stack's {size[0]}x{size[1]}")
                )
        stack = kept
    order = {id(h): i for i, h in enumerate(headers)}
    strays.sort(key=lambda t: order[id(t[0])])
    return stack, strays


def excluded_images(strays: list[Stray]) -> list[ExcludedImage]:
    """The record of each stray image, in file order."""
    return [ExcludedImage(sop_uid=h.sop_uid, file=h.path, reason=r, detail=d) for h, r, d in strays]


def stray_counts(strays: list[Stray]) -> str:
    """'2 localizer, 1 size' (most common first)."""
    return ", ".join(f"{n} {r.value}" for r, n in Counter(r for _, r, _ in strays).most_common())


@dataclass
class SeriesSummary:
    """Header summary of one series used for ranking.

    headers: every image of the series; stack: the images of its axial stack (file order); strays: the rest."""

    series_uid: str
    headers: list[SliceHeader]
    n_slices: int
    thickness_mm: float | None
    kernel: str | None
    exclusion: tuple[RejectReason, str] | None  # why it can never be chosen
    stack: list[SliceHeader] = field(default_factory=list)
    strays: list[Stray] = field(default_factory=list)

    def choice(self, reason: str, *, chosen: bool = False, n_slices: int | None = None) -> SeriesChoice:
        """The record of why this series was (``chosen``) or was not chosen; ``n_slices``: the slices kept."""
        return SeriesChoice(
            series_uid=self.series_uid,
            chosen=chosen,
            reason=reason,
            n_slices=self.n_slices if n_slices is None else n_slices,
            slice_thickness_mm=self.thickness_mm,
            kernel=self.kernel,
        )

    @property
    def kernel_class(self) -> str:
        return kernel_class(self.kernel)

    def rank_key(self, cfg: IngestConfig) -> tuple:
        thin = self.thickness_mm is not None and self.thickness_mm <= cfg.thin_slice_mm + 1e-6
        return (0 if thin else 1, _KERNEL_RANK[self.kernel_class], -self.n_slices, self.series_uid)

    def describe(self, cfg: IngestConfig) -> str:
        t = "unknown thickness" if self.thickness_mm is None else f"{self.thickness_mm:g} mm slices"
        thin = "thin" if self.rank_key(cfg)[0] == 0 else "thick"
        return f"{thin} ({t}), {self.kernel_class} kernel {self.kernel or '?'}, {self.n_slices} slices"


def _thickness(headers: list[SliceHeader]) -> float | None:
    vals = [h.slice_thickness for h in headers if h.slice_thickness]
    if vals:
        return float(np.median(vals))
    try:  # fall back to the median step of positions along the normal
        iop = np.asarray(headers[0].iop, float)
        n = np.cross(iop[:3], iop[3:])
        d = np.sort(np.array([h.ipp for h in headers], float) @ n)
        steps = np.diff(d)
        steps = steps[steps > 1e-3]
        return float(np.median(steps)) if steps.size else None
    except Exception:  # noqa: BLE001 - headers without usable positions: no spacing to rank by
        return None


def _all_stray(headers: list[SliceHeader], strays: list[Stray]) -> tuple[RejectReason, str]:
    """Why a series whose every image is stray cannot be chosen."""
    h0 = headers[0]
    modalities = {h.modality for h in headers}
    if "CT" not in modalities:
        return RejectReason.wrong_modality, f"Modality {sorted(str(m) for m in modalities)}, not CT"
    reasons = Counter(r for _, r, _ in strays)
    if set(reasons) == {StrayReason.localizer}:
        return RejectReason.localizer, (
            f"localizer/scout (ImageType {'/'.join(h0.image_type)}, description {h0.description!r})"
        )
    if 2 * reasons[StrayReason.localizer] >= len(strays):  # mostly localizers: a scout series with extras
        code, example = RejectReason.localizer, next(d for _, r, d in strays if r == StrayReason.localizer)
    else:
        code, example = RejectReason.wrong_modality, next(d for _, r, d in strays if r != StrayReason.localizer)
    return (
        code,
        f"no image of an axial CT stack: {len(strays)} stray image(s) ({stray_counts(strays)}; e.g. {example})",
    )


def summarize_series(series_uid: str, headers: list[SliceHeader], cfg: IngestConfig) -> SeriesSummary:
    stack, strays = split_strays(headers, cfg.min_axial_cos)
    exclusion: tuple[RejectReason, str] | None = None
    if not stack:
        exclusion = _all_stray(headers, strays)
        n_unique = len({h.sop_uid for h in headers})
    else:
        n_unique = len({h.sop_uid for h in stack})
        h0 = stack[0]
        if h0.iop is not None and _axial_cos(h0.iop) < cfg.min_axial_cos:
            exclusion = (RejectReason.not_axial, f"ImageOrientationPatient {list(h0.iop)} is not axial")
        elif n_unique < cfg.min_slices:
            exclusion = (RejectReason.too_few_slices, f"{n_unique} image(s) < minimum {cfg.min_slices}")
    base = stack or headers
    return SeriesSummary(
        series_uid=series_uid,
        headers=headers,
        n_slices=n_unique,
        thickness_mm=_thickness(base),
        kernel=base[0].kernel,
        exclusion=exclusion,
        stack=stack,
        strays=strays,
    )


def rank_series(summaries: list[SeriesSummary], cfg: IngestConfig) -> tuple[list[SeriesSummary], list[SeriesSummary]]:
    """(usable series best first, excluded series)."""
    usable = sorted((s for s in summaries if s.exclusion is None), key=lambda s: s.rank_key(cfg))
    excluded = [s for s in summaries if s.exclusion is not None]
    return usable, excluded


def why_lower(s: SeriesSummary, best: SeriesSummary, cfg: IngestConfig) -> str:
    """Human reason a usable series ranked below the chosen one."""
    a, b = s.rank_key(cfg), best.rank_key(cfg)
    if a[0] != b[0]:
        return f"ranked lower: thicker slices ({s.thickness_mm} mm > {cfg.thin_slice_mm} mm) than the chosen series"
    if a[1] != b[1]:
        return f"ranked lower: {s.kernel_class} kernel {s.kernel} vs {best.kernel_class} {best.kernel}"
    if a[2] != b[2]:
        return f"ranked lower: fewer slices ({s.n_slices} < {best.n_slices})"
    return "ranked lower: tie broken by SeriesInstanceUID"
