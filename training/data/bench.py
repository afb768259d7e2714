"""Consumer benchmark: the X-WIN stream over a Zarr projection dataset vs a WebDataset tar of the same views.

Baseline (fair by construction): the same rings written as WebDataset tar shards, one record per volume with one
``.npy`` member per view (``000.npy`` .. ``119.npy``, stored dtype, uncompressed) plus ``yaw.json``; read with
webdataset's own pipeline (``WebDataset(shards, shardshuffle=..., nodesplitter=split_by_worker)`` -> ``.shuffle``),
and for each record the *same* sampler picks the 1 + N views, which are the only ``.npy`` members decoded. Both
sides then run the identical appearance + resize + batch assembly code (``stream.collate_views``: in place into
shared-memory batch tensors), produce one sample per volume per epoch and batch 12,
under the same DataLoader (same worker counts, forkserver workers) and the same read-ahead inside each process: the
stream reads ``prefetch`` samples ahead on ``io_threads`` threads (``ResumableStream``), and so does the baseline
(its records are pulled from the tar pipeline and their views decoded on as many threads, as far ahead), or neither
(``io_threads=0``). A tar must be streamed record by record, so the baseline reads all 120 views of a volume to use 9;
the Zarr stream reads only those 9 chunks.

The tars are cached (``$TMPDIR/xwin-wds-<key>``) under a key of the content they were built from: the dataset's
catalog (every ring's id and sha256 of its stored values), spec hash and stored dtype, and the shard count
(``wds_content_key``). A dataset whose rings changed under the same spec gets new tars; a reader without a catalog
gets its tars rebuilt every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from xwin.schemas.render import RenderSpec

from .loader import forkserver_context, make_loader, shutdown_workers, worker_init
from .order import unit_rng
from .readers import StoreSource
from .sampling import XWinSampling
from .transforms import out_dtype
from .xwin_stream import XWinStream, collate_views


# ---------------------------------------------------------------------------------------------- dataset builders
def make_bench_store(path: str | Path, n_volumes: int = 8, size: int = 512, backend: str = "joseph") -> StoreSource:
    """Render the bundled CT once (``size``² detector at 512/size mm, 120 views x 3 deg) and store ``n_volumes``
    intensity-scaled copies under cohort "bench". Returns its source."""
    import nibabel as nib

    from xwin.pipeline.example import example_ct_path
    from xwin.pipeline.render import render_ring
    from xwin.storage import open_store

    spec = RenderSpec(height=size, width=size, pixel_mm=512.0 / size)
    ds = open_store(str(path)).dataset("bench", spec)
    todo = [f"bench-{i:03d}" for i in range(n_volumes) if not ds.has_ring(f"bench-{i:03d}")]
    if todo:
        img: Any = nib.load(str(example_ct_path()))  # a NIfTI image
        views, geom = render_ring(np.asarray(img.dataobj), img.affine, spec, backend=backend)
        for vid in todo:
            f = np.float32(0.8 + 0.4 * int(vid[-3:]) / max(1, n_volumes - 1))
            ds.write_ring(vid, views * f, geom.view_meta(), {"bench_scale": float(f)})
    return StoreSource(str(path), "bench", spec)


WDS_FORMAT = 1  # bump when the tar layout written below changes: old caches stop matching


def wds_content_key(reader: Any, n_shards: int) -> str | None:
    """The key of the tars ``write_wds_shards`` builds from ``reader``'s dataset: a digest of its catalog (each ring's
    id and content checksum), spec hash, stored dtype, the shard count and the tar format. ``None`` when the reader
    has no catalog (its content cannot be named without reading it all): such tars are never reused."""
    if not hasattr(reader, "catalog"):
        return None
    spec = reader.spec
    rows = sorted((r.volume_id, r.checksum) for r in reader.catalog())
    doc = {
        "format": WDS_FORMAT,
        "spec_hash": spec.spec_hash,
        "store_dtype": spec.store_dtype,
        "n_shards": int(n_shards),
        "rings": rows,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def write_wds_shards(source: StoreSource, out_dir: str | Path, n_shards: int = 4) -> list[str]:
    """Write the dataset's rings as ``n_shards`` tar shards (records = volumes, one .npy per view).

    The shards already in ``out_dir`` are reused only when its ``content.json`` holds the same
    :func:`wds_content_key` (same rings, same checksums, same spec and shard count); otherwise they are rebuilt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = source.open()
    ids = sorted(reader.volume_ids())
    n_shards = max(1, min(n_shards, len(ids)))
    paths = [out / f"shard-{s:04d}.tar" for s in range(n_shards)]
    stamp = out / "content.json"
    key = wds_content_key(reader, n_shards)
    if key is not None and stamp.exists() and all(p.exists() for p in paths):
        with contextlib.suppress(ValueError, OSError):
            if json.loads(stamp.read_text()).get("key") == key:
                return [str(p) for p in paths]
    stamp.unlink(missing_ok=True)  # rebuilding: the old stamp must not vouch for half-written shards
    for old in out.glob("shard-*.tar"):
        old.unlink()
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(p, "w")) for p in paths]
        for i, vid in enumerate(ids):
            ring = (
                reader.read_ring(vid)
                if hasattr(reader, "read_ring")
                else reader.read_views(vid, range(reader.spec.n_views))[0]
            )
            ring = ring.astype(reader.spec.store_dtype, copy=False)
            t = tars[i % n_shards]
            members = {"__key__.txt": vid.encode(), "yaw.json": json.dumps(reader.spec.yaws_deg).encode()}
            for k, v in enumerate(ring):
                b = io.BytesIO()
                np.save(b, v)
                members[f"{k:03d}.npy"] = b.getvalue()
            for name, data in members.items():
                if name == "__key__.txt":
                    continue
                ti = tarfile.TarInfo(f"{vid}.{name}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    if key is not None:
        stamp.write_text(json.dumps({"key": key, "volumes": len(ids), "n_shards": n_shards}))
    return [str(p) for p in paths]


def default_wds_dir(reader: Any, n_shards: int) -> Path:
    """``$TMPDIR/xwin-wds-<content key>`` (a reader without a catalog: ``-<spec hash>-uncached``, rebuilt)."""
    key = wds_content_key(reader, n_shards)
    name = f"xwin-wds-{key[:24]}" if key else f"xwin-wds-{reader.spec.spec_hash}-uncached"
    return Path(os.environ.get("TMPDIR", "/tmp")) / name


class WdsXWin(IterableDataset):
    """The baseline: webdataset's pipeline over the tar shards, the same sampler and transforms per record."""

    def __init__(
        self,
        shards: list[str],
        spec: RenderSpec,
        sampling: XWinSampling,
        image_size: int,
        appearance: str,
        batch_size: int,
        seed: int = 0,
        shuffle: int = 8,
        dtype: torch.dtype = torch.float32,
        io_threads: int = 0,
        prefetch: int = 0,
    ) -> None:
        self.shards, self.spec, self.sampling, self.dtype = shards, spec, sampling, dtype
        self.io_threads, self.prefetch = int(io_threads), int(prefetch)
        self.image_size, self.appearance, self.batch_size, self.seed, self.shuffle = (
            image_size,
            appearance,
            batch_size,
            seed,
            shuffle,
        )

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        plan = self.sampling.plan(self.spec)
        yaws = np.asarray(self.spec.yaws_deg)
        pipe = wds.WebDataset(
            self.shards,
            shardshuffle=len(self.shards),
            nodesplitter=wds.split_by_worker,
            workersplitter=None,
            empty_check=False,
            seed=self.seed,
        ).shuffle(self.shuffle)

        def sample(rec: dict) -> dict:
            vid = rec["__key__"]
            d = plan.draw(unit_rng(self.seed, 0, vid, 0))
            want = np.concatenate([[d.context_index], d.target_indices])
            views = [np.load(io.BytesIO(rec[f"{int(k):03d}.npy"])) for k in want]  # decode only these 9 members
            return {
                "_views": views,
                "actions": torch.from_numpy(d.actions_deg),
                "context_yaw": torch.tensor(yaws[want[0]], dtype=torch.float32),
                "volume_id": vid,
            }

        batch: list[dict] = []
        for s in self._read_ahead(pipe, sample):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield _collate(batch, self.appearance, self.image_size, self.dtype)
                batch = []
        if batch:
            yield _collate(batch, self.appearance, self.image_size, self.dtype)

    def _read_ahead(self, pipe: Any, sample: Any) -> Iterator[dict]:
        """Samples in record order. With ``io_threads`` and ``prefetch``: like ``ResumableStream._read_ahead``, up
        to ``prefetch + 1`` samples in flight on ``io_threads`` threads, each pulling the next record from the tar
        pipeline (one at a time: a tar is one stream) and decoding its views."""
        if self.io_threads <= 0 or self.prefetch <= 0:
            for rec in pipe:
                yield sample(rec)
            return
        it, lock, end = iter(pipe), threading.Lock(), object()

        def next_sample() -> Any:
            with lock:
                rec = next(it, end)
            return end if rec is end else sample(rec)

        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="wds-read") as pool:
            q: deque = deque(pool.submit(next_sample) for _ in range(self.prefetch + 1))
            while q:
                got = q.popleft().result()
                if got is end:  # the pipeline is exhausted: the futures still queued end too, or hold a record
                    continue
                q.append(pool.submit(next_sample))
                yield got


