"""A projection dataset's rings in the formats other loaders read: WebDataset tar shards and a Hugging Face
``datasets`` dataset (Parquet), with their geometry and actions (docs/interop.md).

Streaming: one ring is read at a time (its views in the stored dtype, float16 by default) and written before the
next is read, so memory holds one ring whatever the cohort's size. The rings are planned into shards
deterministically (per split, sorted volume ids, ``rings_per_shard`` rings each); a shard is written to a
``.partial`` file, renamed when complete, and then described by a ``<shard>.json`` manifest (its rings, samples,
bytes, sha256). A rerun skips every shard whose manifest names the same rings, spec and layout: an interrupted
export resumes where it stopped. ``index.json`` (every shard) and ``README.md`` (the dataset card) are removed when a
run is about to change the folder and written (atomically) last, ``index.json`` after everything else: a folder with
an ``index.json`` holds exactly the export it lists.

Samples (``per="ring"``: one per ring; ``per="view"``: one per view):
    WebDataset key ``<volume_id>/ring`` or ``<volume_id>/<view index, 3 digits>`` (the volume id is the key's
    folder, so ids with dots stay whole); members ``views.npy`` (V, H, W) or ``view.npy`` (H, W) in the stored
    dtype, ``geometry.json`` (index, yaw_deg, cone_vec, world_from_camera, intrinsics, height, width: the stored
    ViewMeta), ``actions.json`` (absolute yaws; an action is a yaw difference) and ``meta.json``.
    Hugging Face: the same fields as columns (``datasets`` Array features), files
    ``data/<split>-<i>-of-<n>.parquet`` and a README.md whose YAML header names the splits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xwin.schemas.render import ViewMeta
from xwin.storage.dataset import ProjectionDataset

FORMATS = ("webdataset", "hf")
PER = ("ring", "view")
ACTION_DEFINITION = (
    "X-WIN action from a context view c to a target view t: yaw_deg[t] - yaw_deg[c] in degrees, right-handed "
    "about the patient's superior axis (+S); yaw 0 = source anterior (docs/geometry.md)"
)
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Shard:
    """One planned shard: its file (relative to the export folder), split and rings, in write order."""

    name: str
    split: str
    ids: list[str]


@dataclass
class ExportReport:
    """What an export did: shards written and skipped (already complete), samples, bytes, seconds."""

    out: str
    format: str
    per: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rings: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0


def ring_splits(ds: ProjectionDataset, volume_ids: list[str]) -> dict[str, str]:
    """volume id -> split: the cohort's stored assignment (``xwin splits assign``); ``train`` for every ring when
    the cohort has none, ``unassigned`` for a ring the assignment does not name."""
    doc = ds.store.read_splits(ds.cohort)
    if doc is None:
        return dict.fromkeys(volume_ids, "train")
    return {v: (doc.volumes[v].split if v in doc.volumes else "unassigned") for v in volume_ids}


def plan_shards(splits: dict[str, str], fmt: str, rings_per_shard: int) -> list[Shard]:
    """Deterministic shards: per split (sorted), sorted volume ids in runs of ``rings_per_shard``."""
    if rings_per_shard < 1:
        raise ValueError(f"rings_per_shard must be at least 1, got {rings_per_shard}")
    by: dict[str, list[str]] = {}
    for vid in sorted(splits):
        by.setdefault(splits[vid], []).append(vid)
    shards = []
    for split in sorted(by):
        ids = by[split]
        chunks = [ids[i : i + rings_per_shard] for i in range(0, len(ids), rings_per_shard)]
        for i, chunk in enumerate(chunks):
            name = (
                f"{split}-{i:06d}.tar" if fmt == "webdataset" else f"data/{split}-{i:05d}-of-{len(chunks):05d}.parquet"
            )
            shards.append(Shard(name, split, chunk))
    return shards


def geometry_json(meta: ViewMeta, k: int | None = None) -> dict[str, Any]:
    """The stored ViewMeta as JSON: every view's (``k`` None) or view ``k``'s (the meta's position) geometry."""
    sel = slice(None) if k is None else k
    return {
        "frame": "RAS mm (docs/geometry.md)",
        "height": meta.height,
        "width": meta.width,
        "index": np.asarray(meta.index)[sel].tolist(),
        "yaw_deg": np.asarray(meta.yaw_deg)[sel].tolist(),
        "cone_vec": np.asarray(meta.cone_vec)[sel].tolist(),
        "world_from_camera": np.asarray(meta.world_from_camera)[sel].tolist(),
        "intrinsics": np.asarray(meta.intrinsics)[sel].tolist(),
    }


class _Parts(io.RawIOBase):
    """A read-only file over byte buffers, read in place: a tar member's content without one more copy."""

    def __init__(self, *parts: bytes | memoryview) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.size = sum(p.nbytes for p in self.parts)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = []
        while self.parts and (n < 0 or n > 0):
            p = self.parts[0]
            take = p.nbytes if n < 0 else min(n, p.nbytes)
            out.append(p[:take].tobytes())
            self.parts[0] = p[take:]
            if self.parts[0].nbytes == 0:
                self.parts.pop(0)
            n = n - take if n >= 0 else n
        return b"".join(out)


def _npy(a: np.ndarray) -> _Parts:
    """``a`` as the bytes of a .npy file (the format ``np.load`` reads): its header, then its buffer in place."""
    a = np.ascontiguousarray(a)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(a))
    return _Parts(head.getvalue(), a.reshape(-1).view(np.uint8).data)


