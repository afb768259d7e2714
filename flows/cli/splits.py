"""``xwin splits assign|show``: subject-level train/val/test splits of a cohort, stored in the store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import typer

from xwin.flows.cli.common import (
    HELP_OPTIONS,
    JsonOpt,
    StoreOpt,
    XwinGroup,
    check_output,
    dataset_options,
    fail,
    open_store_cli,
    or_exit,
)

splits_app = typer.Typer(
    add_completion=False,
    cls=XwinGroup,
    context_settings=HELP_OPTIONS,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="subject-level splits of a cohort",
)


def parse_fractions(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> {"train": 0.8, ...} (order kept: it is the order of the intervals)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, val = part.partition("=")
        try:
            if not eq:
                raise ValueError
            out[name.strip()] = float(val)
        except ValueError:
            fail(f"--fractions {text!r}: {part!r} is not NAME=FRACTION")
    return out


def read_exclusions(path: Path) -> list[str]:
    """Subject ids, one per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"--exclude {path}: {e.strerror or e}")
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def _cohort(store: str, cohort: str | None) -> tuple[str, str]:
    """(store url, cohort) from ``--store URL`` + ``--cohort`` or ``--store URL#COHORT`` (the way every command names
    a dataset, flows/cli/common.py); no cohort: one line, exit 2."""
    url, c, _ = dataset_options(store, cohort)
    if c is None:
        fail(f"--store {store}: name the cohort: --cohort NAME or --store {url}#NAME")
    return url, c


def _show(doc, as_json: bool) -> None:
    body = {
        "cohort": doc.cohort,
        "policy": doc.policy.model_dump(),
        "volumes": {vid: v.model_dump() for vid, v in doc.volumes.items()},
        "subjects": doc.subjects,
        "counts": doc.counts(),
        "excluded": doc.excluded,
        "bindings": [b.model_dump() for b in doc.bindings],
    }
    if as_json:
        typer.echo(json.dumps(body))
        return
    c = doc.counts()
    typer.echo(f"cohort {doc.cohort}: {len(doc.subjects)} subjects, {len(doc.volumes)} volumes")
    for name in sorted(set(c["subjects"]) | set(c["volumes"])):
        typer.echo(f"  {name:<10s} {c['subjects'].get(name, 0):>6d} subjects {c['volumes'].get(name, 0):>7d} volumes")
    if doc.bindings:
        n_subj = sum(len(b.subjects) for b in doc.bindings)
        hows = {h: sum(1 for b in doc.bindings for x in b.links if x.how == h) for h in ("exact", "near")}
        typer.echo(
            f"bound by content: {len(doc.bindings)} group(s) bind {n_subj} subjects, one split each "
            f"({hows['exact']} exact copies, {hows['near']} near-duplicates)"
        )
        for b in doc.bindings[:20]:
            why = "; ".join(f"{x.volumes[0]} = {x.volumes[1]} ({x.how} {x.score:.4g})" for x in b.links[:3])
            more = f"; +{len(b.links) - 3} more" if len(b.links) > 3 else ""
            typer.echo(f"  {b.split:<10s} {', '.join(b.subjects)}: {why}{more}")
            if b.conflict:
                typer.echo(f"    conflict: {b.conflict}")
        if len(doc.bindings) > 20:
            typer.echo(f"  ... {len(doc.bindings) - 20} more (--json lists all)")


def _facts(st, records):
    """VolumeFacts of ``records`` with their content fingerprints; a record stored without one has it computed
    from its voxels here. Returns (facts, how many were computed)."""
    from concurrent.futures import ThreadPoolExecutor

    from xwin.pipeline.ingest.fingerprint import content_fingerprint, decode_near
    from xwin.pipeline.splits import VolumeFacts

    def fingerprint(r):
        if r.fingerprint is not None:
            return r.fingerprint
        rec, hu = st.read_volume(r.volume_id)
        return content_fingerprint(hu, np.asarray(rec.affine))

    with ThreadPoolExecutor(max_workers=4) as ex:
        fps = list(ex.map(fingerprint, records))
    facts = [
        VolumeFacts(
            volume_id=r.volume_id,
            subject=r.subject_id,
            study_uid=r.study_uid,
            study_date=r.acquisition.study_date if r.acquisition else None,
            manufacturer=r.acquisition.manufacturer if r.acquisition else None,
            site=r.acquisition.site if r.acquisition else None,
            exact=fp.exact,
            near=decode_near(fp),
        )
        for r, fp in zip(records, fps)
    ]
    return facts, sum(1 for r in records if r.fingerprint is None)


