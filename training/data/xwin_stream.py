"""``XWinStream``: X-WIN samples (a context view and N target views of one ring, with their actions) read from a
projection dataset, transformed straight into reusable batch buffers (docs/training-data.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .buffers import empty_tensor
from .readers import ViewReader, ViewSource
from .sampling import SamplingPlan, XWinSampling
from .stream import ResumableStream
from .transforms import appearance_into, out_dtype, resize

log = logging.getLogger(__name__)


class XWinStream(ResumableStream):
    """X-WIN samples from a projection dataset (``source.open()`` -> reader with ``volume_ids``/``read_views``).

    Each sample (one ``read_views`` call of the 1 + N views) is a dict:
        context (1,S,S), targets (N,1,S,S) -- appearance-transformed and resized to S; float32, or ``dtype``
        actions (N,) float32 degrees          -- what the predictor is conditioned on (sampling.py, mode)
        actions_norm (N,) float32             -- actions / max_abs_deg, in [-1, 1]
        actions_cumulative (N,) float32       -- target yaw - context yaw, degrees (== actions for "direct")
        context_yaw () float32, target_yaws (N,) float32 -- absolute yaws of the views read (from the store)
        volume_id str, position int, epoch int
        look (K,) float32, look_json str      -- with ``looks``: the radiograph look the images were made with
                                                 (``xwin.schemas.look.LOOK_VECTOR_FIELDS`` order; docs/appearance.md)

    dtype: output image dtype, ``None``/"float32" (default), or "float16"/"bfloat16" (half the bytes to move;
    the trainer autocasts to bf16 on GPU anyway). Values are computed in float32 and rounded once.

    Throughput (docs/training-data.md, Loader): reads (prefetch threads) return the stored views untouched; the
    appearance transform writes each view straight into the batch tensors, which inside a DataLoader worker live
    in shared memory, so a sample's pixels are written once after decoding and never copied again. Those tensors
    are reused buffers (``buffers.py``: shared slots from ``ResumableLoader``, a pool in-process), never reused
    while any tensor made from them is alive; ``reuse_buffers=False`` allocates every batch afresh.
    """

    def __init__(
        self,
        source: ViewSource,
        *,
        sampling: XWinSampling | None = None,
        image_size: int = 512,
        appearance: str = "minmax",
        dtype: str | torch.dtype | None = None,
        labels: bool = False,
        looks: Any = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("draws_per_item", kw.pop("draws_per_volume", 1))
        super().__init__(**kw)
        self.source = source
        # the rings' projected labels as optional targets: "context_labels" (C,S,S) and "target_labels" (N,C,S,S),
        # thickness in mm resized like the images (a ring without labels is skipped, with a logged reason)
        self.labels = bool(labels)
        self.sampling = sampling or XWinSampling()
        self.image_size = int(image_size)
        # domain actions (xwin.schemas.look.LookRanges): per sample a look drawn with the sample's own rng makes the
        # images from the ring's material bases (docs/appearance.md); the sample records it ("look", "look_json")
        self.looks = looks
        self.appearance = appearance if looks is None else "none"
        self.dtype = out_dtype(dtype)
        self._reader: ViewReader | None = None
        self._reader_pid: int | None = None
        self._reader_plan: SamplingPlan | None = None
        self._reader_kw: dict = {}

    @property
    def reader(self) -> ViewReader:
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = self.source.open()
            self._reader_pid = os.getpid()
            self._reader_plan = self.sampling.plan(self._reader.spec)
            self._reader_kw = _stored_dtype_kw(self._reader)
        return self._reader

    @property
    def plan(self) -> SamplingPlan:
        _ = self.reader  # opens this process's reader, and with it the plan
        assert self._reader_plan is not None
        return self._reader_plan

    def _keys(self) -> list[str]:
        r = self.reader
        if not hasattr(r, "catalog"):  # readers without a catalog (synthetic, tests): their ids as they are
            return list(r.volume_ids())
        rows = r.catalog()
        if self.catalog_as_of is None:
            self.catalog_as_of = _agreed_as_of(max((row.committed_at for row in rows), default=None))
        if not self.catalog_as_of:
            return []
        cut = datetime.fromisoformat(self.catalog_as_of)
        return [row.volume_id for row in rows if row.committed_at <= cut]

    def _load(self, key: str, draw: int, rng: np.random.Generator) -> dict | None:
        """Reads the 1 + N views (context first) in one call; the images are made by ``_finalize``/``_collate``.

        A ring that cannot be read as data (no longer committed, missing or corrupt objects) is skipped with a logged
        reason (``None``): one bad volume never stops a training epoch. Infrastructure errors (the store itself
        unreachable after retries) still raise."""
        d = self.plan.draw(rng)
        want = np.concatenate([[d.context_index], d.target_indices])
        # one call in sample order (the reader takes any order): touches only these views' chunks, no reordering copy
        try:
            views, meta = self.reader.read_views(key, want, **self._reader_kw)
        except (KeyError, FileNotFoundError, ValueError) as e:  # NotCommitted is a KeyError; corrupt data ValueError
            log.warning("skipping volume %s: %s: %s", key, type(e).__name__, e)
            return None
        got_idx = np.asarray(meta.index, dtype=np.int64)
        if not np.array_equal(got_idx, want):
            raise ValueError(f"reader returned views {got_idx.tolist()} of {key!r}, asked for {want.tolist()}")
        yaws = np.asarray(meta.yaw_deg, dtype=np.float64)
        extra: dict[str, Any] = {}
        if self.labels:
            try:
                read_labels = getattr(self.reader, "read_labels", None)
                if read_labels is None:
                    raise TypeError(f"labels=True needs a reader with read_labels, got {type(self.reader).__name__}")
                lab = torch.from_numpy(read_labels(key, want)).transpose(0, 1)  # (1+N, C, H, W)
            except (KeyError, FileNotFoundError, ValueError) as e:  # no labels, or unreadable ones: as for views
                log.warning("skipping volume %s: labels: %s: %s", key, type(e).__name__, e)
                return None
            n, C, H, W = lab.shape
            S = self.image_size
            lab = resize(lab.reshape(n * C, 1, H, W).contiguous(), S).reshape(n, C, S, S)
            extra = {"context_labels": lab[0].clone(), "target_labels": lab[1:].clone()}
        if self.looks is not None:
            try:
                views, extra["look"], extra["look_json"] = self._radiographs(key, want, rng)
            except (KeyError, FileNotFoundError, ValueError) as e:  # a ring without bases: skipped, as for views
                log.warning("skipping volume %s: materials: %s: %s", key, type(e).__name__, e)
                return None
        return {
            **extra,
            "_views": views,  # (1+N, H, W) stored dtype, consumed by _finalize / _collate
            "actions": torch.from_numpy(d.actions_deg),
            "actions_norm": torch.from_numpy(d.actions_deg / np.float32(self.sampling.max_abs_deg)),
            "actions_cumulative": torch.from_numpy(d.offsets_deg),
            "context_yaw": torch.tensor(yaws[0], dtype=torch.float32),
            "target_yaws": torch.from_numpy(yaws[1:].astype(np.float32)),
            "volume_id": key,
        }

    def _radiographs(self, key: str, want: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Any, str]:
        """The 1 + N views as radiographs of one look drawn from ``self.looks`` (each view its own noise stream):
        ((1+N, H, W) float32, the look's parameters (K,) float32 in ``LOOK_VECTOR_FIELDS`` order, the look as JSON)."""
        from xwin.pipeline.radiograph import radiograph
        from xwin.schemas.look import look_vector

        read = getattr(self.reader, "read_materials", None)
        if read is None:
            raise KeyError(f"looks need a reader with read_materials, got {type(self.reader).__name__}")
        look = self.looks.sample(rng)
        bases = read(key, want)
        imgs = radiograph(bases, look, pixel_mm=float(self.reader.spec.pixel_mm), view_indices=want)
        return imgs, torch.tensor(look_vector(look), dtype=torch.float32), look.model_dump_json()

    def _finalize(self, sample: dict) -> dict:
        views = sample.pop("_views", None)
        if views is None:
            return sample
        S = self.image_size
        imgs = empty_tensor((len(views), 1, S, S), self.dtype, shared=get_worker_info() is not None)
        appearance_into(views, self.appearance, imgs)
        return {"context": imgs[0], "targets": imgs[1:], **sample}

    def _collate(self, samples: list[dict]) -> dict:
        """Batch assembly: each sample's views are transformed straight into its place in the batch tensors, which
        are reused buffers (``ResumableStream._assemble``, ``buffers.py``) unless ``reuse_buffers=False``."""
        if "_views" not in samples[0]:
            return super()._collate(samples)
        views = [s.pop("_views") for s in samples]
        layout = self.batch_layout(len(views), len(views[0]))
        return self._assemble(
            samples, layout, lambda out: collate_views(views, self.appearance, self.image_size, self.dtype, out=out)
        )

    def batch_layout(self, b: int, n: int | None = None) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Context then targets of ``b`` samples of ``n`` views (default 1 + N) at S²."""
        n = 1 + self.sampling.n_targets if n is None else n
        S, B = self.image_size, max(int(self.batch_size or b), b)
        return {"context": (0, (b, 1, S, S)), "targets": (B * S * S, (b, n - 1, 1, S, S))}

    @property
    def buffer_dtype(self) -> torch.dtype:
        return self.dtype


def collate_views(
    views: Sequence[Any],
    appearance: str,
    image_size: int,
    dtype: torch.dtype = torch.float32,
    out: dict[str, torch.Tensor] | None = None,
) -> dict:
    """B samples' stored views (each (1+N,H,W) array or sequence of (H,W) arrays, context first) ->
    ``{"context": (B,1,S,S), "targets": (B,N,1,S,S)}`` of ``dtype``, transformed in place into ``out`` when given,
    else into new tensors that live in shared memory when called in a DataLoader worker (no copy on the way to the
    main process)."""
    B, S, n = len(views), int(image_size), len(views[0])
    if out is not None:
        context, targets = out["context"], out["targets"]
    else:
        shared = get_worker_info() is not None
        context = empty_tensor((B, 1, S, S), dtype, shared)
        targets = empty_tensor((B, n - 1, 1, S, S), dtype, shared)
    for i, v in enumerate(views):
        appearance_into(v[:1], appearance, context[i : i + 1])
        appearance_into(v[1:], appearance, targets[i])
    return {"context": context, "targets": targets}


def _agreed_as_of(latest: datetime | None) -> str:
    """The catalog time every process uses: this process's latest commit time, or rank 0's under torch.distributed
    (ranks read the catalog at slightly different times; they must shard the same item list). Called in the main
    process (workers receive the value with the dataset)."""
    value = latest.isoformat() if latest is not None else ""
    if get_worker_info() is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _stored_dtype_kw(reader: Any) -> dict:
    """``{"dtype": None}`` when the reader can return views in their stored dtype (float16 rings stay float16 until
    the appearance transform widens them in place), else ``{}``."""
    import inspect

    try:
        return {"dtype": None} if "dtype" in inspect.signature(reader.read_views).parameters else {}
    except (TypeError, ValueError):
        return {}
