"""Linear probing: a frozen X-WIN encoder + a linear classifier on a labelled image folder, AUROC per class.

Data: ``root/<class name>/<image>`` (PNG / JPEG / DICOM / NPY, class per subfolder, searched recursively inside
each class folder). Images are read like the real-CXR stream (``xwin.training.data.real_cxr``: centre square crop,
antialiased resize to the encoder's input size, per-image min-max). Features: global average pooling of the frozen
encoder's tokens (the EMA encoder by default, as the paper probes). The classifier is multinomial logistic
regression on standardised features (full-batch L-BFGS, L2 penalty) trained on a stratified split; AUROC is
one-vs-rest on the held-out split.

Leakage: images of one subject (or one CT volume) must not sit on both sides of the split, or the probe measures
recognition of the subject rather than the label. ``group_by`` names each image's group: ``"dir"`` (the image's
folder below its class folder: patient folders as in MIMIC-CXR), or a regular expression searched in the image's
path relative to the data root whose first capture group (else the whole match) is the group; the split then keeps
every group whole (:func:`grouped_split`). ``"none"``: every image is its own group (only for data with one image per
subject).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xwin.training.config import ModelConfig
from xwin.training.models.vit import VisionTransformer
from xwin.training.models.xwin import build_encoder

log = logging.getLogger("xwin.probe")
SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".npy")


@dataclass
class ImageFolder:
    images: torch.Tensor  # (n, 1, S, S) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64 class index
    classes: list[str]
    paths: list[str]
    skipped: dict[str, str]  # path -> reason

    def groups(self, group_by: str = "none") -> np.ndarray:
        """The group of each image (see the module docstring); raises when a path does not match the pattern."""
        import re

        if group_by == "none":
            return np.asarray(self.paths)
        if group_by == "dir":
            return np.asarray([str(Path(p).parent.relative_to(Path(p).parts[0])) for p in self.paths])
        pat = re.compile(group_by)
        out = []
        for p in self.paths:
            m = pat.search(p)
            if m is None:
                raise ValueError(f"--group-by {group_by!r} does not match image {p!r}")
            out.append(m.group(1) if m.groups() else m.group(0))
        return np.asarray(out)


def load_image_folder(root: str | Path, image_size: int) -> ImageFolder:
    from xwin.training.data.real_cxr import BadImage, read_radiograph, to_tensor

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"probe data {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"probe data {root} needs >= 2 class subfolders, found {classes}")
    imgs, labels, paths, skipped = [], [], [], {}
    for ci, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if not (p.is_file() and p.suffix.lower() in SUFFIXES):
                continue
            try:
                arr = np.load(p).astype(np.float32) if p.suffix.lower() == ".npy" else read_radiograph(p)
                if arr.ndim != 2:
                    raise BadImage("wrong_channels", f"array of shape {arr.shape}")
                imgs.append(to_tensor(arr, image_size, min_size=min(16, image_size)))
            except BadImage as e:
                skipped[str(p)] = e.reason
                log.warning("probe image skipped: %s: %s", p, e)
                continue
            labels.append(ci)
            paths.append(str(p.relative_to(root)))
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    if np.any(counts < 2):
        raise ValueError(f"every class needs >= 2 readable images: {dict(zip(classes, counts.tolist()))}")
    return ImageFolder(torch.stack(imgs), np.asarray(labels, dtype=np.int64), classes, paths, skipped)


def load_encoder(checkpoint: str | Path, which: str = "ema") -> tuple[VisionTransformer, ModelConfig]:
    """The frozen encoder of a training checkpoint: ``which`` = "ema" (f_theta') or "online" (f_theta)."""
    sd = torch.load(checkpoint, map_location="cpu", weights_only=False)
    mcfg = ModelConfig.model_validate(sd["config"]["model"])
    enc = build_encoder(mcfg)
    if which == "ema":
        state = {k.removeprefix("encoder."): v for k, v in sd["ema"].items()}
    elif which == "online":
        state = {k.removeprefix("encoder."): v for k, v in sd["model"].items() if k.startswith("encoder.")}
    else:
        raise ValueError(f"which must be 'ema' or 'online', got {which!r}")
    enc.load_state_dict(state)
    enc.eval().requires_grad_(False)
    return enc, mcfg


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(n,1,S,S) -> (n, D): mean of the encoder's output tokens."""
    return torch.cat([encoder(images[i : i + batch]).mean(1) for i in range(0, len(images), batch)]).float()


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U with average ranks)."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def stratified_split(labels: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class shuffle; each class puts round(test_frac * n_c) (at least 1, at most n_c - 1) in the test split."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(1, round(test_frac * len(idx))), len(idx) - 1)
        te.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def _in_split(folder: ImageFolder, group_by: str, split: str) -> ImageFolder:
    from xwin.pipeline.splits import split_for, unit_hash
    from xwin.schemas.cohort import SplitPolicy

    if group_by == "none":
        raise ValueError("--split needs --group-by: the subject of each image decides its split")
    pol = SplitPolicy()
    if split not in pol.fractions:
        raise ValueError(f"split {split!r} is not one of {list(pol.fractions)}")
    keep = np.asarray([split_for(unit_hash(pol.salt, g), pol.fractions) == split for g in folder.groups(group_by)])
    if not keep.any():
        raise ValueError(f"no image of {len(keep)} belongs to split {split!r}")
    idx = np.flatnonzero(keep)
    return ImageFolder(
        folder.images[torch.from_numpy(idx)],
        folder.labels[idx],
        folder.classes,
        [folder.paths[i] for i in idx],
        folder.skipped,
    )


