"""Near-duplicate search among content descriptors (``xwin.pipeline.ingest.fingerprint``) without comparing all
pairs: random-hyperplane locality-sensitive hashing (SimHash, Charikar 2002) with banding.

Each descriptor is centred and scaled to a unit vector ``u`` (so ``u_i . u_j`` is the Pearson correlation of the
two descriptors); the cohort's mean vector is subtracted before hashing (the anatomy every chest shares would
otherwise make unrelated volumes collide often), never before scoring. ``BANDS`` bands of ``BITS`` signs of random
projections each are the bucket keys: two volumes are compared only when one band's key is equal, and a compared
pair counts when its correlation is at least ``NEAR_MIN``. For a pair whose centred correlation is ``r`` each sign
agrees with probability ``1 - acos(r) / pi``, so the chance that no band holds it is
``(1 - (1 - acos(r)/pi) ** BITS) ** BANDS``: 3e-7 at r = 0.96, 1e-11 at r = 0.98; two unrelated volumes
(r ~ 0) share a band with probability 48 / 2**14 ~ 0.3%. The projections come from a fixed seed: the same
descriptors always give the same pairs.

The cohort's mean is a fair stand-in for what unrelated volumes share only when it is the mean of many: with two
descriptors, centring makes them exact opposites, and no band ever holds the pair. Up to ``ALL_PAIRS_MAX``
descriptors every pair is scored instead.
"""

from __future__ import annotations

import numpy as np

NEAR_MIN = 0.97  # descriptor correlation at or above which two volumes are near-duplicates
BITS = 14
BANDS = 48
SEED = 20240229
ALL_PAIRS_MAX = 2048  # up to this many descriptors every pair is scored (one matrix product, well under a second)


def unit_rows(q: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length (float32); a constant row stays 0."""
    u = np.array(q, dtype=np.float32)
    u -= u.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->i", u, u))[:, None]
    u /= np.where(norm > 0, norm, 1.0)  # a constant row is all 0 after centring: it stays 0
    return u


def _all_pairs(u: np.ndarray, min_corr: float, groups: np.ndarray | None) -> list[tuple[int, int, float]]:
    """Every pair (i < j) of unit rows ``u`` whose dot product is at least ``min_corr`` (and, with ``groups``, of
    different groups), sorted by (i, j)."""
    c = u @ u.T
    i, j = np.triu_indices(len(u), 1)
    keep = c[i, j] >= min_corr
    if groups is not None:
        keep &= groups[i] != groups[j]
    return [(int(a), int(b), float(x)) for a, b, x in zip(i[keep], j[keep], c[i, j][keep])]


def _band_pairs(keys: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Pairs (i < j) of rows with equal ``keys`` (and, with ``groups``, different groups) as int64 codes
    ``i * n + j``."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    sizes = np.diff(np.r_[starts, n])
    out = []
    for m in np.unique(sizes[sizes > 1]):  # buckets of one size at a time: one index pattern for all of them
        members = order[starts[sizes == m][:, None] + np.arange(m)]  # (buckets, m)
        i, j = np.triu_indices(int(m), 1)
        a, b = members[:, i].ravel(), members[:, j].ravel()
        if groups is not None:
            keep = groups[a] != groups[b]
            a, b = a[keep], b[keep]
        out.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def near_pairs(
    q: np.ndarray,
    min_corr: float = NEAR_MIN,
    *,
    groups: np.ndarray | None = None,
    bits: int = BITS,
    bands: int = BANDS,
    seed: int = SEED,
) -> list[tuple[int, int, float]]:
    """Pairs (i < j, correlation) of rows of ``q`` (n descriptors, int8 or float) whose correlation is at least
    ``min_corr``, found by the banded hashing of the module docstring; sorted by (i, j). ``groups`` (n labels):
    pairs within one group are not looked for (e.g. volumes of one subject, which share a split anyway)."""
    n = len(q)
    if n < 2:
        return []
    u = unit_rows(q)
    if n <= ALL_PAIRS_MAX:  # small cohorts: every pair (the hashing's centring is unreliable with few rows)
        return _all_pairs(u, min_corr, groups)
    planes = np.random.default_rng(seed).standard_normal((u.shape[1], bits * bands), dtype=np.float32)
    weights = (2.0 ** np.arange(bits)).astype(np.float32)  # keys < 2**24: exact in float32
    centred = u - u.mean(axis=0, keepdims=True)
    codes = []
    for lo in range(0, bands, 8):  # a few bands at a time keeps the sign matrix small
        hi = min(bands, lo + 8)
        signs = ((centred @ planes[:, lo * bits : hi * bits]) > 0).astype(np.float32)
        for b in range(hi - lo):
            keys = (signs[:, b * bits : (b + 1) * bits] @ weights).astype(np.int64)
            codes.append(_band_pairs(keys, groups))
    cand = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    out: list[tuple[int, int, float]] = []
    for lo in range(0, len(cand), 8192):
        c = cand[lo : lo + 8192]
        i, j = c // n, c % n
        s = np.einsum("ij,ij->i", u[i], u[j])
        keep = s >= min_corr
        out += [(int(a), int(b), float(x)) for a, b, x in zip(i[keep], j[keep], s[keep])]
    return out
