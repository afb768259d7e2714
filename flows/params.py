"""The parameters of one backfill run: JSON-able, so they are also the deployments' parameters."""

from __future__ import annotations

import functools
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from xwin.flows import reports as rep
from xwin.pipeline.ingest.config import IngestConfig
from xwin.schemas.render import RenderSpec

VerifyMode = Literal["none", "shallow", "deep"]


def qc_reject(policy: str) -> tuple[str, ...]:
    """``"flag"`` -> (); ``"reject:truncated,metal"`` -> ("truncated", "metal") (checked against the checks)."""
    from xwin.pipeline.ingest.qc import QC_CHECKS

    if policy == "flag":
        return ()
    kind, _, names = policy.partition(":")
    checks = tuple(n.strip() for n in names.split(",") if n.strip())
    if kind != "reject" or not checks:
        raise ValueError(f"qc policy {policy!r}: use 'flag' or 'reject:CHECK,...' with checks from {list(QC_CHECKS)}")
    unknown = sorted(set(checks) - set(QC_CHECKS))
    if unknown:
        raise ValueError(f"qc policy {policy!r}: unknown check(s) {unknown}; the checks are {list(QC_CHECKS)}")
    return checks


@functools.cache
def label_map(csv_path: str) -> dict[str, str]:
    """input -> labelmap of a labels CSV (columns input, labels; relative label paths are from the CSV's folder)."""
    import csv
    from pathlib import Path

    p = Path(csv_path)
    if not p.is_file():
        raise ValueError(f"labels {csv_path!r}: not 'example' and not a CSV file")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"input", "labels"} <= set(rows[0]):
        raise ValueError(f"labels CSV {csv_path}: needs columns input and labels")
    return {r["input"]: str((p.parent / r["labels"]).resolve()) for r in rows if r.get("labels")}


def check_shard(shard: str | None) -> str | None:
    """``shard`` as "i/n" with integers 0 <= i < n (None: no sharding); anything else raises ValueError."""
    if shard is None:
        return None
    i, sep, n = shard.partition("/")
    try:
        if not sep:
            raise ValueError
        a, b = int(i), int(n)
    except ValueError:
        raise ValueError(f"shard {shard!r}: use i/n, e.g. 0/4 for the first of 4 shards") from None
    if not 0 <= a < b:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return shard


class BackfillParams(BaseModel):
    """Everything one backfill run needs (all JSON-able: these are the deployment parameters too)."""

    model_config = ConfigDict(extra="forbid")

    cohort: str
    store: str
    source: list[str] | None = None  # NIfTI files, DICOM folders, metadata.csv, or "example"
    manifest: str | None = None  # NBIA metadata.csv
    manifest_root: str | None = None
    spec: RenderSpec = RenderSpec()
    backend: str | None = None  # None: XWIN_RENDER_BACKEND or "auto" (resolved on the worker)
    limit: int | None = None  # at most this many planned series (after sharding), in plan order
    shard: str | None = None  # "i/n": only sources (manifest: series) whose id hashes to i mod n
    verify: VerifyMode = "shallow"
    previews: int = 4  # views per preview montage (0: none)
    reports: str | None = None  # default: "<store>-reports"
    # quality checks at ingest: "flag" (record, never reject) or "reject:CHECK,..." (docs/ingest.md)
    qc: str = "flag"
    # labels projected with each ring (docs/render.md, "Labels"): "example" (the bundled labelmap, for the example
    # source), or a CSV with columns input,labels mapping each source as given to a labelmap file or folder
    labels: str | None = None

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        return check_shard(v)

    @field_validator("qc")
    @classmethod
    def _qc(cls, v: str) -> str:
        qc_reject(v)
        return v

    def ingest_config(self) -> IngestConfig:
        """The ingest settings of this run; the de-identification salt comes from XWIN_DEID_SALT (a secret: never a
        parameter, so it is not stored with the deployment or the flow run)."""
        return IngestConfig(qc_reject=qc_reject(self.qc), deid_salt=os.environ.get("XWIN_DEID_SALT") or None)

    def label_source(self, input: str) -> str | None:
        """The labelmap of the series planned from ``input`` (None: no labels)."""
        if self.labels is None:
            return None
        if self.labels == "example":
            return "example" if input == "example" else None
        return label_map(self.labels).get(input)

    def sources(self) -> list[str]:
        if self.source:
            return list(self.source)
        if self.manifest:
            return []
        if self.cohort == "example":
            return ["example"]
        raise ValueError("give source paths or a manifest (only cohort 'example' has a default source)")

    def reports_url(self) -> str:
        return self.reports or rep.reports_url(self.store)

    def backend_name(self) -> str:
        return self.backend or os.environ.get("XWIN_RENDER_BACKEND") or "auto"
