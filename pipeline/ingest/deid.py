"""De-identification of what leaves the source (docs/ingest.md, "De-identification").

With a cohort salt (``IngestConfig.deid_salt``, kept secret: a public salt lets anyone hash the candidate ids and
match), a subject id is stored as ``"s-" + sha256(salt + ":" + id)[:16]`` and every study date of the subject is
shifted back by the same number of days (0-3649, from the salted hash): the intervals between a subject's exams,
and so its timepoints and the offsets from its first exam, stay exact; the calendar dates do not leave. Without a
salt nothing is changed: sources such as TCIA's NLST are de-identified by their publisher already (pseudonymous
pids, shifted dates).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta

from xwin.schemas.ingest import Acquisition


def _digest(salt: str, subject: str) -> bytes:
    return hashlib.sha256(f"{salt}:{subject}".encode()).digest()


def hashed_subject(subject: str, salt: str) -> str:
    return "s-" + _digest(salt, subject).hex()[:16]


HASHED_SUBJECT = re.compile(r"^s-[0-9a-f]{16}$")


def is_hashed_subject(subject: str) -> bool:
    """True for a subject id as :func:`hashed_subject` stores it (a raw id of that form is not expected)."""
    return bool(HASHED_SUBJECT.match(subject))


def date_shift_days(subject: str, salt: str) -> int:
    return int.from_bytes(_digest(salt, "date:" + subject)[:4], "big") % 3650


def shift_date(date: str | None, days: int) -> str | None:
    """YYYYMMDD moved back by ``days`` (None, or a date that does not parse, is dropped)."""
    if not date:
        return None
    try:
        d = datetime.strptime(date[:8], "%Y%m%d")
    except ValueError:
        return None
    return (d - timedelta(days=days)).strftime("%Y%m%d")


def deidentify(
    subject: str | None, acquisition: Acquisition | None, salt: str | None
) -> tuple[str | None, Acquisition | None]:
    """(stored subject id, stored acquisition facts) under the cohort's policy (module docstring)."""
    if not salt:
        return subject, acquisition
    if subject is None:
        if acquisition is not None and acquisition.study_date:  # no subject to key a shift on: drop the date
            acquisition = acquisition.model_copy(update={"study_date": None})
        return None, acquisition
    if acquisition is not None:
        acquisition = acquisition.model_copy(
            update={"study_date": shift_date(acquisition.study_date, date_shift_days(subject, salt))}
        )
    return hashed_subject(subject, salt), acquisition
