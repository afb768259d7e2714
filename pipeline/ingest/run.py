"""``ingest_sources``: plan -> skip what the store has -> load -> write. Every input ends in one list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from xwin.pipeline.ingest.config import IngestConfig
from xwin.pipeline.ingest.errors import IngestError
from xwin.pipeline.ingest.load import load_candidate
from xwin.pipeline.ingest.plan import plan_inputs, plan_manifest
from xwin.schemas.ingest import Rejection, RunEntry, RunSummary, VolumeRecord


class VolumeStore(Protocol):
    """The part of ``xwin.storage.open_store(url)`` that ingest uses."""

    def has_volume(self, volume_id: str) -> bool: ...

    def write_volume(self, record: VolumeRecord, hu: np.ndarray) -> bool: ...


def ingest_sources(
    sources: Sequence[str | Path],
    cohort: str,
    store: VolumeStore,
    config: IngestConfig | None = None,
    manifests: Sequence[str | Path] = (),
    on_entry: Callable[[str, RunEntry | Rejection], None] | None = None,
) -> RunSummary:
    """Ingest sources (and NBIA manifests) into ``store``; return the RunSummary.

    A candidate whose volume_id the store already has, or that an earlier input of the same run produced,
    is ``skipped`` without decoding pixels. A bad input becomes a Rejection and never stops the others; errors
    of the store itself propagate (the run cannot complete). ``on_entry(kind, entry)`` is called per result.
    """
    cfg = config or IngestConfig()
    cands, rejs = plan_inputs(list(sources), cohort, cfg)
    for m in manifests:
        more, more_rejs = plan_manifest(m, cohort, config=cfg)
        cands += more
        rejs += more_rejs
    summary = RunSummary(rejected=list(rejs))
    if on_entry:
        for rej in rejs:
            on_entry("rejected", rej)
    seen: set[str] = set()
    for c in cands:
        if c.volume_id in seen or store.has_volume(c.volume_id):
            entry = RunEntry(input=c.input, volume_id=c.volume_id, series_uid=c.series_uid)
            summary.skipped.append(entry)
            kind = "skipped"
        else:
            try:
                record, hu = load_candidate(c)
            except IngestError as e:
                rejection = Rejection(
                    input=c.input, reason=e.reason, detail=e.detail, series_uid=e.series_uid or c.series_uid
                )
                summary.rejected.append(rejection)
                if on_entry:
                    on_entry("rejected", rejection)
                continue
            store.write_volume(record, hu)
            del hu
            entry = RunEntry(input=c.input, volume_id=c.volume_id, series_uid=c.series_uid)
            summary.done.append(entry)
            kind = "done"
        seen.add(c.volume_id)
        if on_entry:
            on_entry(kind, entry)
    return summary
