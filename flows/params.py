"""The parameters of one backfill run: JSON-able, so they are also the deployments' parameters."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict

from xwin.flows import reports as rep
from xwin.schemas.render import RenderSpec

VerifyMode = Literal["none", "shallow", "deep"]


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
