"""Cohort-level contracts: subject-level splits (which volumes a model may train, validate or test on).

A split is assigned per *subject* (a participant: NLST pid, DICOM PatientID), never per volume: NLST holds up to three
screening exams per participant and several reconstructions per exam, so a split by volume puts one person on both
sides. The assignment is stored in the store (``xwin.storage``) and only ever grows: a subject keeps its split.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SPLIT_NAMES_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
EXCLUDED = "excluded"  # the split of subjects on an exclusion list: in no training, validation or test stream


def _now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitPolicy(_Model):
    """How new subjects are assigned. ``fractions``: split name -> share (sum 1). ``salt``: mixed into the hash of
    each subject (or group) so that two cohorts, or two experiments, can draw independent splits. ``group_by``:
    ``subject`` (default), or a volume metadata field (``manufacturer``, ``site``) whose every subject lands in one
    split (all subjects of a scanner vendor held out together)."""

    fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    salt: str = "xwin-splits-v1"
    group_by: Literal["subject", "manufacturer", "site"] = "subject"

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one split is needed")
        for name, f in v.items():
            if not SPLIT_NAMES_RE.match(name) or name == EXCLUDED:
                raise ValueError(f"split name {name!r}: use [a-z][a-z0-9_-]*, not {EXCLUDED!r}")
            if not (0.0 < f <= 1.0):
                raise ValueError(f"split {name!r}: fraction {f} must lie in (0, 1]")
        if not math.isclose(sum(v.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions must sum to 1, got {sum(v.values()):.6g}")
        return v


class VolumeSplit(_Model):
    """One volume's place in the split: its subject (as stored: hashed when the cohort de-identifies), the
    timepoint of its exam within the subject (0 = first exam by study date; None without a date) and the split."""

    subject: str
    split: str
    timepoint: int | None = None
    study_offset_days: int | None = None  # days since the subject's first exam
    # a near-duplicate reconstruction of another volume of the same exam (same subject and study date), with the
    # correlation of their HU (xwin.pipeline.ingest.qc.duplicate_score); always in that volume's split
    duplicate_of: str | None = None
    duplicate_score: float | None = None


class ContentLink(_Model):
    """Why two volumes count as one CT: the same voxels (``exact``: equal exact fingerprints, score 1) or
    near-duplicate descriptors (``near``: their correlation, at least ``xwin.pipeline.neardup.NEAR_MIN``)."""

    volumes: tuple[str, str]
    how: Literal["exact", "near"]
    score: float


class Binding(_Model):
    """Subjects bound into one split because volumes of theirs hold one CT (a re-ingest under another
    de-identification, a second patient id, a second reconstruction of one acquisition). ``links``: the content links
    that joined them (one per subject joined). ``split``: the group's split; ``conflict``: set when members had been
    assigned to different splits before they were bound (they keep them: an assignment never changes)."""

    subjects: list[str]
    split: str
    links: list[ContentLink]
    conflict: str | None = None


class SplitsDoc(_Model):
    """The stored assignment of one cohort (``xwin splits assign``; read by the training streams)."""

    cohort: str
    policy: SplitPolicy
    subjects: dict[str, str] = Field(default_factory=dict)  # subject -> split; never changed once assigned
    groups: dict[str, str] = Field(default_factory=dict)  # group value -> split (group_by != "subject")
    volumes: dict[str, VolumeSplit] = Field(default_factory=dict)
    excluded: list[str] = Field(default_factory=list)  # subjects kept out of every split
    bindings: list[Binding] = Field(default_factory=list)  # subjects bound by content (only ever grows)
    updated_at: datetime = Field(default_factory=_now)

    def counts(self) -> dict[str, dict[str, int]]:
        """Subjects and volumes per split."""
        subj: dict[str, int] = {}
        for s in self.subjects.values():
            subj[s] = subj.get(s, 0) + 1
        vols: dict[str, int] = {}
        for v in self.volumes.values():
            vols[v.split] = vols.get(v.split, 0) + 1
        return {"subjects": dict(sorted(subj.items())), "volumes": dict(sorted(vols.items()))}

    def volumes_in(self, split: str) -> set[str]:
        return {vid for vid, v in self.volumes.items() if v.split == split}
