"""Subject-level split assignment: deterministic, stable, grouped (docs/training-data.md, "Splits").

A subject's split is a pure function of (salt, subject or group, fractions): ``u = sha256(salt + ":" + key)`` read
as a number in [0, 1), placed on the cumulative fractions in the order given. The same inputs give the same split
on any machine. An assignment that exists is never changed: :func:`assign_splits` only adds subjects it has not seen
(so a later change of fractions or salt affects new subjects only), except that a subject on the exclusion list is
always moved out (to ``excluded``): keeping an evaluation subject out of training wins over stability.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np

from xwin.schemas.cohort import EXCLUDED, SplitPolicy, SplitsDoc, VolumeSplit


@dataclass(frozen=True)
class VolumeFacts:
    """What the assignment needs to know of one volume."""

    volume_id: str
    subject: str | None  # None: the volume is its own subject (e.g. a NIfTI without a subject id)
    study_uid: str | None = None
    study_date: str | None = None  # YYYYMMDD (DICOM DA), as stored
    manufacturer: str | None = None
    site: str | None = None

    @property
    def subject_key(self) -> str:
        return self.subject if self.subject else f"volume:{self.volume_id}"


def unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) determined by ``salt`` and ``key`` (sha256, first 52 bits)."""
    h = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return (int.from_bytes(h[:8], "big") >> 12) / float(1 << 52)


def split_for(u: float, fractions: Mapping[str, float]) -> str:
    """The split whose cumulative interval holds ``u`` (fractions in the order given)."""
    acc = 0.0
    last = ""
    for name, f in fractions.items():
        acc += f
        last = name
        if u < acc:
            return name
    return last  # u within rounding of 1


def _date(s: str | None) -> date | None:
    if not s:
        return None
    try:
        return datetime.strptime(s[:8], "%Y%m%d").replace(tzinfo=UTC).date()
    except ValueError:
        return None


def assign_splits(
    cohort: str,
    volumes: Iterable[VolumeFacts],
    policy: SplitPolicy,
    previous: SplitsDoc | None = None,
    exclude: Iterable[str] = (),
) -> tuple[SplitsDoc, list[str]]:
    """The assignment of ``volumes`` given the ``previous`` one. Returns (document, subjects moved to excluded).

    The policy of ``previous`` is kept when there is one (the one given applies only to a cohort without an
    assignment); subjects already assigned keep their split; volumes of a known subject take the subject's split."""
    vols = sorted(volumes, key=lambda v: v.volume_id)
    pol = previous.policy if previous is not None else policy
    subjects = dict(previous.subjects) if previous else {}
    groups = dict(previous.groups) if previous else {}
    excluded = set(previous.excluded) if previous else set()
    moved: list[str] = []
    for s in sorted(set(exclude)):
        if s in subjects and subjects[s] != EXCLUDED:
            moved.append(s)
        subjects[s] = EXCLUDED
        excluded.add(s)
    for v in vols:
        key = v.subject_key
        if key in subjects:
            continue
        if pol.group_by == "subject":
            subjects[key] = split_for(unit_hash(pol.salt, key), pol.fractions)
            continue
        gval = getattr(v, pol.group_by) or "unknown"
        if gval not in groups:
            groups[gval] = split_for(unit_hash(pol.salt, f"{pol.group_by}={gval}"), pol.fractions)
        subjects[key] = groups[gval]
    # timepoints: the order of a subject's distinct study dates (exams); volumes of one exam share it
    dates: dict[str, list[date]] = {}
    for v in vols:
        d = _date(v.study_date)
        if d is not None:
            dates.setdefault(v.subject_key, []).append(d)
    order = {s: sorted(set(ds)) for s, ds in dates.items()}
    out: dict[str, VolumeSplit] = dict(previous.volumes) if previous else {}
    for v in vols:
        key = v.subject_key
        d = _date(v.study_date)
        tp = off = None
        if d is not None:
            tp = order[key].index(d)
            off = (d - order[key][0]).days
        known = out.get(v.volume_id)
        if known is not None and known.subject != key:
            # the volume was assigned under another subject key (re-ingested under another de-identification):
            # it keeps its place, never moves between splits; the mismatch is reported by the caller
            continue
        out[v.volume_id] = VolumeSplit(subject=key, split=subjects[key], timepoint=tp, study_offset_days=off)
    for vid, vs in list(out.items()):  # volumes assigned earlier follow their subject (an exclusion moves them)
        if subjects.get(vs.subject, vs.split) != vs.split:
            out[vid] = vs.model_copy(update={"split": subjects[vs.subject]})
    doc = SplitsDoc(
        cohort=cohort,
        policy=pol,
        subjects=dict(sorted(subjects.items())),
        groups=dict(sorted(groups.items())),
        volumes=dict(sorted(out.items())),
        excluded=sorted(excluded),
    )
    return doc, moved


DUPLICATE_MIN_SCORE = 0.9


def duplicate_scores(
    facts: Iterable[VolumeFacts],
    load: Callable[[str], tuple[np.ndarray, np.ndarray]],
    skip: Callable[[str], bool] = lambda vid: False,
) -> dict[str, tuple[str, float]]:
    """Among the volumes of one exam (same subject and study date, or same study UID), each later volume (by id)
    -> (the earlier volume it correlates best with, that correlation). ``load(volume_id) -> (hu, affine)``;
    exams with one volume are never read, and volumes ``skip`` says are scored already are not scored again."""
    from xwin.pipeline.ingest.qc import duplicate_score

    exams: dict[tuple[str, str], list[str]] = {}
    for f in facts:
        exam = f.study_date or f.study_uid
        if exam:
            exams.setdefault((f.subject_key, exam), []).append(f.volume_id)
    out: dict[str, tuple[str, float]] = {}
    for ids in exams.values():
        ids = sorted(set(ids))
        todo = [vid for vid in ids[1:] if not skip(vid)]
        if not todo:
            continue
        loaded = {vid: load(vid) for vid in ids}
        for vid in todo:
            best: tuple[float, str] | None = None
            for ref in ids[: ids.index(vid)]:
                score = duplicate_score(*loaded[ref], *loaded[vid])
                if score is not None and (best is None or score > best[0]):
                    best = (score, ref)
            if best is not None:
                out[vid] = (best[1], round(best[0], 4))
    return out


def mark_duplicates(
    doc: SplitsDoc, scores: dict[str, tuple[str, float]], min_score: float = DUPLICATE_MIN_SCORE
) -> SplitsDoc:
    """Apply :func:`duplicate_scores` to an assignment: ``duplicate_of`` where the correlation is at least
    ``min_score`` (two reconstructions of one scan score ~0.99, two exams of one person far lower)."""
    vols = dict(doc.volumes)
    for vid, (ref, score) in scores.items():
        if vid in vols:
            vols[vid] = vols[vid].model_copy(
                update={"duplicate_of": ref if score >= min_score else None, "duplicate_score": score}
            )
    return doc.model_copy(update={"volumes": vols})