def _test_mask(groups: np.ndarray, order: np.ndarray, test_frac: float) -> np.ndarray:
    """The items of the groups taken in ``order`` into the test side until it holds ``test_frac`` of the items (the
    last group in ``order`` always stays on the training side)."""
    test_groups: list = []
    n = 0
    for g in order[:-1]:
        if n >= test_frac * len(groups):
            break
        test_groups.append(g)
        n += int((groups == g).sum())
    return np.isin(groups, test_groups)


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, test_frac: float, seed: int, tries: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups to each side: groups are drawn in a seeded random order into the test split until it holds
    ``test_frac`` of the images; the first order whose two sides both contain every class is used."""
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise ValueError(f"the probe split needs >= 2 groups, found {len(uniq)}: {uniq.tolist()}")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        te_mask = _test_mask(groups, rng.permutation(uniq), test_frac)
        if set(labels[te_mask]) == set(classes) and set(labels[~te_mask]) == set(classes):
            return np.flatnonzero(~te_mask), np.flatnonzero(te_mask)
    raise ValueError(f"no split of {len(uniq)} groups puts every class on both sides; add groups or lower --test-frac")


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, iters: int = 200) -> nn.Linear:
    """Multinomial logistic regression (mean cross-entropy + l2 * ||W||^2) by full-batch L-BFGS."""
    torch.manual_seed(0)
    clf = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def run_probe(
    checkpoint: str | Path,
    data: str | Path,
    *,
    test_frac: float = 0.3,
    seed: int = 0,
    l2: float = 1e-3,
    which: str = "ema",
    group_by: str = "none",
    split: str | None = None,
) -> dict:
    """``split``: probe only the images whose group (``group_by``: the subject) the subject-level hash of
    ``xwin.pipeline.splits`` (default policy, as the real-image stream uses) puts in that split, e.g. ``test``: the
    subjects a model trained with ``--split train`` on the same policy never saw."""
    enc, mcfg = load_encoder(checkpoint, which)
    folder = load_image_folder(data, mcfg.img_size)
    n_all = len(folder.labels)
    if split is not None:
        folder = _in_split(folder, group_by, split)
    feats = extract_features(enc, folder.images)
    groups = folder.groups(group_by)
    if group_by == "none":
        tr, te = stratified_split(folder.labels, test_frac, seed)
    else:
        tr, te = grouped_split(folder.labels, groups, test_frac, seed)
    mu, sd = feats[tr].mean(0), feats[tr].std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    y = torch.from_numpy(folder.labels)
    clf = fit_linear(z[tr], y[tr], len(folder.classes), l2)
    with torch.no_grad():
        prob = torch.softmax(clf(z[te]), dim=1).numpy()
    yte = folder.labels[te]
    per_class = {c: auroc(prob[:, i], yte == i) for i, c in enumerate(folder.classes)}
    return {
        "checkpoint": str(checkpoint),
        "encoder": which,
        "classes": folder.classes,
        "n_train": len(tr),
        "n_test": len(te),
        "group_by": group_by,
        "split": split,
        "n_images_in_folder": n_all,
        "groups": {"train": sorted(set(groups[tr].tolist())), "test": sorted(set(groups[te].tolist()))},
        "auroc": per_class,
        "macro_auroc": float(np.nanmean(list(per_class.values()))),
        "accuracy": float((prob.argmax(1) == yte).mean()),
        "skipped": folder.skipped,
    }


# ------------------------------------------------------------------------------------------- the paper's protocol
# X-WIN Tables 1-2: a linear probe per label (multi-label), AUROC per label and their mean; few-shot (k images per
# class) and label fractions (a share of the training subjects), each repeated over seeds and reported mean +- sd.


@dataclass
class LabelledImages:
    images: torch.Tensor  # (n, 1, S, S) float32 in [0, 1]
    labels: np.ndarray  # (n, L) float64: 1, 0, or NaN (unknown)
    names: list[str]  # the L label names
    subjects: np.ndarray  # (n,) the subject of each image (the unit the splits keep whole)
    paths: list[str]
    skipped: dict[str, str]


LABEL_META = ("path", "subject", "split")


def read_labels_csv(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a labels CSV and its label columns: ``path`` (the image, relative to the image root), optional
    ``subject`` (images of one subject stay on one side of every split), then one column per label with values 1
    (present), 0 (absent), or empty / -1 / nan (unknown: the image is left out for that label only)."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labels CSV {p} is not a file")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = list(reader.fieldnames or [])
        rows = list(reader)
    if "path" not in cols:
        raise ValueError(f"labels CSV {p}: no 'path' column (columns: {cols})")
    names = [c for c in cols if c not in LABEL_META]
    if not names:
        raise ValueError(f"labels CSV {p}: no label column besides {[c for c in cols if c in LABEL_META]}")
    if not rows:
        raise ValueError(f"labels CSV {p}: no rows")
    for i, r in enumerate(rows, start=2):
        for c in names:
            v = (r.get(c) or "").strip().lower()
            if v not in ("", "nan", "-1", "-1.0", "0", "1", "0.0", "1.0"):
                raise ValueError(f"labels CSV {p} line {i}: {c} = {r[c]!r}; expected 1, 0 or empty (unknown)")
    return rows, names


def label_matrix(rows: list[dict[str, str]], names: list[str]) -> np.ndarray:
    def val(v: str | None) -> float:
        v = (v or "").strip().lower()
        return float(v) if v in ("0", "1", "0.0", "1.0") else float("nan")

    return np.asarray([[val(r.get(c)) for c in names] for r in rows], dtype=np.float64).reshape(len(rows), len(names))


def load_labelled_images(labels_csv: str | Path, root: str | Path | None, image_size: int) -> LabelledImages:
    """The images of a labels CSV (:func:`read_labels_csv`) read like the real-CXR stream (PNG / JPEG / DICOM /
    NPY); unreadable or missing images are skipped with their reason."""
    from xwin.training.data.real_cxr import BadImage, read_radiograph, to_tensor

    rows, names = read_labels_csv(labels_csv)
    base = Path(root) if root is not None else Path(labels_csv).parent
    Y = label_matrix(rows, names)
    imgs, keep, paths, skipped = [], [], [], {}
    for i, r in enumerate(rows):
        p = base / r["path"]
        try:
            if not p.is_file():
                raise BadImage("missing", "no such file")
            arr = np.load(p).astype(np.float32) if p.suffix.lower() == ".npy" else read_radiograph(p)
            if arr.ndim != 2:
                raise BadImage("wrong_channels", f"array of shape {arr.shape}")
            imgs.append(to_tensor(arr, image_size, min_size=min(16, image_size)))
        except BadImage as e:
            skipped[r["path"]] = e.reason
            log.warning("probe image skipped: %s: %s", p, e)
            continue
        keep.append(i)
        paths.append(r["path"])
    if not imgs:
        raise ValueError(f"labels CSV {labels_csv}: no readable image under {base}")
    has_subject = any((r.get("subject") or "").strip() for r in rows)
    subjects = np.asarray([(rows[i].get("subject") or "").strip() or rows[i]["path"] for i in keep])
    if not has_subject:
        log.warning("labels CSV %s has no subject column: every image is its own subject", labels_csv)
    return LabelledImages(torch.stack(imgs), Y[keep], names, subjects, paths, skipped)


def grouped_split_multilabel(
    Y: np.ndarray, groups: np.ndarray, test_frac: float, seed: int, tries: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Whole subjects to each side (as :func:`grouped_split`): the first seeded order whose test share reaches
    ``test_frac`` of the images and whose two sides both hold a positive and a negative of every label."""
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise ValueError(f"the probe split needs >= 2 subjects, found {len(uniq)}")
    Y = np.asarray(Y, dtype=np.float64).reshape(len(groups), -1)

    def both(mask: np.ndarray) -> bool:
        y = Y[mask]
        return bool(np.all(np.nansum(y == 1, axis=0) > 0) and np.all(np.nansum(y == 0, axis=0) > 0))

    rng = np.random.default_rng(seed)
    for _ in range(tries):
        te = _test_mask(groups, rng.permutation(uniq), test_frac)
        if both(te) and both(~te):
            return np.flatnonzero(~te), np.flatnonzero(te)
    raise ValueError(
        f"no split of {len(uniq)} subjects puts a positive and a negative of every label on both sides; add subjects "
        "or drop labels that are almost always one value"
    )


