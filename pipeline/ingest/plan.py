"""Planning: turn sources (NIfTI files, DICOM folders, NBIA manifests) into Candidates, cheaply.

Planning reads DICOM headers only (no pixels) and hashes NIfTI files; it leaves stray images out of each series,
chooses one series per study (the other valid ones are its fallbacks), validates their geometry and computes a
deterministic ``volume_id``, so a store can say "already have it" before any pixel is decoded. Every source
ends as Candidates or Rejections, never an exception, except an OSError of the file system while reading it
(``errors.is_read_failure``), which is no verdict on it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.dicom_headers import SliceHeader, group_series, is_nifti_name, iter_files, scan_paths
from xwin.pipeline.ingest.errors import IngestError, is_read_failure
from xwin.pipeline.ingest.selection import (
    SeriesSummary,
    excluded_images,
    rank_series,
    stray_counts,
    summarize_series,
    why_lower,
)
from xwin.pipeline.ingest.series_geometry import SeriesGeometry, series_geometry
from xwin.schemas.ingest import (
    Acquisition,
    ExcludedImage,
    InputKind,
    ManifestRow,
    Rejection,
    RejectReason,
    SeriesChoice,
)

R = RejectReason
EXAMPLE_SOURCE = "example"


@dataclass
class Candidate:
    """One planned input: everything ``load_candidate`` needs, nothing decoded. Picklable.

    input: the source as given (``path``, ``path#StudyUID`` when a folder holds several studies,
    ``manifest.csv#StudyUID`` for manifest studies). paths: DICOM files in slice order, or the NIfTI file.
    excluded_images: the chosen series' images left out of its axial stack. fallbacks: the study's other valid
    series, next-ranked first, each a complete Candidate of its own (its own volume_id), tried in order by
    ``load_candidate`` when this one fails to load.
    """

    input: str
    volume_id: str
    kind: InputKind
    cohort: str
    paths: list[str]
    config: IngestConfig = field(default_factory=IngestConfig)
    series_uid: str | None = None
    study_uid: str | None = None
    subject_id: str | None = None
    study_date: str | None = None
    sop_uids: list[str] = field(default_factory=list)
    series_choices: list[SeriesChoice] = field(default_factory=list)
    checksum: str | None = None  # NIfTI: sha256 of the file (DICOM: computed while loading)
    notes: list[str] = field(default_factory=list)
    excluded_images: list[ExcludedImage] = field(default_factory=list)
    fallbacks: list[Candidate] = field(default_factory=list)
    acquisition: Acquisition | None = None  # DICOM: the series' acquisition facts (NIfTI: none)


def make_volume_id(cohort: str, identity: dict, cfg: IngestConfig) -> str:
    """Deterministic id: sha256 over cohort, the input's identity (UIDs or content hash) and output settings."""
    blob = json.dumps({"cohort": cohort, "id": identity, "cfg": cfg.output_key()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- NIfTI
def plan_nifti(
    path: str | Path,
    cohort: str,
    config: IngestConfig | None = None,
    label: str | None = None,
    kind: InputKind = InputKind.nifti,
) -> Candidate:
    """Hash the file (content identity) and check the header parses. Raises IngestError."""
    cfg = config or IngestConfig()
    p = Path(path)
    label = label or str(path)
    if not p.is_file():
        raise IngestError(R.not_found, f"{label}: no such file")
    try:
        import nibabel as nib

        img: Any = nib.load(str(p))  # a NIfTI image (nibabel types it as the file-based base class)
        shape = img.shape
    except Exception as e:  # nibabel raises many types on a bad header
        if is_read_failure(e):  # the file system failed, not the header: the caller retries or fails it
            raise
        raise IngestError(R.unreadable_file, f"{label}: NIfTI header does not parse ({type(e).__name__}: {e})") from e
    digest = file_sha256(p)
    vid = make_volume_id(cohort, {"nifti_sha256": digest}, cfg)
    return Candidate(
        input=label,
        volume_id=vid,
        kind=kind,
        cohort=cohort,
        paths=[str(p)],
        config=cfg,
        checksum=digest,
        notes=[f"header shape {tuple(int(s) for s in shape)}"],
    )


# ---------------------------------------------------------------- DICOM
def _decodable(ts: str | None) -> bool:
    if ts is None:
        return True  # no file meta: implicit VR little endian
    try:
        return bool(get_decoder(UID(ts)).is_available)
    except Exception:  # noqa: BLE001 - a transfer syntax pydicom has no decoder entry for is not decodable
        return False


def _check_transfer_syntax(headers: list[SliceHeader]) -> None:
    bad = sorted({h.transfer_syntax for h in headers if not _decodable(h.transfer_syntax)}, key=str)
    if bad:
        names = ", ".join(f"{UID(str(t)).name} ({t})" for t in bad)
        raise IngestError(
            R.undecodable_pixels, f"no installed decoder for transfer syntax {names}", series_uid=headers[0].series_uid
        )


def plan_study(
    label: str,
    series: dict[str, list[SliceHeader]],
    cohort: str,
    cfg: IngestConfig,
    corrupt: Sequence[tuple[str, str]] = (),
    extra_choices: Sequence[SeriesChoice] = (),
    subject_id: str | None = None,
) -> Candidate:
    """Choose and validate one series of one study. Raises IngestError when no series is usable.

    Each series is reduced to its axial stack (stray images left out and recorded, ``split_strays``). Every usable
    series whose geometry validates becomes a candidate; the best is returned and the others, best first, are its
    ``fallbacks``: ``load_candidate`` loads the next one when a series fails to decode."""
    summaries = [summarize_series(uid, hs, cfg) for uid, hs in series.items()]
    usable, excluded = rank_series(summaries, cfg)
    base: list[SeriesChoice] = list(extra_choices)
    for s in excluded:
        assert s.exclusion is not None  # rank_series puts exactly the excluded series here
        code, detail = s.exclusion
        base.append(s.choice(f"{code.value}: {detail}"))
    failures: list[tuple[SeriesSummary, IngestError]] = []
    valid: list[tuple[SeriesSummary, SeriesGeometry]] = []
    for s in usable:
        try:
            g = series_geometry(s.stack, cfg)
            _check_transfer_syntax(g.headers)
        except IngestError as e:
            failures.append((s, e))
            continue
        valid.append((s, g))
    corrupt_note = ""
    if corrupt:
        corrupt_note = f"; {len(corrupt)} file(s) do not parse (e.g. {corrupt[0][0]}: {corrupt[0][1][:120]})"
    if not valid:
        if failures:
            err = failures[0][1]
            reason = err.reason
            if corrupt and reason in (R.missing_slices, R.nonuniform_spacing, R.inconsistent_geometry):
                reason = R.unreadable_file  # the gap is most likely the unreadable file
            extra = "" if len(failures) == 1 else f" (and {len(failures) - 1} other series failed validation)"
            raise IngestError(reason, f"{label}: {err.detail}{extra}{corrupt_note}", series_uid=err.series_uid)
        if not summaries:
            raise IngestError(
                R.unreadable_file if corrupt else R.empty_input, f"{label}: no DICOM series" + corrupt_note
            )
        exclusions = [(s.series_uid, s.exclusion) for s in excluded if s.exclusion is not None]
        codes = {x[0] for _, x in exclusions}
        reason = codes.pop() if len(codes) == 1 else R.no_usable_series
        detail = "; ".join(f"{uid}: {x[1]}" for uid, x in exclusions)
        raise IngestError(
            reason,
            f"{label}: no usable series ({detail}){corrupt_note}",
            series_uid=excluded[0].series_uid if len(excluded) == 1 else None,
        )
    for failed, err in failures:
        base.append(failed.choice(f"failed validation {err.reason.value}: {err.detail}"))
    cands = []
    for rank, (chosen, geom) in enumerate(valid):
        choices = list(base)
        for other_rank, (other, _) in enumerate(valid):
            if other_rank == rank:
                continue
            if other_rank < rank:  # replaced by its load failure when this candidate is the one loaded
                choices.append(other.choice("ranked higher: tried first"))
            else:
                choices.append(other.choice(why_lower(other, chosen, cfg)))
        what = f"chosen: {chosen.describe(cfg)}"
        if chosen.strays:
            what += f"; {len(chosen.strays)} stray image(s) left out ({stray_counts(chosen.strays)})"
        choices.insert(0, chosen.choice(what, chosen=True, n_slices=len(geom.headers)))
        cands.append(_study_candidate(label, cohort, cfg, chosen, geom, choices, subject_id, corrupt))
    cands[0].fallbacks = cands[1:]
    return cands[0]


def _study_candidate(
    label: str,
    cohort: str,
    cfg: IngestConfig,
    chosen: SeriesSummary,
    geom: SeriesGeometry,
    choices: list[SeriesChoice],
    subject_id: str | None,
    corrupt: Sequence[tuple[str, str]],
) -> Candidate:
    hs = geom.headers
    sops = [h.sop_uid for h in hs]
    vid = make_volume_id(cohort, {"series_uid": chosen.series_uid, "sop_uids": sorted(sops)}, cfg)
    notes = list(geom.notes)
    if chosen.strays:
        notes.append(
            f"left out {len(chosen.strays)} stray image(s) of series {chosen.series_uid} "
            f"({stray_counts(chosen.strays)}): see excluded_images"
        )
    if corrupt:
        notes.append(f"ignored {len(corrupt)} unparseable file(s) outside the chosen series")
    return Candidate(
        input=label,
        volume_id=vid,
        kind=InputKind.dicom,
        cohort=cohort,
        paths=[h.path for h in hs],
        config=cfg,
        series_uid=chosen.series_uid,
        study_uid=hs[0].study_uid,
        subject_id=hs[0].patient_id or subject_id,
        study_date=hs[0].study_date,
        sop_uids=sops,
        series_choices=choices,
        notes=notes,
        excluded_images=excluded_images(chosen.strays),
        acquisition=acquisition_of(hs[0]),
    )


def acquisition_of(h: SliceHeader) -> Acquisition:
    """The acquisition facts of a series, from one of its slices (docs/ingest.md, "Metadata kept")."""
    return Acquisition(
        study_date=h.study_date,
        manufacturer=h.manufacturer,
        model=h.model,
        site=h.site,
        kvp=h.kvp,
        kernel=h.kernel,
        slice_thickness_mm=h.slice_thickness,
        series_description=h.description,
        contrast_agent=h.contrast_agent,
    )


def plan_dicom_files(
    files: Iterable[str], label: str, cohort: str, cfg: IngestConfig
) -> tuple[list[Candidate], list[Rejection]]:
    """Plan DICOM files (a folder's content): one candidate per study; NIfTI files found among them too."""
    files = list(files)
    if not files:
        return [], [Rejection(input=label, reason=R.empty_input, detail=f"{label}: no files")]
    scan = scan_paths(files)
    cands: list[Candidate] = []
    rejs: list[Rejection] = []
    for p in scan.nifti:
        _try(lambda p=p: plan_nifti(p, cohort, cfg), p, cands, rejs)
    if not scan.headers:
        if scan.corrupt:
            p, err = scan.corrupt[0]
            rejs.append(
                Rejection(
                    input=label,
                    reason=R.unreadable_file,
                    detail=f"{label}: {len(scan.corrupt)} DICOM file(s) do not parse (e.g. {p}: {err})",
                )
            )
        elif not scan.nifti:
            rejs.append(
                Rejection(
                    input=label,
                    reason=R.empty_input,
                    detail=f"{label}: no DICOM or NIfTI file among {len(files)} file(s)",
                )
            )
        return cands, rejs
    studies = group_series(scan.headers)
    for study_uid, series in studies.items():
        lab = label if len(studies) == 1 else f"{label}#{study_uid}"
        _try(lambda lab=lab, series=series: plan_study(lab, series, cohort, cfg, scan.corrupt), lab, cands, rejs)
    return cands, rejs


def _try(fn, label: str, cands: list[Candidate], rejs: list[Rejection]) -> None:
    try:
        cands.append(fn())
    except IngestError as e:
        rejs.append(Rejection(input=label, reason=e.reason, detail=e.detail, series_uid=e.series_uid))
    except Exception as e:  # a bug or an exotic file must not stop the batch
        if is_read_failure(e):  # the file system failed: no verdict on the input (errors.is_read_failure)
            raise
        rejs.append(
            Rejection(
                input=label,
                reason=R.unreadable_file,
                detail=f"{label}: unexpected {type(e).__name__} while planning: {e}",
            )
        )


# ---------------------------------------------------------------- NBIA manifest
def read_manifest(csv_path: str | Path) -> tuple[list[tuple[int, ManifestRow]], list[Rejection]]:
    """Parse an NBIA metadata.csv: ([(line number, row)], rejections for rows that do not validate)."""
    rows: list[tuple[int, ManifestRow]] = []
    rejs: list[Rejection] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Series UID" not in reader.fieldnames or "File Location" not in reader.fieldnames:
            raise IngestError(R.manifest_error, f"{csv_path}: not an NBIA metadata.csv (header {reader.fieldnames})")
        for line, raw in enumerate(reader, start=2):
            try:
                row = ManifestRow.model_validate({k: v for k, v in raw.items() if k is not None})
                if not row.series_uid.strip() or not row.file_location.strip():
                    raise ValueError("empty Series UID or File Location")
                rows.append((line, row))
            except (ValidationError, ValueError) as e:
                rejs.append(
                    Rejection(
                        input=f"{csv_path}:{line}",
                        reason=R.manifest_error,
                        detail=f"{csv_path} line {line}: {str(e).splitlines()[0]}",
                    )
                )
    return rows, rejs


def resolve_location(loc: str, root: Path) -> Path:
    """NBIA ``File Location`` (``./NLST/...`` or ``.\\NLST\\...``) relative to ``root``."""
    rel = loc.strip().replace("\\", "/")
    p = Path(rel)
    return p if p.is_absolute() else root / rel


def _not_chosen(row: ManifestRow, reason: str) -> SeriesChoice:
    """The record of a manifest series left out before its files are read."""
    return SeriesChoice(series_uid=row.series_uid, chosen=False, reason=reason, n_slices=row.number_of_images or 0)


def plan_manifest(
    csv_path: str | Path, cohort: str, root: str | Path | None = None, config: IngestConfig | None = None
) -> tuple[list[Candidate], list[Rejection]]:
    """Plan an NBIA ``metadata.csv``: one candidate per study (input ``csv#StudyUID``).

    ``File Location`` is relative to ``root`` (default: the csv's folder). Series whose manifest Modality is not
    CT are excluded without reading them; missing folders are noted; a study whose folders are all missing is
    rejected ``not_found``; rows that do not validate are rejected ``manifest_error``.
    """
    cfg = config or IngestConfig()
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    try:
        rows, rejs = read_manifest(csv_path)
    except IngestError as e:
        return [], [Rejection(input=str(csv_path), reason=e.reason, detail=e.detail)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        if is_read_failure(e):
            raise
        return [], [Rejection(input=str(csv_path), reason=R.manifest_error, detail=f"{csv_path}: {e}")]
    studies: dict[str, list[ManifestRow]] = {}
    for _, row in rows:
        studies.setdefault(row.study_uid or f"series:{row.series_uid}", []).append(row)
    cands: list[Candidate] = []
    for study, srows in studies.items():
        label = f"{csv_path}#{study}"

        def one(label=label, srows=srows) -> Candidate:
            extra: list[SeriesChoice] = []
            files: list[str] = []
            missing: list[str] = []
            for row in srows:
                if row.modality and row.modality.upper() != "CT":
                    extra.append(_not_chosen(row, f"wrong_modality: manifest Modality {row.modality}"))
                    continue
                folder = resolve_location(row.file_location, base)
                if not folder.is_dir():
                    missing.append(str(folder))
                    extra.append(_not_chosen(row, f"not_found: {folder}"))
                    continue
                files.extend(iter_files(folder))
            if not files:
                if missing:
                    raise IngestError(R.not_found, f"{label}: series folder(s) not found: {', '.join(missing)}")
                raise IngestError(R.no_usable_series, f"{label}: no CT series in the manifest")
            scan = scan_paths(files)  # NIfTI files inside series folders are ignored
            if not scan.headers:
                if scan.corrupt:
                    raise IngestError(
                        R.unreadable_file,
                        f"{label}: {len(scan.corrupt)} DICOM file(s) do not parse (e.g. {scan.corrupt[0][0]})",
                    )
                raise IngestError(R.empty_input, f"{label}: no DICOM file in {len(files)} file(s)")
            series: dict[str, list[SliceHeader]] = {}
            for h in scan.headers:
                series.setdefault(h.series_uid, []).append(h)
            c = plan_study(label, series, cohort, cfg, scan.corrupt, extra, subject_id=srows[0].subject_id)
            if missing:
                c.notes.append(f"{len(missing)} series folder(s) from the manifest not found")
            return c

        _try(one, label, cands, rejs)
    return cands, rejs


# ---------------------------------------------------------------- any source
def plan_inputs(
    sources: Sequence[str | Path], cohort: str, config: IngestConfig | None = None
) -> tuple[list[Candidate], list[Rejection]]:
    """Plan every source: NIfTI file, DICOM folder (or single DICOM file), NBIA metadata.csv, or ``example``
    (the bundled chest CT). Returns (candidates, rejections); never raises for a bad source.

    An OSError of the file system while reading a source (``errors.is_read_failure``: EIO, a timeout, a stale
    handle, ...) is not a verdict on the source: it propagates, and callers that plan many sources plan them one
    at a time to retry or report that one source (``xwin.flows.tasks.plan_series``, ``ingest_sources``)."""
    cfg = config or IngestConfig()
    cands: list[Candidate] = []
    rejs: list[Rejection] = []
    for src in sources:
        label = str(src)
        if label == EXAMPLE_SOURCE:
            from xwin.pipeline.example import example_ct_path

            _try(
                partial(plan_nifti, example_ct_path(), cohort, cfg, label=label, kind=InputKind.example),
                label,
                cands,
                rejs,
            )
            continue
        p = Path(label).expanduser()
        if not p.exists():
            rejs.append(Rejection(input=label, reason=R.not_found, detail=f"{label}: no such file or directory"))
        elif p.is_dir():
            try:
                c, r = plan_dicom_files(iter_files(p), label, cohort, cfg)
            except Exception as e:  # one unreadable folder must not stop the batch
                if is_read_failure(e):
                    raise
                c, r = (
                    [],
                    [
                        Rejection(
                            input=label,
                            reason=R.unreadable_file,
                            detail=f"{label}: unexpected {type(e).__name__} while planning: {e}",
                        )
                    ],
                )
            cands += c
            rejs += r
        elif p.suffix.lower() == ".csv":
            c, r = plan_manifest(p, cohort, config=cfg)
            cands += c
            rejs += r
        elif is_nifti_name(p.name):
            _try(partial(plan_nifti, p, cohort, cfg, label=label), label, cands, rejs)
        else:
            c, r = plan_dicom_files([str(p)], label, cohort, cfg)
            cands += c
            rejs += r
    return cands, rejs