@splits_app.command("assign")
def assign_cmd(
    store: StoreOpt,
    cohort: str | None = typer.Option(None, "--cohort", help="cohort to assign (or --store URL#COHORT)"),
    fractions: str = typer.Option("train=0.8,val=0.1,test=0.1", "--fractions", help="NAME=FRACTION,... (sum 1)"),
    salt: str = typer.Option("xwin-splits-v1", "--salt", help="mixed into each subject's hash"),
    group_by: str = typer.Option("subject", "--group-by", help="subject | manufacturer | site"),
    exclude: Path | None = typer.Option(None, "--exclude", help="file of subject ids kept out of every split"),
    allow_mixed: bool = typer.Option(
        False,
        "--allow-mixed-subject-ids",
        help="assign a cohort holding both raw and de-identified (s-...) subject ids",
    ),
    as_json: JsonOpt = False,
) -> None:
    """Assign every volume's subject to a split (new subjects only; assigned subjects never move). Subjects whose
    volumes hold one CT (the same voxels, or a near-duplicate reconstruction) are bound into one split."""
    from pydantic import ValidationError

    from xwin.pipeline.ingest.deid import is_hashed_subject
    from xwin.pipeline.splits import assign_splits, content_links, duplicate_scores, mark_duplicates
    from xwin.schemas.cohort import SplitPolicy

    store, cohort = _cohort(store, cohort)
    try:
        policy = SplitPolicy(fractions=parse_fractions(fractions), salt=salt, group_by=group_by)
    except ValidationError as e:
        fail(*(f"--{'-'.join(str(x) for x in err['loc'][:1])}: {err['msg']}" for err in e.errors()))
    excl = read_exclusions(exclude) if exclude is not None else []
    deid_salt = os.environ.get("XWIN_DEID_SALT")
    if deid_salt:  # the cohort's subjects are stored hashed: an exclusion list of source ids is hashed the same way
        from xwin.pipeline.ingest.deid import hashed_subject

        excl = [x if x.startswith("s-") else hashed_subject(x, deid_salt) for x in excl]
    st = open_store_cli(store)
    records = or_exit(st.list_volumes, cohort)
    if not records:
        fail(f"cohort {cohort!r} has no committed volumes in {st.url}")
    hashed = sorted({r.subject_id for r in records if r.subject_id and is_hashed_subject(r.subject_id)})
    raw = sorted({r.subject_id for r in records if r.subject_id and not is_hashed_subject(r.subject_id)})
    if hashed and raw and not allow_mixed:
        fail(
            f"cohort {cohort!r} mixes de-identified subject ids ({len(hashed)}, e.g. {hashed[0]}) with raw ones "
            f"({len(raw)}, e.g. {raw[0]}): it was ingested both with and without XWIN_DEID_SALT, so one person may "
            "be two subjects. Re-ingest it under one setting into a fresh cohort, or pass --allow-mixed-subject-ids "
            "(copies of one CT are still bound into one split by their content)"
        )
    facts, computed = _facts(st, records)
    if computed:
        typer.echo(
            f"note: {computed} volume(s) of {cohort} were stored without a content fingerprint; it was computed "
            "from their voxels (again at every assignment, until they are ingested again)",
            err=True,
        )
    moved: list[str] = []

    def load(vid: str):
        rec, hu = st.read_volume(vid)
        return hu, np.asarray(rec.affine)

    # near-duplicates are scored once, outside the compare-and-swap (they read volumes), and only for volumes not
    # scored by an earlier assignment
    before = st.read_splits(cohort)
    done_before = {v for v, s in (before.volumes.items() if before else []) if s.duplicate_score is not None}
    scores = duplicate_scores(facts, load, skip=lambda vid: vid in done_before)
    known_subjects = {f.subject_key for f in facts} | set(before.subjects if before else {})
    unknown = sorted(set(excl) - known_subjects)

    links = content_links(facts)  # once, outside the compare-and-swap (seconds at NLST scale)

    def update(cur):
        doc, m = assign_splits(cohort, facts, policy, cur, excl, links=links)
        moved[:] = m
        return mark_duplicates(doc, scores)

    doc = or_exit(st.update_splits, cohort, update)
    if doc.policy != policy:
        typer.echo(
            f"note: cohort {cohort} keeps the policy it was first assigned with ({doc.policy.model_dump_json()}); "
            "the one given applies to no subject",
            err=True,
        )
    for s in moved:
        typer.echo(f"warning: subject {s} was assigned before and is now excluded", err=True)
    for b in doc.bindings:
        if b.conflict:
            typer.echo(f"warning: subjects {', '.join(b.subjects)} hold one CT but were {b.conflict}", err=True)
    if unknown:
        typer.echo(
            f"warning: {len(unknown)} excluded id(s) match no subject of {cohort} (ids as stored; with "
            f"de-identification set XWIN_DEID_SALT to hash source ids): {', '.join(unknown[:5])}",
            err=True,
        )
    moved_vols = [f.volume_id for f in facts if doc.volumes[f.volume_id].subject != f.subject_key]
    if moved_vols:
        typer.echo(
            f"warning: {len(moved_vols)} volume(s) are stored under another subject id than they were assigned with "
            f"(re-ingested under another de-identification?); they keep their split: {', '.join(moved_vols[:5])}",
            err=True,
        )
    _show(doc, as_json)


@splits_app.command("show")
def show_cmd(
    store: StoreOpt,
    cohort: str | None = typer.Option(None, "--cohort", help="the cohort (or --store URL#COHORT)"),
    as_json: JsonOpt = False,
) -> None:
    """Print a cohort's assignment: every volume's split and subject, and the counts."""
    store, cohort = _cohort(store, cohort)
    st = open_store_cli(store)
    doc = or_exit(st.read_splits, cohort)
    if doc is None:
        fail(f"cohort {cohort!r} has no split assignment in {st.url}: run `xwin splits assign`")
    _show(doc, as_json)


def card_cmd(
    store: StoreOpt,
    cohort: str | None = typer.Option(None, "--cohort", help="the cohort (or --store URL#COHORT)"),
    out: Path = typer.Option(..., "--out", help="folder for card.md, card.json, preview.png"),
    licence: str | None = typer.Option(None, "--licence", help="the cohort's licence (known for nlst)"),
    source: str | None = typer.Option(None, "--source", help="where the cohort comes from (known for nlst)"),
    as_json: JsonOpt = False,
) -> None:
    """Write the cohort's dataset card: counts by split, timepoint, vendor, kernel; QC; rejections; spec; licence."""
    from xwin.flows.card import write_card

    store, cohort = _cohort(store, cohort)
    check_output(out, folder=True)
    st = open_store_cli(store)
    card = or_exit(write_card, st, cohort, out, licence=licence, source=source)
    if as_json:
        typer.echo(json.dumps(card))
        return
    typer.echo(f"dataset card of {cohort}: {out / 'card.md'} ({card['volumes']} volumes, {card['subjects']} subjects)")