def _standardise(x: torch.Tensor, tr: np.ndarray) -> torch.Tensor:
    mu, sd = x[tr].mean(0), x[tr].std(0, unbiased=False).clamp_min(1e-6)
    return (x - mu) / sd


def label_auroc(features: torch.Tensor, y: np.ndarray, tr: np.ndarray, te: np.ndarray, l2: float = 1e-3) -> float:
    """One label: logistic regression on the images ``tr`` whose label is known (features standardised with their
    statistics), AUROC on the known images of ``te``; NaN when either side lacks a class."""
    tr = tr[~np.isnan(y[tr])]
    te = te[~np.isnan(y[te])]
    if len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2:
        return float("nan")
    z = _standardise(features, tr)
    clf = fit_linear(z[tr], torch.from_numpy(y[tr].astype(np.int64)), 2, l2)
    with torch.no_grad():
        score = torch.softmax(clf(z[te]), dim=1)[:, 1].numpy()
    return auroc(score, y[te] == 1)


def _summary(per_seed: list[dict[str, float]], names: list[str], extra: dict | None = None) -> dict:
    def ms(v: list[float]) -> dict:
        a = np.asarray([x for x in v if np.isfinite(x)], dtype=np.float64)
        if not len(a):
            return {"mean": float("nan"), "sd": float("nan"), "n": 0}
        return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}

    means = [float(np.nanmean([r[c] for c in names])) if any(np.isfinite(r[c]) for c in names) else float("nan")
             for r in per_seed]  # fmt: skip
    out = {"auroc": {c: ms([r[c] for r in per_seed]) for c in names}, "mean_auroc": ms(means), "seeds": len(per_seed)}
    return {**out, **(extra or {})}


