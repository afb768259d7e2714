"""Split assignment at NLST scale: ``assign_splits`` on ``--volumes`` synthetic volume facts with content
fingerprints, and its near-duplicate search against comparing all pairs.

The descriptors are synthetic, shaped like ``xwin.pipeline.ingest.fingerprint`` descriptors (12^3 int8, unit
variance x 32): every subject shares an anatomy component (unrelated volumes correlate ~0.36), a subject's later
exams correlate ~0.9 with its first, a second reconstruction of an exam ~0.995. Planted leaks: ``--copies`` of the
volumes again under a new subject id with the same exact fingerprint (a re-ingest under another salt), and
``--recons`` second reconstructions under a new subject id (another exact fingerprint, a near-duplicate descriptor).

Timed: the whole assignment with content binding (``assign_splits``), the same without it (``links=[]``: by subject
id only, as before binding), and on the first ``--baseline-volumes`` descriptors the banded hashing
(``near_pairs``) against the all-pairs correlation matrix (blocked matrix products), with the pairs each finds.

    .venv/bin/python bench/bench_splits.py                       # 26,000 volumes, baseline on 6,500
    .venv/bin/python bench/bench_splits.py --volumes 5000 --baseline-volumes 2000 --no-record
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import record

from xwin.pipeline.neardup import NEAR_MIN, near_pairs, unit_rows
from xwin.pipeline.splits import VolumeFacts, assign_splits
from xwin.schemas.cohort import SplitPolicy

D = 12**3


def _q(v: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(v / v.std(axis=-1, keepdims=True) * 32), -127, 127).astype(np.int8)


def synthetic(n: int, copies: float, recons: float, seed: int) -> tuple[list[VolumeFacts], dict[str, str]]:
    """``n`` volume facts (module docstring) and the planted leaks: new subject -> the subject it copies."""
    rng = np.random.default_rng(seed)
    n_plant = int(n * copies) + int(n * recons)
    n_base = n - n_plant
    common = rng.standard_normal(D).astype(np.float32)
    facts: list[VolumeFacts] = []
    desc: list[np.ndarray] = []
    s = 0
    while len(facts) < n_base:
        person = 0.6 * common + 0.8 * rng.standard_normal(D).astype(np.float32)
        for t in range(int(rng.integers(1, 4))):
            exam = person if t == 0 else 0.9 * person + 0.44 * rng.standard_normal(D).astype(np.float32)
            for r in range(int(rng.integers(1, 3))):
                v = exam if r == 0 else exam + 0.1 * rng.standard_normal(D).astype(np.float32)
                if len(facts) < n_base:
                    q = _q(v)
                    vid = f"v{len(facts):06d}"
                    facts.append(
                        VolumeFacts(vid, f"pid{s:06d}", study_date=f"{1999 + t}0102", exact=f"e-{vid}", near=q)
                    )
                    desc.append(q)
        s += 1
    planted: dict[str, str] = {}
    src = rng.choice(n_base, n_plant, replace=False)
    for k, i in enumerate(src):
        f = facts[i]
        new = f"copy{k:06d}"
        planted[new] = f.subject_key
        vid = f"w{k:06d}"
        if k < int(n * copies):  # the same voxels under another id
            facts.append(VolumeFacts(vid, new, study_date=f.study_date, exact=f.exact, near=f.near))
        else:  # another reconstruction of the same scan under another id
            v = np.asarray(f.near, np.float32) + 3.2 * rng.standard_normal(D).astype(np.float32)
            facts.append(VolumeFacts(vid, new, study_date=f.study_date, exact=f"e-{vid}", near=_q(v)))
    return facts, planted


def all_pairs(q: np.ndarray, min_corr: float, block: int = 2048) -> list[tuple[int, int, float]]:
    """Every pair (i < j) with correlation >= ``min_corr``, from the full correlation matrix in blocks."""
    u = unit_rows(q)
    out = []
    for lo in range(0, len(u), block):
        c = u[lo : lo + block] @ u.T
        i, j = np.nonzero(c >= min_corr)
        keep = j > i + lo
        out += [(int(a + lo), int(b), float(c[a, b])) for a, b in zip(i[keep], j[keep])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=26000)
    ap.add_argument("--baseline-volumes", type=int, default=6500)
    ap.add_argument("--copies", type=float, default=0.02, help="share of volumes re-ingested under another id")
    ap.add_argument("--recons", type=float, default=0.02, help="share of volumes reconstructed again, another id")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("splits", args)

    facts, planted = synthetic(args.volumes, args.copies, args.recons, args.seed)
    pol = SplitPolicy()
    t_bind, t_plain = [], []
    doc = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        doc, _ = assign_splits("bench", facts, pol)
        t_bind.append(time.perf_counter() - t)
        t = time.perf_counter()
        assign_splits("bench", facts, pol, links=[])
        t_plain.append(time.perf_counter() - t)
    assert doc is not None
    bound = sum(1 for new, old in planted.items() if doc.subjects[new] == doc.subjects[old])
    spans = {}
    for f in facts:
        spans.setdefault(f.subject_key, set()).add(doc.volumes[f.volume_id].split)
    n_b = args.baseline_volumes
    q = np.stack([np.asarray(f.near) for f in facts[:n_b]])
    t_lsh, t_all = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        got = near_pairs(q)
        t_lsh.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = all_pairs(q, NEAR_MIN)
        t_all.append(time.perf_counter() - t)
    got_set, ref_set = {(i, j) for i, j, _ in got}, {(i, j) for i, j, _ in ref}
    summary = {
        "volumes": len(facts),
        "subjects": len(doc.subjects),
        "planted": len(planted),
        "planted_bound": bound,
        "bindings": len(doc.bindings),
        "subjects_in_two_splits": sum(1 for v in spans.values() if len(v) > 1),
        "assign_s": float(np.median(t_bind)),
        "assign_without_binding_s": float(np.median(t_plain)),
        "baseline_volumes": n_b,
        "near_pairs_s": float(np.median(t_lsh)),
        "all_pairs_s": float(np.median(t_all)),
        "pairs_all": len(ref_set),
        "pairs_found": len(got_set & ref_set),
        "pairs_extra": len(got_set - ref_set),
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    rec.save(
        samples={"assign_s": t_bind, "assign_without_binding_s": t_plain, "near_pairs_s": t_lsh, "all_pairs_s": t_all},
        summary=summary,
    )


if __name__ == "__main__":
    main()
