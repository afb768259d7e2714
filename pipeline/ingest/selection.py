"""Choose one series per study, the way public NLST code does (docs/ingest.md, REFERENCE §6).

Excluded outright: non-CT modality, localizers/scouts, non-axial series, series with too few slices.
Remaining series are ranked: thin slices (<= 2.5 mm) first, then soft kernels, then the most slices, then the
SeriesInstanceUID (deterministic). The caller validates the geometry of the best one and falls back to the next
if it fails; every series ends with a :class:`xwin.schemas.SeriesChoice` saying why it was or was not chosen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.dicom_headers import SliceHeader
from xwin.schemas.ingest import RejectReason, SeriesChoice

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


@dataclass
class SeriesSummary:
    """Header summary of one series used for ranking."""

    series_uid: str
    headers: list[SliceHeader]
    n_slices: int
    thickness_mm: float | None
    kernel: str | None
    exclusion: tuple[RejectReason, str] | None  # why it can never be chosen

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


def summarize_series(series_uid: str, headers: list[SliceHeader], cfg: IngestConfig) -> SeriesSummary:
    h0 = headers[0]
    n_unique = len({h.sop_uid for h in headers})
    exclusion: tuple[RejectReason, str] | None = None
    modalities = {h.modality for h in headers}
    if modalities != {"CT"}:
        exclusion = (RejectReason.wrong_modality, f"Modality {sorted(str(m) for m in modalities)}, not CT")
    elif any(h.is_localizer for h in headers):
        exclusion = (
            RejectReason.localizer,
            f"localizer/scout (ImageType {'/'.join(h0.image_type)}, description {h0.description!r})",
        )
    elif h0.iop is not None and abs(np.cross(h0.iop[:3], h0.iop[3:])[2]) < cfg.min_axial_cos:
        exclusion = (RejectReason.not_axial, f"ImageOrientationPatient {list(h0.iop)} is not axial")
    elif n_unique < cfg.min_slices:
        exclusion = (RejectReason.too_few_slices, f"{n_unique} image(s) < minimum {cfg.min_slices}")
    return SeriesSummary(
        series_uid=series_uid,
        headers=headers,
        n_slices=n_unique,
        thickness_mm=_thickness(headers),
        kernel=h0.kernel,
        exclusion=exclusion,
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