def _one_per_subject(idx: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random image of each subject among ``idx``."""
    out = []
    for g in np.unique(groups[idx]):
        out.append(rng.choice(idx[groups[idx] == g]))
    return np.asarray(out, dtype=np.int64)


def probe_protocol(
    features: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    subjects: np.ndarray,
    names: list[str],
    *,
    shots: tuple[int, ...] = (),
    fractions: tuple[float, ...] = (1.0,),
    seeds: int = 5,
    test_frac: float = 0.3,
    seed: int = 0,
    l2: float = 1e-3,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """The linear-probe protocol of X-WIN Tables 1-2 on frozen features (n, D) with labels (n, L) (1 / 0 / NaN).

    One split by subject (``split`` = (train, test) indices, else :func:`grouped_split_multilabel`) serves every row;
    each row trains one logistic regression per label and reports that label's AUROC on the whole test side:
    - ``all``: every training image;
    - ``fractions[f]``: the images of a random ``f`` share of the training subjects (at least 2), ``seeds`` draws;
    - ``shots[k]``: per label, k positive and k negative training images, each from another subject (one image per
      subject; fewer when the training side has fewer subjects of that class), ``seeds`` draws.
    Each row gives per label ``{mean, sd, n}`` over the draws where the label had both classes, and the mean AUROC
    over labels (per draw, then mean +- sd over draws).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    Y = np.asarray(labels, dtype=np.float64).reshape(len(x), -1)
    groups = np.asarray(subjects)
    if Y.shape[1] != len(names):
        raise ValueError(f"{Y.shape[1]} label columns for {len(names)} names")
    tr, te = split if split is not None else grouped_split_multilabel(Y, groups, test_frac, seed)
    tr, te = np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)
    if set(groups[tr]) & set(groups[te]):
        raise ValueError("the probe split puts one subject on both sides")

    def row(train: np.ndarray) -> dict[str, float]:
        return {c: label_auroc(x, Y[:, j], train, te, l2) for j, c in enumerate(names)}

    out: dict = {
        "labels": names,
        "n_train": len(tr),
        "n_test": len(te),
        "subjects": {"train": len(set(groups[tr])), "test": len(set(groups[te]))},
        "test_positives": {c: int(np.nansum(Y[te, j] == 1)) for j, c in enumerate(names)},
        "test_negatives": {c: int(np.nansum(Y[te, j] == 0)) for j, c in enumerate(names)},
        "all": _summary([row(tr)], names, {"train_images": len(tr)}),
        "fractions": {},
        "shots": {},
    }
    train_subjects = np.unique(groups[tr])
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fraction {f} is not in (0, 1]")
        if f >= 1:
            out["fractions"][f"{f:g}"] = out["all"]
            continue
        n_sub = min(len(train_subjects), max(2, math.ceil(f * len(train_subjects))))
        rows, counts = [], []
        for s in range(seeds):
            rng = np.random.default_rng([seed, s, round(f * 1e6)])
            pick = rng.choice(train_subjects, n_sub, replace=False)
            sub = tr[np.isin(groups[tr], pick)]
            rows.append(row(sub))
            counts.append(len(sub))
        out["fractions"][f"{f:g}"] = _summary(
            rows, names, {"train_subjects": n_sub, "train_images": float(np.mean(counts))}
        )
    for k in shots:
        if k < 1:
            raise ValueError(f"shots {k} must be >= 1")
        rows = []
        for s in range(seeds):
            rng = np.random.default_rng([seed, s, 7919 * k])
            r = {}
            for j, c in enumerate(names):
                y = Y[:, j]
                chosen = []
                for cls in (0.0, 1.0):
                    cand = _one_per_subject(tr[y[tr] == cls], groups, rng) if np.any(y[tr] == cls) else tr[:0]
                    chosen.append(rng.permutation(cand)[:k])
                r[c] = label_auroc(x, y, np.concatenate(chosen), te, l2)
            rows.append(r)
        out["shots"][str(k)] = _summary(rows, names, {"per_class": k})
    return out


def run_probe_protocol(
    checkpoint: str | Path,
    labels_csv: str | Path,
    *,
    root: str | Path | None = None,
    shots: tuple[int, ...] = (),
    fractions: tuple[float, ...] = (1.0,),
    seeds: int = 5,
    test_frac: float = 0.3,
    seed: int = 0,
    l2: float = 1e-3,
    which: str = "ema",
) -> dict:
    """``xwin probe --labels CSV``: the frozen encoder's pooled features of the CSV's images through
    :func:`probe_protocol`."""
    enc, mcfg = load_encoder(checkpoint, which)
    data = load_labelled_images(labels_csv, root, mcfg.img_size)
    feats = extract_features(enc, data.images)
    rep = probe_protocol(
        feats, data.labels, data.subjects, data.names, shots=shots, fractions=fractions, seeds=seeds,
        test_frac=test_frac, seed=seed, l2=l2,
    )  # fmt: skip
    return {"checkpoint": str(checkpoint), "encoder": which, "labels_csv": str(labels_csv), **rep,
            "skipped": data.skipped}  # fmt: skip
