"""Scheduled landing scan and sharded fan-out, both thin wrappers over ``xwin.flows.backfill``.

``scan_landing`` (cron deployment): list a landing location (a local directory or an ``s3://bucket/prefix``),
pick the entries not seen before (ledger of name -> size/mtime/etag beside the store), stage S3 entries to a local
directory, and backfill only those. Entries whose series were all done, skipped or rejected go into the ledger;
entries with a failed series (an I/O error, a timeout, a full disk ... that outlived its retries: never a
rejection) or a failed copy from S3 do not, so the next tick retries them; nor do entries a stopped scan
(``xwin.flows.stop``) did not finish.

``backfill_sharded``: split one cohort over N worker flow runs (``run_deployment`` of ``backfill-cohort`` with
``shard="i/N"``); each series hashes to exactly one shard, and the storage claim makes a duplicate run harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow

from xwin.flows import reports as rep
from xwin.flows import stop
from xwin.flows.backfill import BackfillIncomplete, backfill_cohort, run_local
from xwin.flows.params import BackfillParams
from xwin.flows.tasks import error_text
from xwin.schemas.ingest import CancelledEntry, Failure, RunSummary
from xwin.schemas.render import RenderSpec
from xwin.storage import is_transient, s3_filesystem
from xwin.storage.retry import retry

log = logging.getLogger("xwin.flows.landing")
_SERIES_SUFFIXES = (".nii", ".nii.gz", ".csv")


def list_landing(landing: str) -> dict[str, str]:
    """Entries of the landing location -> fingerprint. An entry is a NIfTI/CSV file or a (DICOM) folder.

    Local: fingerprint = size + mtime (folders: file count + newest mtime). S3: ETag/size of objects.
    """
    out: dict[str, str] = {}
    if landing.startswith("s3://"):
        fs = s3_filesystem()
        root = landing[len("s3://") :].rstrip("/")
        for info in fs.ls(root, detail=True, refresh=True):
            name = info["name"].rsplit("/", 1)[-1]
            if info["type"] == "directory":
                files = fs.find(info["name"], detail=True)
                fp = f"{len(files)}:" + ",".join(sorted(str(v.get("ETag", v.get("size"))) for v in files.values()))
                out[f"s3://{info['name']}"] = hashlib.sha256(fp.encode()).hexdigest()[:16]
            elif name.lower().endswith(_SERIES_SUFFIXES):
                out[f"s3://{info['name']}"] = str(info.get("ETag") or info.get("size"))
        return out
    for p in sorted(Path(landing).expanduser().iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            newest = max((f.stat().st_mtime_ns for f in files), default=0)
            out[str(p)] = f"{len(files)}:{newest}"
        elif p.name.lower().endswith(_SERIES_SUFFIXES):
            st = p.stat()
            out[str(p)] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def _ledger_url(reports: str, cohort: str) -> str:
    return f"{reports}/landing/{cohort}.json"


def read_ledger(reports: str, cohort: str) -> dict[str, str]:
    txt = rep.read_text(_ledger_url(reports, cohort))
    return json.loads(txt) if txt else {}


def _stage(entry: str, staging: Path) -> str:
    """Copy an S3 entry (file or folder) to ``staging``; local entries are used in place."""
    if not entry.startswith("s3://"):
        return entry
    fs = s3_filesystem()
    key = entry[len("s3://") :]
    dst = staging / key.replace("/", "__")
    if fs.isdir(key):
        fs.get(key, str(dst), recursive=True)
    else:
        fs.get(key, str(dst))
    return str(dst)


class ScanIncomplete(BackfillIncomplete):
    """A landing scan in which some series failed (``summary.failed``) or that was stopped (``summary.cancelled``);
    ``entries`` are the landing entries the scan took up. Those not finished stay out of the ledger, so the next
    scan takes them up again."""

    def __init__(self, summary: RunSummary, entries: list[str]) -> None:
        if summary.failed:
            super().__init__(summary)
        else:
            self.summary, self.verify = summary, None
            RuntimeError.__init__(self, summary.cancel_line())
        self.entries = entries


def scan_once(
    landing: str,
    cohort: str,
    store: str,
    spec: RenderSpec | None = None,
    backend: str | None = None,
    staging: str | None = None,
    max_new: int | None = None,
    reports: str | None = None,
    runner: Any = None,
) -> tuple[RunSummary, list[str]]:
    """One scan: backfill the new entries of ``landing``. Returns (summary, entries processed).

    ``runner(params) -> RunSummary`` runs the backfill (default: the Prefect flow as a subflow inside a flow run,
    else the local driver). The summary accounts for every series of the new entries (done, skipped, rejected,
    failed), inputs named by their landing names. An entry goes into the ledger when none of its series failed;
    a copy from S3 that fails (after retries) fails the entry (stage "stage"). Raises :class:`ScanIncomplete`
    (after writing the ledger) when a series failed or the scan was stopped (``summary.cancelled``: those entries
    stay out of the ledger).
    """
    reports = reports or rep.reports_url(store)
    seen = read_ledger(reports, cohort)
    current = list_landing(landing)
    new = [e for e, fp in current.items() if seen.get(e) != fp]
    if max_new is not None:
        new = new[:max_new]
    if not new:
        return RunSummary(), []
    stage_failures: list[Failure] = []
    stage_cancelled: list[CancelledEntry] = []
    with _staging_dir(staging, any(e.startswith("s3://") for e in new)) as stage_dir:
        local: dict[str, str] = {}
        for e in new:
            if stop.requested():  # a stopped scan stages nothing more: the entry stays new
                stage_cancelled.append(CancelledEntry(input=e, stage="stage", started=False))
                continue
            try:
                local[retry(partial(_stage, e, stage_dir), what=f"staging {e}")] = e
            except Exception as err:  # noqa: BLE001 - one entry that cannot be copied must not stop the scan
                stage_failures.append(
                    Failure(input=e, stage="stage", error=error_text(err), retryable=is_transient(err))
                )
        summary = RunSummary()
        try:
            if local:
                params = BackfillParams(
                    cohort=cohort,
                    store=store,
                    source=list(local),
                    spec=spec or RenderSpec(),
                    backend=backend,
                    reports=reports,
                )
                try:
                    summary = runner(params) if runner else _default_runner(params)
                except BackfillIncomplete as e:
                    summary = e.summary
        finally:  # staged copies are only needed by this run (a failed entry is staged again next tick)
            for path, entry in local.items():
                if path != entry:
                    _remove(Path(path))
    summary = _name_landing_entries(summary, local).merge(RunSummary(failed=stage_failures, cancelled=stage_cancelled))
    unfinished = {f.input for f in summary.failed} | {c.input for c in summary.cancelled}
    for entry in new:  # an entry is finished unless one of its series failed or was cancelled
        if not any(i == entry or i.startswith((entry + "#", entry + "/")) for i in unfinished):
            seen[entry] = current[entry]
    rep.write_bytes(_ledger_url(reports, cohort), json.dumps(seen, indent=1, sort_keys=True).encode())
    if summary.failed or summary.cancelled:
        raise ScanIncomplete(summary, new)
    return summary, new


@contextmanager
def _staging_dir(staging: str | None, needed: bool) -> Iterator[Path]:
    """Where S3 entries are copied for one scan: ``staging`` / ``$XWIN_STAGING`` (kept), else a temporary directory
    made only when an entry needs staging and removed afterwards."""
    given = staging or os.environ.get("XWIN_STAGING")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        yield Path(given)
    elif not needed:
        yield Path(tempfile.gettempdir())  # unused: local entries are read in place
    else:
        with tempfile.TemporaryDirectory(prefix="xwin-landing-") as d:
            yield Path(d)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _name_landing_entries(summary: RunSummary, local: dict[str, str]) -> RunSummary:
    """Report inputs by their landing name (``s3://...``), not by the deleted staged copy."""

    def orig(i: str) -> str:
        for path, entry in local.items():
            if path != entry and (i == path or i.startswith((path + "#", path + "/"))):
                return entry + i[len(path) :]
        return i

    return RunSummary(
        done=[e.model_copy(update={"input": orig(e.input)}) for e in summary.done],
        skipped=[e.model_copy(update={"input": orig(e.input)}) for e in summary.skipped],
        rejected=[r.model_copy(update={"input": orig(r.input)}) for r in summary.rejected],
        failed=[f.model_copy(update={"input": orig(f.input)}) for f in summary.failed],
        cancelled=[c.model_copy(update={"input": orig(c.input)}) for c in summary.cancelled],
        planned=summary.planned,
    )


def _default_runner(params: BackfillParams) -> RunSummary:
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None:
        return backfill_cohort(**params.model_dump(exclude={"spec"}), spec=params.spec)
    return run_local(params)


@flow(name="scan-landing", persist_result=False)
def scan_landing(
    landing: str,
    cohort: str,
    store: str,
    spec: RenderSpec | None = None,
    backend: str | None = None,
    staging: str | None = None,
    max_new: int | None = None,
) -> RunSummary:
    """Cron deployment body: backfill only the series that arrived in ``landing`` since the last scan."""
    summary, new = scan_once(landing, cohort, store, spec, backend, staging, max_new)
    log.info("landing scan of %s: %d new entries, %s", landing, len(new), summary.counts())
    return summary


@flow(name="backfill-sharded", persist_result=False)
def backfill_sharded(
    cohort: str,
    store: str,
    shards: int,
    deployment: str = "backfill-cohort/gpu",
    source: list[str] | None = None,
    manifest: str | None = None,
    manifest_root: str | None = None,
    spec: RenderSpec | None = None,
    wait: bool = True,
    verify: str = "shallow",
) -> list[dict]:
    """Fan ``cohort`` out over ``shards`` flow runs of ``deployment`` (one per GPU worker); returns their states."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    runs: list[dict[str, str | None]] = []
    for i in range(shards):  # launch every shard first (timeout=0), then wait for all
        p = {
            "cohort": cohort,
            "store": store,
            "source": source,
            "manifest": manifest,
            "manifest_root": manifest_root,
            "spec": (spec or RenderSpec()).model_dump(mode="json"),
            "shard": f"{i}/{shards}",
            "verify": verify,
        }
        fr = run_deployment(
            deployment, parameters=p, timeout=0, flow_run_name=f"{cohort}-shard-{i}-of-{shards}", as_subflow=True
        )
        assert isinstance(fr, FlowRun)  # synchronous inside a flow run
        runs.append({"shard": f"{i}/{shards}", "flow_run_id": str(fr.id), "state": None})
    if not wait:
        return runs
    with get_client(sync_client=True) as client:
        pending = {r["flow_run_id"] for r in runs}
        while pending:
            for r in runs:
                if r["flow_run_id"] in pending:
                    st = client.read_flow_run(UUID(str(r["flow_run_id"]))).state
                    if st is not None and st.is_final():
                        r["state"] = st.type.value
                        pending.discard(r["flow_run_id"])
            if pending:
                time.sleep(2.0)
    return runs