def _collate(samples: list[dict], appearance: str, image_size: int, dtype: torch.dtype) -> dict:
    """The consumer's own batch assembly (``collate_views``: same transform, written in place into shared memory)."""
    out = collate_views([s.pop("_views") for s in samples], appearance, image_size, dtype)
    out.update(
        {
            k: torch.stack([s[k] for s in samples])
            if isinstance(samples[0][k], torch.Tensor)
            else [s[k] for s in samples]
            for k in samples[0]
        }
    )
    return out


# ---------------------------------------------------------------------------------------------- measurement
@dataclass
class Measure:
    samples: int
    seconds: float
    startup_s: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _drain(make_iter, min_samples: int) -> Measure:
    """Iterate epochs until ``min_samples`` samples after the first batch; time from the first batch on."""
    t0 = time.perf_counter()
    n, first, t1 = 0, True, t0
    while True:
        for b in make_iter():
            if first:
                t1, first = time.perf_counter(), False
                continue
            n += len(b["volume_id"])
            if n >= min_samples:
                return Measure(n, time.perf_counter() - t1, t1 - t0)


def run_bench(
    source: StoreSource,
    *,
    workers: tuple[int, ...] = (0, 2, 4),
    samples: int = 96,
    batch_size: int = 12,
    image_size: int | None = None,
    appearance: str = "minmax",
    wds_dir: str | Path | None = None,
    main_workers: int = 2,
    dtype: str | None = None,
    fresh_buffers: bool = True,
    repeats: int = 1,
    io_threads: int | None = None,
    prefetch: int | None = None,
) -> dict[str, Any]:
    """Each row: the stream as the trainer runs it (reused batch buffers, ``buffers.py``), the WebDataset baseline,
    and (``fresh_buffers``) the stream allocating every batch afresh like the baseline, which isolates what the read
    path alone gains over WebDataset (``ratio_fresh_buffers``). ``repeats`` rounds over all configurations; rows
    give medians, ``runs`` every value (``measures``: samples, seconds and start-up of each).

    ``io_threads``/``prefetch``: the read-ahead of every reader in each process, the same for the stream and the
    baseline (default: the stream's own, ``ResumableStream``'s 2 threads, 4 samples; ``io_threads=0``: none)."""
    reader = source.open()
    spec = reader.spec
    S = image_size or spec.width
    sampling = XWinSampling()
    odt = out_dtype(dtype)
    n_vol = len(reader.volume_ids())
    probe = XWinStream(source, sampling=sampling)
    threads = probe.io_threads if io_threads is None else int(io_threads)
    ahead = probe.prefetch if prefetch is None else int(prefetch)
    if threads <= 0 or ahead <= 0:
        threads, ahead = 0, 0
    n_shards = max(4, max(workers))
    wds_dir = Path(wds_dir) if wds_dir else default_wds_dir(reader, min(n_shards, n_vol))
    t = time.perf_counter()
    shards = write_wds_shards(source, wds_dir, n_shards=n_shards)
    tar_s = time.perf_counter() - t
    bytes_per_sample = (1 + sampling.n_targets) * spec.height * spec.width * np.dtype(spec.store_dtype).itemsize

    def stream_loader(w: int, reuse: bool):
        ds = XWinStream(
            source,
            sampling=sampling,
            image_size=S,
            appearance=appearance,
            batch_size=batch_size,
            shuffle_window=64,
            seed=0,
            dtype=odt,
            reuse_buffers=reuse,
            io_threads=threads,
            prefetch=ahead,
        )
        return make_loader(ds, num_workers=w)

    def wds_loader(w: int) -> DataLoader:
        base = WdsXWin(shards, spec, sampling, S, appearance, batch_size, dtype=odt, io_threads=threads, prefetch=ahead)
        kw: dict[str, Any] = {"batch_size": None, "num_workers": w}
        if w:
            kw.update(multiprocessing_context=forkserver_context(), worker_init_fn=worker_init, persistent_workers=True)
        return DataLoader(base, **kw)

    def timed(make) -> Measure:
        loader = make()
        try:
            return _drain(partial(iter, loader), samples)
        finally:  # stop the workers now: left to the garbage collector they read ahead into the next measurement
            loader.close() if hasattr(loader, "close") else shutdown_workers(loader)
            del loader

    got: dict[int, dict[str, list[Measure]]] = {w: {"stream": [], "fresh": [], "wds": []} for w in workers}
    for _ in range(max(1, int(repeats))):  # rounds interleave every configuration: slow spells hit all of them
        for w in workers:
            got[w]["stream"].append(timed(partial(stream_loader, w, True)))
            if fresh_buffers:
                got[w]["fresh"].append(timed(partial(stream_loader, w, False)))
            got[w]["wds"].append(timed(partial(wds_loader, w)))
    rows: list[dict[str, Any]] = []
    for w in workers:
        r = {k: [m.samples_per_s for m in ms] for k, ms in got[w].items()}
        sps, base = float(np.median(r["stream"])), float(np.median(r["wds"]))
        fresh = float(np.median(r["fresh"])) if r["fresh"] else None
        rows.append(
            {
                "workers": w,
                "samples_per_s": sps,
                "mb_per_s": sps * bytes_per_sample / 1e6,
                "samples_per_s_fresh_buffers": fresh,
                "ratio_fresh_buffers": fresh / base if fresh and base else None,
                "baseline_samples_per_s": base,
                "baseline_mb_per_s": base * bytes_per_sample / 1e6,
                "baseline_tar_mb_read_per_s": base
                * spec.n_views
                * spec.height
                * spec.width
                * np.dtype(spec.store_dtype).itemsize
                / 1e6,
                "ratio": sps / base if base else float("inf"),
                "startup_s": float(np.median([m.startup_s for m in got[w]["stream"]])),
                "baseline_startup_s": float(np.median([m.startup_s for m in got[w]["wds"]])),
                "runs": r,
                "measures": {
                    k: [{"samples": m.samples, "seconds": m.seconds, "startup_s": m.startup_s} for m in ms]
                    for k, ms in got[w].items()
                },
            }
        )
    main = next((r for r in rows if r["workers"] == main_workers), rows[-1])
    need = vit_b16_need()
    return {
        "dataset": source.dataset_url,
        "volumes": n_vol,
        "view_shape": [spec.height, spec.width],
        "store_dtype": spec.store_dtype,
        "image_size": S,
        "batch_size": batch_size,
        "views_per_sample": 1 + sampling.n_targets,
        "output_dtype": str(odt).removeprefix("torch."),
        "cpu_count": os.cpu_count(),
        "wds_build_s": tar_s,
        "wds_dir": str(wds_dir),
        "io_threads": threads,
        "prefetch": ahead,
        "rows": rows,
        "workers": main["workers"],
        "samples_per_s": main["samples_per_s"],
        "mb_per_s": main["mb_per_s"],
        "baseline_samples_per_s": main["baseline_samples_per_s"],
        "ratio": main["ratio"],
        "gpu_need_samples_per_s": need["samples_per_s"],
        "gpu_need": need,
        "keeps_up_ratio": max(r["samples_per_s"] for r in rows) / need["samples_per_s"],
        "repeats": max(1, int(repeats)),
    }