class _Writer:
    """One shard being written: ``add(samples)`` per ring, ``close()`` renames the .partial file."""

    def __init__(self, path: Path) -> None:
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        os.replace(self.partial, self.path)


class _TarWriter(_Writer):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in close()
        self.tar.copybufsize = 4 << 20  # type: ignore[attr-defined]  # 4 MiB blocks per member copy (default 16 KiB)

    def add(self, samples: list[dict[str, Any]]) -> None:
        for s in samples:
            key = s["__key__"]
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                data = _npy(value) if ext.endswith(".npy") else _Parts(json.dumps(value).encode())
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = data.size, 0, 0o444
                self.tar.addfile(info, data)

    def close(self) -> None:
        self.tar.close()
        super().close()


class _ParquetWriter(_Writer):
    def __init__(self, path: Path, features: Any) -> None:
        super().__init__(path)
        self.features = features
        self.pq: Any = None  # the pyarrow ParquetWriter, opened with the first ring's schema

    def add(self, samples: list[dict[str, Any]]) -> None:
        import datasets
        import pyarrow.parquet as pq

        cols = {name: [s[name] for s in samples] for name in self.features}
        table = datasets.Dataset.from_dict(cols, features=self.features).data.table
        if self.pq is None:
            # no dictionary pages (views never repeat: arrow tries one and falls back), no statistics of pixel
            # columns, zstd: 5-6x faster than pyarrow's defaults on float16 views, a smaller file
            self.pq = pq.ParquetWriter(
                str(self.partial), table.schema, compression="zstd", use_dictionary=False, write_statistics=False
            )
        self.pq.write_table(table)  # one row group per ring: a reader never needs more than a ring in memory

    def close(self) -> None:
        if self.pq is not None:
            self.pq.close()
        super().close()


def hf_features(ds: ProjectionDataset, per: str) -> Any:
    """The ``datasets.Features`` of a sample (``per`` ring or view) of ``ds``."""
    import datasets as hf

    s = ds.spec
    V, H, W, dt = s.n_views, s.height, s.width, s.store_dtype
    f64, text = hf.Value("float64"), hf.Value("string")
    common = {"volume_id": text, "cohort": text, "spec_hash": text, "split": text}
    if per == "ring":
        return hf.Features(
            {
                **common,
                "views": hf.Array3D((V, H, W), dt),
                "index": hf.Sequence(hf.Value("int32"), length=V),
                "yaw_deg": hf.Sequence(f64, length=V),
                "cone_vec": hf.Array2D((V, 12), "float64"),
                "world_from_camera": hf.Array3D((V, 4, 4), "float64"),
                "intrinsics": hf.Array3D((V, 3, 3), "float64"),
            }
        )
    return hf.Features(
        {
            **common,
            "view": hf.Array2D((H, W), dt),
            "index": hf.Value("int32"),
            "yaw_deg": f64,
            "cone_vec": hf.Sequence(f64, length=12),
            "world_from_camera": hf.Array2D((4, 4), "float64"),
            "intrinsics": hf.Array2D((3, 3), "float64"),
        }
    )


