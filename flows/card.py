"""The dataset card of one cohort (``xwin card``): what a reader of a paper, or a reviewer of a data release, needs.

Everything comes from the store (volume records, the split assignment, the datasets and their specs) and from the
run reports beside it (rejections); nothing is typed by hand. Written as ``card.json`` + ``card.md`` +
``preview.png`` (one frontal view of a few volumes of the cohort's dataset).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from xwin.flows import reports as rep
from xwin.storage import Store

# Cohorts whose licence and source are known; any other cohort takes them from --licence / --source.
KNOWN_COHORTS: dict[str, tuple[str, str]] = {
    "nlst": (
        "CC BY 3.0 (TCIA data usage policy)",
        "National Lung Screening Trial, The Cancer Imaging Archive: https://doi.org/10.7937/TCIA.HMQ8-J677",
    ),
}


def _run_time(fs: Any, path: str, payload: dict) -> float:
    """When a run report was written: its ``finished_at`` (UTC ISO time), else the file's modification time."""
    stamp = payload.get("finished_at")
    if stamp:
        try:
            t = datetime.fromisoformat(str(stamp))
            return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
        except ValueError:
            pass
    info = fs.info(path)
    m = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(m, datetime):
        return (m if m.tzinfo else m.replace(tzinfo=UTC)).timestamp()
    return float(m) if m is not None else 0.0


def _reports_rejections(reports: str, cohort: str) -> tuple[Counter[str], int]:
    """Rejection reasons of the cohort's inputs, each input counted once at its latest run (by the time the run
    ended, not by its id: Prefect run ids and command-line ids do not sort by time); and the run count."""
    import fsspec

    from xwin.storage import s3_options

    opts = s3_options() if reports.startswith("s3://") else {}
    fs, root = fsspec.core.url_to_fs(f"{reports}/runs", **opts)
    try:
        files = sorted(p for p in fs.ls(root, detail=False) if str(p).endswith(".json"))
    except FileNotFoundError:
        return Counter(), 0
    latest: dict[str, tuple[float, str, str | None]] = {}  # input -> (run time, file, reason or None)
    runs = 0
    for f in files:
        payload = json.loads(fs.cat_file(f))
        if payload.get("cohort") not in (None, cohort):
            continue
        runs += 1
        s = payload.get("summary", {})
        when = (_run_time(fs, f, payload), str(f))
        for r in s.get("rejected", []):
            latest[r["input"]] = max(latest.get(r["input"], (-1.0, "", None)), (*when, r["reason"]))
        for kind in ("done", "skipped"):
            for r in s.get(kind, []):
                latest[r["input"]] = max(latest.get(r["input"], (-1.0, "", None)), (*when, None))
    return Counter(reason for _, _, reason in latest.values() if reason), runs


def _bindings(splits: Any) -> dict[str, Any] | None:
    """Subjects bound into one split by the content of their volumes (``xwin splits assign``)."""
    if splits is None:
        return None
    b = splits.bindings
    return {
        "groups": len(b),
        "subjects": sum(len(x.subjects) for x in b),
        "exact_links": sum(1 for x in b for link in x.links if link.how == "exact"),
        "near_links": sum(1 for x in b for link in x.links if link.how == "near"),
        "conflicts": [{"subjects": x.subjects, "conflict": x.conflict} for x in b if x.conflict],
    }


def build_card(store: Store, cohort: str, licence: str | None = None, source: str | None = None) -> dict[str, Any]:
    """The card's content (module docstring) as a JSON-ready dict."""
    records = store.list_volumes(cohort)
    splits = store.read_splits(cohort)
    known = KNOWN_COHORTS.get(cohort.lower(), (None, None))
    vols = splits.volumes if splits is not None else {}

    def count(values) -> dict[str, int]:
        return dict(sorted(Counter("unknown" if v is None else str(v) for v in values).items()))

    qc: dict[str, dict[str, int]] = {}
    for r in records:
        for c in r.qc:
            d = qc.setdefault(c.name, {"flagged": 0, "passed": 0})
            d["flagged" if c.flagged else "passed"] += 1
    reasons, runs = _reports_rejections(rep.reports_url(store.url), cohort)
    datasets = [
        {"spec_hash": d.spec_hash, "rings": len(ds.volume_ids()), "spec": json.loads(ds.spec.canonical_json())}
        for d in store.datasets()
        if d.cohort == cohort
        for ds in [store.open_dataset(cohort, d.spec_hash)]
    ]
    subjects = {  # as the splits count them: a volume without a subject id is its own subject
        vols[r.volume_id].subject if r.volume_id in vols else (r.subject_id or f"volume:{r.volume_id}") for r in records
    }
    return {
        "cohort": cohort,
        "store": store.url,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "licence": licence or known[0] or "unknown: pass --licence",
        "source": source or known[1] or "unknown: pass --source",
        "volumes": len(records),
        "subjects": len(subjects),
        "splits": splits.counts() if splits is not None else None,
        "split_policy": splits.policy.model_dump() if splits is not None else None,
        "by_timepoint": count(vols[r.volume_id].timepoint if r.volume_id in vols else None for r in records),
        "by_manufacturer": count(r.acquisition.manufacturer if r.acquisition else None for r in records),
        "by_kernel": count(r.acquisition.kernel if r.acquisition else None for r in records),
        "near_duplicates": sum(1 for v in vols.values() if v.duplicate_of),
        "content_bindings": _bindings(splits),
        "qc": dict(sorted(qc.items())),
        "rejections": dict(sorted(reasons.items())),
        "runs_read": runs,
        "datasets": datasets,
    }