def block_flops(tokens: float, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward multiply-add FLOPs (x2) of one pre-norm transformer block on one sequence."""
    return 2 * tokens * (4 * dim * dim + 2 * mlp_ratio * dim * dim) + 2 * 2 * tokens * tokens * dim


def xwin_step_flops(cfg: Any, keep: float, masked: float) -> dict[str, float]:
    """Analytic FLOPs of one X-WIN training step as ``xwin.training.loop.Trainer.train_step`` builds it (training = 3x
    forward for trained paths, 1x for the EMA encoder). ``keep``/``masked``: mean context/masked tokens per image
    of the multi-block masks. B samples (1 context + N targets each) and R real images (default R = B*N)."""
    m, d = cfg.model, cfg.data
    L, D, P = m.grid**2, m.embed_dim, m.view_pred_dim
    B, N = d.batch_size, d.n_targets
    R = d.real_batch_size or B * N
    enc = lambda T: m.depth * block_flops(T, D) + 2 * T * D * m.patch_size**2 * m.in_chans  # noqa: E731
    f = {
        "context_encoder": 3 * B * enc(L),
        "ema_targets": (B * N + R) * enc(L),
        "view_predictor": 3 * B * N * m.view_pred_depth * block_flops(L + 1, P),
        "mim_encoder": 3 * (B * N + R) * enc(keep),
        "mask_predictor": 3 * (B * N + R) * m.mask_pred_depth * block_flops(keep + masked, m.mask_pred_dim),
    }
    f["domain_classifier"] = (
        3
        * m.domain_depth
        * ((B * N + R) * block_flops(keep + masked, m.domain_dim or D) + B * N * block_flops(L, m.domain_dim or D))
    )
    f["total"] = sum(f.values())
    f["images_per_step"] = B * (1 + N) + R
    return f


def mean_mask_tokens(cfg: Any, draws: int = 20, seed: int = 0) -> tuple[float, float]:
    """Mean (keep, masked) tokens per image of the config's multi-block masker (R images per draw)."""
    from xwin.training.masks import MultiBlockMasker

    mk = MultiBlockMasker(cfg.model.grid, **cfg.masks.model_dump())
    rng = np.random.default_rng(seed)
    R = cfg.data.real_batch_size or cfg.data.batch_size * cfg.data.n_targets
    ks, ms = zip(*[(mb.keep.shape[1], mb.masked.shape[1]) for mb in (mk.sample(rng, R) for _ in range(draws))])
    return float(np.mean(ks)), float(np.mean(ms))


def vit_b16_need(mfu: float = 0.4, peak_tflops: float = 989.0, cfg: Any = None) -> dict[str, float]:
    """THE figure (docs/training-data.md, docs/benchmarks.md): samples/s one H100 consumes training X-WIN with a
    ViT-B/16 at 512^2, batch 12, as our trainer builds a step (``xwin.training.config`` preset "base": N = 8 targets and
    R = B*N = 96 real images per step for L_MIM(real)/L_domain, like the paper's N real images per N targets).

    One step = ``xwin_step_flops`` (~112.7 TFLOP); at ``mfu`` of ``peak_tflops`` (H100 SXM bf16 dense) a step takes
    total / (mfu*peak) s, and the trainer consumes B samples (B*(1+N) DRRs) plus R real images per step.
    """
    from xwin.training.config import load_config

    cfg = cfg or load_config(preset="base")
    keep, masked = mean_mask_tokens(cfg)
    f = xwin_step_flops(cfg, keep, masked)
    step_s = f["total"] / (mfu * peak_tflops * 1e12)
    B, N = cfg.data.batch_size, cfg.data.n_targets
    R = cfg.data.real_batch_size or B * N
    return {
        "flops_per_step": f["total"],
        "flops_per_sample": f["total"] / B,
        "step_s": step_s,
        "mfu": mfu,
        "samples_per_s": B / step_s,
        "drr_views_per_s": B * (1 + N) / step_s,
        "real_images_per_s": R / step_s,
        "batch_size": B,
        "real_per_step": R,
    }