def ring_samples(ds: ProjectionDataset, vid: str, split: str, fmt: str, per: str) -> tuple[list[dict[str, Any]], int]:
    """The samples of one ring in ``fmt`` and the bytes of its views (stored dtype)."""
    V = ds.spec.n_views
    views, meta = ds.read_views(vid, np.arange(V), dtype=None)
    common = {"volume_id": vid, "cohort": ds.cohort, "spec_hash": ds.spec_hash, "split": split}
    if fmt == "hf":
        geo = {
            "index": np.asarray(meta.index, dtype=np.int32),
            "yaw_deg": np.asarray(meta.yaw_deg),
            "cone_vec": np.asarray(meta.cone_vec),
            "world_from_camera": np.asarray(meta.world_from_camera),
            "intrinsics": np.asarray(meta.intrinsics),
        }
        if per == "ring":
            return [{**common, "views": views, **geo}], views.nbytes
        return [{**common, "view": views[k], **{n: a[k] for n, a in geo.items()}} for k in range(V)], views.nbytes
    info = {
        **common,
        "mu_water_per_mm": ds.spec.mu_water_per_mm,
        "view_units": "line integral of mu [1/mm] * mm",
        "dtype": str(views.dtype),
    }
    if per == "ring":
        actions = {"yaw_deg": np.asarray(meta.yaw_deg).tolist(), "definition": ACTION_DEFINITION}
        sample = {
            "__key__": f"{vid}/ring",
            "views.npy": views,
            "geometry.json": geometry_json(meta),
            "actions.json": actions,
            "meta.json": info,
        }
        return [sample], views.nbytes
    out = []
    for k in range(V):
        out.append(
            {
                "__key__": f"{vid}/{k:03d}",
                "view.npy": views[k],
                "geometry.json": geometry_json(meta, k),
                "actions.json": {"yaw_deg": float(meta.yaw_deg[k]), "definition": ACTION_DEFINITION},
                "meta.json": info,
            }
        )
    return out, views.nbytes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _complete(out: Path, shard: Shard, want: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a shard already written with the same rings, spec and layout (None: write it)."""
    path, man = out / shard.name, out / f"{shard.name}.json"
    if not (path.exists() and man.exists()):
        return None
    try:
        m = json.loads(man.read_text())
    except (OSError, ValueError):
        return None
    same = all(m.get(k) == v for k, v in want.items()) and m.get("ids") == shard.ids
    return m if same and m.get("bytes") == path.stat().st_size else None


def _unplanned(root: Path, fmt: str, planned: set[str]) -> list[Path]:
    """The shards (and manifests, partial files) of an earlier plan that this plan does not name."""
    ext = ".tar" if fmt == "webdataset" else ".parquet"
    folder = root if fmt == "webdataset" else root / "data"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        name = str(p.relative_to(root))
        shard = name.removesuffix(".partial").removesuffix(".json")
        if shard.endswith(ext) and shard not in planned:
            out.append(p)
    return out


def _remove_unplanned(root: Path, fmt: str, planned: set[str]) -> None:
    """Delete the files of :func:`_unplanned`: a reader globbing the folder must see each ring once."""
    for p in _unplanned(root, fmt, planned):
        p.unlink()


def export_rings(
    ds: ProjectionDataset,
    out: str | os.PathLike[str],
    fmt: str,
    *,
    per: str = "ring",
    rings_per_shard: int = 8,
    volume_ids: list[str] | None = None,
    card_markdown: str | None = None,
    on_progress: Progress | None = None,
) -> ExportReport:
    """Export the committed rings of ``ds`` (or ``volume_ids``) as ``fmt`` (webdataset | hf) under ``out``
    (module docstring); returns what was written and skipped. ``on_progress`` gets one dict per shard."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: use one of {', '.join(FORMATS)}")
    if per not in PER:
        raise ValueError(f"--per must be 'ring' or 'view', got {per!r}")
    ids = sorted(ds.volume_ids() if volume_ids is None else volume_ids)
    if not ids:
        raise LookupError(f"dataset {ds.cohort}/{ds.spec_hash} has no committed rings")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    splits = ring_splits(ds, ids)
    shards = plan_shards(splits, fmt, rings_per_shard)
    want = {"format": fmt, "per": per, "cohort": ds.cohort, "spec_hash": ds.spec_hash}
    complete = {s.name: _complete(root, s, want) for s in shards}
    if any(m is None for m in complete.values()) or _unplanned(root, fmt, set(complete)):
        # the folder is about to change: its index (the mark of a complete export) goes first, and comes back
        # last, so an interrupted run never leaves an index naming shards that are gone or being rewritten
        for name in ("index.json", "README.md"):
            (root / name).unlink(missing_ok=True)
    _remove_unplanned(root, fmt, set(complete))
    features = hf_features(ds, per) if fmt == "hf" else None
    rep = ExportReport(out=str(root), format=fmt, per=per)
    t0 = time.perf_counter()
    manifests = []
    for i, shard in enumerate(shards):
        done = complete[shard.name]
        if done is not None:
            rep.skipped.append(shard.name)
            manifests.append(done)
            if on_progress:
                on_progress({"shard": shard.name, "done": i + 1, "of": len(shards), "skipped": True})
            continue
        w: _TarWriter | _ParquetWriter = (
            _TarWriter(root / shard.name) if fmt == "webdataset" else _ParquetWriter(root / shard.name, features)
        )
        n = nbytes = 0
        for vid in shard.ids:
            samples, b = ring_samples(ds, vid, shard.split, fmt, per)
            w.add(samples)
            n, nbytes = n + len(samples), nbytes + b
        w.close()
        path = root / shard.name
        m = {**want, "shard": shard.name, "split": shard.split, "ids": shard.ids, "samples": n}
        m.update(bytes=path.stat().st_size, sha256=_sha256(path))
        tmp = root / f"{shard.name}.json.partial"
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, root / f"{shard.name}.json")
        manifests.append(m)
        rep.written.append(shard.name)
        rep.rings += len(shard.ids)
        rep.samples += n
        rep.bytes += nbytes
        if on_progress:
            on_progress({"shard": shard.name, "done": i + 1, "of": len(shards), "samples": n, "skipped": False})
    rep.seconds = time.perf_counter() - t0
    index = {
        **want,
        "spec": json.loads(ds.spec.canonical_json()),
        "store": ds.store.url,
        "rings": len(ids),
        "samples": sum(int(m["samples"]) for m in manifests),
        "splits": sorted(set(splits.values())),
        "shards": [{k: m[k] for k in ("shard", "split", "ids", "samples", "bytes", "sha256")} for m in manifests],
        "action_definition": ACTION_DEFINITION,
    }
    _write_atomic(root / "README.md", _readme(index, card_markdown))
    _write_atomic(root / "index.json", json.dumps(index, indent=1))  # last: the export is complete
    return rep


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _readme(index: dict[str, Any], card_markdown: str | None) -> str:
    """README.md: for ``hf`` a YAML header naming each split's files (what ``datasets.load_dataset`` reads), then the
    dataset card and how the samples are laid out."""
    head: list[str] = []
    if index["format"] == "hf":
        head = ["---", "configs:", "- config_name: default", "  data_files:"]
        for split in index["splits"]:
            head += [f"  - split: {split}", f"    path: data/{split}-*.parquet"]
        head += ["---", ""]
    per = index["per"]
    if index["format"] == "hf":
        how = 'd = datasets.load_dataset("<this folder>", split="train").with_format("numpy", dtype=None)'
    else:
        how = 'd = webdataset.WebDataset("<this folder>/train-{000000..N}.tar").decode()'
    body = [
        f"# {index['cohort']} / {index['spec_hash']}: {index['rings']} rings, {index['samples']} samples "
        f"(one per {per})",
        "",
        f"Exported by `xwin export --what dataset --format {index['format']} --per {per}`. Views are line integrals of",
        "mu [1/mm] * mm in the store's dtype; geometry is every view's stored `cone_vec` (ASTRA order: source,",
        "detector centre, u, v; RAS mm), OpenCV `world_from_camera` and `intrinsics`. " + index["action_definition"],
        "",
        "```python",
        how,
        "```",
        "",
    ]
    return "\n".join(head + body + ([card_markdown] if card_markdown else []))