def card_markdown(card: dict[str, Any], preview: str | None) -> str:
    def table(title: str, d: dict | None) -> list[str]:
        if not d:
            return [f"**{title}**: none", ""]
        return [f"**{title}**", "", "| | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in d.items()), ""]

    lines = [
        f"# Dataset card: {card['cohort']}",
        "",
        f"- store: `{card['store']}`",
        f"- licence: {card['licence']}",
        f"- source: {card['source']}",
        f"- {card['volumes']} volumes of {card['subjects']} subjects; {card['near_duplicates']} near-duplicate "
        "reconstructions",
        f"- written {card['written_at']} by `xwin card` from the store and {card['runs_read']} run report(s)",
        "",
    ]
    if card["splits"]:
        lines += table("Volumes per split", card["splits"]["volumes"])
        lines += table("Subjects per split", card["splits"]["subjects"])
        cb = card["content_bindings"]
        lines += [
            f"**Bound by content**: {cb['groups']} group(s) of {cb['subjects']} subjects share one split each because "
            f"their volumes hold one CT ({cb['exact_links']} exact copies, {cb['near_links']} near-duplicate "
            f"reconstructions); {len(cb['conflicts'])} conflict(s)",
            "",
        ]
        lines += [f"- conflict: {', '.join(c['subjects'])}: {c['conflict']}" for c in cb["conflicts"]]
        lines += [""] if cb["conflicts"] else []
    else:
        lines += ["**Splits**: not assigned (`xwin splits assign`)", ""]
    lines += table("Timepoints", card["by_timepoint"])
    lines += table("Manufacturers", card["by_manufacturer"])
    lines += table("Kernels", card["by_kernel"])
    qc = {k: f"{v['flagged']} flagged / {v['passed']} passed" for k, v in card["qc"].items()}
    lines += table("Quality checks", qc)
    if "truncated" in qc:  # the same word means the views' field of view in a reconstruction's metrics.json
        lines += [
            "`truncated`: the body touches the border of the CT's own image (its field of view cuts the body); not "
            "the `truncated` of a reconstruction's metrics.json, which says the rendered views cut the body.",
            "",
        ]
    lines += table("Rejections (latest run of each input)", card["rejections"])
    for d in card["datasets"]:
        lines += [f"**Dataset {d['spec_hash']}**: {d['rings']} rings", "", "```json", json.dumps(d["spec"]), "```", ""]
    if preview:
        lines += ["![preview](preview.png)", ""]
    return "\n".join(lines)


def write_card(store: Store, cohort: str, out: str | Path, **kw: Any) -> dict[str, Any]:
    """Write card.json, card.md and (when the cohort has rings) preview.png under ``out``; returns the card. A cohort
    the store knows nothing of (no volume, ring or rejected series) raises ValueError before ``out`` is created."""
    out = Path(out)
    card = build_card(store, cohort, **kw)
    if not (card["volumes"] or card["datasets"] or card["rejections"]):  # a typo: say so, write nothing
        known = sorted({r.cohort for r in store.list_volumes()} | {d.cohort for d in store.datasets()})
        raise ValueError(
            f"cohort {cohort!r}: no volume, ring or rejected series of it in {store.url}"
            + (f" (cohorts there: {', '.join(known)})" if known else "")
        )
    out.mkdir(parents=True, exist_ok=True)
    preview = None
    if card["datasets"]:
        ds = store.open_dataset(cohort, card["datasets"][0]["spec_hash"])
        ids = ds.volume_ids()[:4]
        if ids:
            k = ds.spec.view_index(0.0) if 0.0 in [y % 360 for y in ds.spec.yaws_deg] else 0
            views = np.stack([ds.read_views(v, [k])[0][0] for v in ids])
            im = rep.montage(views, [0.0] * len(ids), list(range(len(ids))), size=192)
            (out / "preview.png").write_bytes(rep.png_bytes(im))
            preview = str(out / "preview.png")
    card["preview"] = preview
    (out / "card.json").write_text(json.dumps(card, indent=1))
    (out / "card.md").write_text(card_markdown(card, preview))
    return card
