"""Subject-level split assignment: deterministic, stable, grouped (docs/training-data.md, "Splits").

A subject's split is a pure function of (salt, subject or group, fractions): ``u = sha256(salt + ":" + key)`` read
as a number in [0, 1), placed on the cumulative fractions in the order given. The same inputs give the same split
on any machine. An assignment that exists is never changed: :func:`assign_splits` only adds subjects it has not seen
(so a later change of fractions or salt affects new subjects only), except that a subject on the exclusion list is
always moved out (to ``excluded``): keeping an evaluation subject out of training wins over stability.

Subjects whose volumes hold one CT (equal exact fingerprints, or near-duplicate descriptors:
``xwin.schemas.ingest.ContentFingerprint``) are one group with one split, whatever ids they arrived with.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date

import numpy as np

from xwin.schemas.cohort import EXCLUDED, Binding, ContentLink, SplitPolicy, SplitsDoc, VolumeSplit


@dataclass(frozen=True)
class VolumeFacts:
    """What the assignment needs to know of one volume."""

    volume_id: str
    subject: str | None  # None: the volume is its own subject (e.g. a NIfTI without a subject id)
    study_uid: str | None = None
    study_date: str | None = None  # YYYYMMDD (DICOM DA), as stored
    manufacturer: str | None = None
    site: str | None = None
    exact: str | None = None  # ContentFingerprint.exact
    near: np.ndarray | None = field(default=None, compare=False)  # the int8 near-duplicate descriptor

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
    if not s or len(s) < 8 or not s[:8].isdigit():
        return None
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


def content_links(vols: Iterable[VolumeFacts]) -> list[ContentLink]:
    """Links between volumes holding one CT: equal exact fingerprints (each copy linked to the first by id), and
    near-duplicate descriptors of different subjects (``xwin.pipeline.neardup``: one descriptor per exact
    fingerprint is searched)."""
    from xwin.pipeline.neardup import near_pairs

    by_exact: dict[str, list[str]] = {}
    reps: list[VolumeFacts] = []
    searched: set[str] = set()
    for v in sorted(vols, key=lambda v: v.volume_id):
        if v.exact is None:
            if v.near is not None:
                reps.append(v)
            continue
        if v.near is not None and v.exact not in searched:  # the first copy that has a descriptor
            searched.add(v.exact)
            reps.append(v)
        by_exact.setdefault(v.exact, []).append(v.volume_id)
    links = [
        ContentLink(volumes=(ids[0], other), how="exact", score=1.0) for ids in by_exact.values() for other in ids[1:]
    ]
    if len(reps) > 1:
        q = np.stack([np.asarray(v.near) for v in reps])
        subject_ids: dict[str, int] = {}
        groups = np.asarray([subject_ids.setdefault(v.subject_key, len(subject_ids)) for v in reps])
        pairs = near_pairs(q, groups=groups)  # volumes of one subject share its split anyway
        pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
        links += [
            ContentLink(volumes=(reps[i].volume_id, reps[j].volume_id), how="near", score=round(sc, 4))
            for i, j, sc in pairs
        ]
    return links


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        p = self.parent.setdefault(x, x)
        while p != self.parent[p]:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def assign_splits(
    cohort: str,
    volumes: Iterable[VolumeFacts],
    policy: SplitPolicy,
    previous: SplitsDoc | None = None,
    exclude: Iterable[str] = (),
    links: Iterable[ContentLink] | None = None,
) -> tuple[SplitsDoc, list[str]]:
    """The assignment of ``volumes`` given the ``previous`` one. Returns (document, subjects moved to excluded).

    The policy of ``previous`` is kept when there is one (the one given applies only to a cohort without an
    assignment); subjects already assigned keep their split; volumes of a known subject take the subject's split.

    Subjects whose volumes hold one CT (``links``, default :func:`content_links` of ``volumes``, plus the links of
    ``previous``'s bindings) form one group with one split: an already-assigned member's split wins (members
    assigned to different splits before keep theirs, and the binding reports the conflict, as it reports new members
    taken away from their ``group_by`` group's split); a group of new subjects
    takes the split of its first subject key. A group with an excluded member is excluded whole. A volume assigned
    before under another subject key keeps its split, and its current subject counts as assigned to that split."""
    vols = sorted(volumes, key=lambda v: v.volume_id)
    explicit = set(exclude)
    pol = previous.policy if previous is not None else policy
    subjects = dict(previous.subjects) if previous else {}
    groups = dict(previous.groups) if previous else {}
    excluded = set(previous.excluded) if previous else set()
    moved: list[str] = []
    for s in sorted(explicit):
        if s in subjects and subjects[s] != EXCLUDED:
            moved.append(s)
        subjects[s] = EXCLUDED
        excluded.add(s)
    # content groups: union-find over subject keys, joined by links between their volumes
    subject_of = {v.volume_id: v.subject_key for v in vols}
    known = {link.volumes: link for b in (previous.bindings if previous else []) for link in b.links}
    found = content_links(vols) if links is None else list(links)
    uf = _UnionFind()
    used: list[ContentLink] = []
    for link in [*known.values(), *found]:
        a, b = (subject_of.get(x) for x in link.volumes)
        if a is not None and b is not None and uf.union(a, b):
            used.append(link)
    members: dict[str, list[str]] = {}
    for key in sorted(set(subject_of.values())):
        members.setdefault(uf.find(key), []).append(key)
    first_volume: dict[str, VolumeFacts] = {}
    for v in vols:
        first_volume.setdefault(v.subject_key, v)
    links_of: dict[str, list[ContentLink]] = {}
    for link in used:
        links_of.setdefault(uf.find(subject_of[link.volumes[0]]), []).append(link)
    # a volume assigned before under another subject key (re-ingested under another de-identification) keeps its
    # split (below): its new subject is placed by it, so that the subject's other volumes join it
    carried: dict[str, str] = {}
    for v in vols:
        pv = previous.volumes.get(v.volume_id) if previous else None
        if pv is not None and pv.subject != v.subject_key:
            carried.setdefault(v.subject_key, subjects.get(pv.subject, pv.split))
    bindings: list[Binding] = []
    order = list(pol.fractions)
    for root, keys in sorted(members.items()):
        fixed = {k: subjects[k] if k in subjects else carried[k] for k in keys if k in subjects or k in carried}
        conflict = None
        if any(x == EXCLUDED for x in fixed.values()):
            split = EXCLUDED
            for k in keys:
                if subjects.get(k, EXCLUDED) != EXCLUDED:
                    moved.append(k)
                excluded.add(k)
                subjects[k] = EXCLUDED
        elif fixed:
            count = Counter(fixed.values())
            split = max(count, key=lambda x: (count[x], -order.index(x) if x in order else -len(order)))
            if len(count) > 1:
                conflict = "assigned to different splits before they were bound (they keep them): " + ", ".join(
                    f"{k} {x}" for k, x in sorted(fixed.items())
                )
            if pol.group_by != "subject":  # new members follow the group, away from their own group's split: say so
                strays = []
                for k in keys:
                    gv = getattr(first_volume[k], pol.group_by) or "unknown"
                    own = groups.get(gv) or split_for(unit_hash(pol.salt, f"{pol.group_by}={gv}"), pol.fractions)
                    if k not in fixed and own != split:
                        strays.append(f"{k} ({pol.group_by} {gv}: {own})")
                if strays:
                    why = f"bound away from their {pol.group_by} group's split: {', '.join(strays)}; all in {split}"
                    conflict = f"{conflict}; {why}" if conflict else why
        elif pol.group_by == "subject":
            split = split_for(unit_hash(pol.salt, keys[0]), pol.fractions)
        else:
            gvals = sorted({getattr(first_volume[k], pol.group_by) or "unknown" for k in keys})
            gval = getattr(first_volume[keys[0]], pol.group_by) or "unknown"
            if gval not in groups:
                groups[gval] = split_for(unit_hash(pol.salt, f"{pol.group_by}={gval}"), pol.fractions)
            split = groups[gval]
            if len(gvals) > 1:
                conflict = f"binds subjects of {len(gvals)} {pol.group_by} groups ({', '.join(gvals)}); all in {split}"
        for k in keys:
            subjects.setdefault(k, split)
        if len(keys) > 1:
            bindings.append(Binding(subjects=keys, split=split, links=links_of.get(root, []), conflict=conflict))
    # timepoints: the order of a subject's distinct study dates (exams); volumes of one exam share it
    dates: dict[str, list[date]] = {}
    for v in vols:
        d = _date(v.study_date)
        if d is not None:
            dates.setdefault(v.subject_key, []).append(d)
    tp_order = {s: sorted(set(ds)) for s, ds in dates.items()}
    out: dict[str, VolumeSplit] = dict(previous.volumes) if previous else {}
    for v in vols:
        key = v.subject_key
        d = _date(v.study_date)
        tp = off = None
        if d is not None:
            tp = tp_order[key].index(d)
            off = (d - tp_order[key][0]).days
        known_vol = out.get(v.volume_id)
        if known_vol is not None and known_vol.subject != key:
            # the volume was assigned under another subject key (re-ingested under another de-identification):
            # it keeps its place, never moves between splits; the mismatch is reported by the caller
            continue
        out[v.volume_id] = VolumeSplit(subject=key, split=subjects[key], timepoint=tp, study_offset_days=off)
    for vid, vs in list(out.items()):  # volumes assigned earlier follow their subject (an exclusion moves them)
        if subjects.get(vs.subject, vs.split) != vs.split:
            out[vid] = vs.model_copy(update={"split": subjects[vs.subject]})
    for v in vols:  # a volume kept under its earlier subject key is excluded when its current subject is
        if subjects.get(v.subject_key) == EXCLUDED and out[v.volume_id].split != EXCLUDED:
            out[v.volume_id] = out[v.volume_id].model_copy(update={"split": EXCLUDED})
            if v.subject_key not in moved:  # one of its volumes was assigned before: the caller warns
                moved.append(v.subject_key)
    doc = SplitsDoc(
        cohort=cohort,
        policy=pol,
        subjects=dict(sorted(subjects.items())),
        groups=dict(sorted(groups.items())),
        volumes=dict(sorted(out.items())),
        excluded=sorted(excluded),
        bindings=bindings,
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
