"""Resumable, shardable streaming datasets and the loader helper.

``ResumableStream`` holds everything that is not about X-WIN: which global positions a process produces
(``order.shard_batches``), in what order (``order.EpochOrder``), read-ahead, and the resume state
``(epoch, position)``. ``XWinStream`` turns a position into an X-WIN sample read from a projection dataset.

Guarantees (docs/training-data.md): the sample at global position ``p`` of epoch ``e`` is a pure function of
``(seed, epoch, p)`` and of the dataset's volume list; after ``load_state_dict`` a stream produces exactly the
positions not yet consumed, for any number of workers and any ``world_size``.
"""

from __future__ import annotations

import abc
import logging
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .buffers import LocalBuffers, SharedSlots, layout_nbytes, shared_storage, tensors_on
from .order import EpochOrder, shard_batches, unit_rng
from .readers import ViewReader, ViewSource
from .sampling import SamplingPlan, XWinSampling
from .transforms import appearance_into, empty_output, out_dtype

log = logging.getLogger(__name__)

STATE_VERSION = 1
_ENV_PREFIXES = ("AWS_", "XWIN_", "FSSPEC_")


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableStream(IterableDataset, abc.ABC):
    """Base class: subclasses implement ``_keys()`` (the item list, per process) and ``_load(key, draw, rng)``.

    seed: order and per-unit randomness. draws_per_item: units per item per epoch (a volume can give several
    samples an epoch). shuffle_window: bounded shuffle (``order.EpochOrder``). batch_size: ``None`` yields single
    samples, else collated batches of that many consecutive positions (use ``DataLoader(batch_size=None)``, which
    ``make_loader`` does). rank/world_size: default from ``torch.distributed`` when initialised, else 0/1.
    prefetch: samples read ahead by ``io_threads`` threads inside each process (0 = read on demand).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        draws_per_item: int = 1,
        shuffle_window: int = 1024,
        shuffle: bool = True,
        batch_size: int | None = None,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 4,
        io_threads: int = 2,
        reuse_buffers: bool = True,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.draws_per_item = int(draws_per_item)
        self.shuffle_window = int(shuffle_window) if shuffle else 1
        self.shuffle = bool(shuffle)
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self._rank, self._world = rank, world_size
        self.prefetch = int(prefetch)
        self.io_threads = int(io_threads)
        self.epoch = 0
        self.position = 0  # global positions [0, position) of `epoch` are consumed
        self._keys_cache: list[str] | None = None
        # the item set is pinned for the life of a loader: catalog rows committed at or before this ISO time
        # (set by the first ``keys()`` in the main process, carried to workers, saved in ``state_dict``)
        self.catalog_as_of: str | None = None
        # batch buffers (buffers.py): pooled in-process, shared slots handed out by ResumableLoader to its workers
        self.reuse_buffers = bool(reuse_buffers)
        self._local_buffers = LocalBuffers()
        self._slots: SharedSlots | None = None

    # ---------------------------------------------------------------- to implement
    @abc.abstractmethod
    def _keys(self) -> list[str]:
        """The items (volume ids, image paths) of this process's view of the source."""

    @abc.abstractmethod
    def _load(self, key: str, draw: int, rng: np.random.Generator) -> dict | None:
        """One sample, or ``None`` to skip the unit (bad input, logged by the implementation)."""

    def _finalize(self, sample: dict) -> dict:
        """A sample returned on its own (``batch_size=None``, ``sample_at``); ``_collate`` finishes batched ones.
        Subclasses that defer work to batch assembly (``XWinStream``) complete single samples here."""
        return sample

    def _collate(self, samples: list[dict]) -> dict:
        """Batch assembly: the tensors named by ``batch_layout`` are stacked into one reusable buffer, the rest
        stacked (tensors) or listed."""
        layout = self.batch_layout(len(samples))
        if layout is None or any(k not in samples[0] for k in layout):
            return self._stack(samples)
        big = {k: [s.pop(k) for s in samples] for k in layout}
        return self._assemble(samples, layout, lambda out: [torch.stack(v, out=out[k]) for k, v in big.items()])

    @staticmethod
    def _stack(samples: list[dict]) -> dict:
        out: dict[str, Any] = {}
        for k in samples[0]:
            vals = [s[k] for s in samples]
            out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        return out

    # ---------------------------------------------------------------- reusable batch buffers (buffers.py)
    def batch_layout(self, b: int) -> dict[str, tuple[int, tuple[int, ...]]] | None:
        """Where the large tensors of a batch of ``b`` samples lie in one buffer: name -> (element offset, shape)
        in units of ``buffer_dtype``; ``None``: no reusable buffer (everything stacked afresh)."""
        return None

    @property
    def buffer_dtype(self) -> torch.dtype:
        return torch.float32

    def batch_nbytes(self) -> int | None:
        """Bytes of one full batch's buffer (the size of a reusable slot); ``None`` without a layout."""
        layout = self.batch_layout(int(self.batch_size or 1))
        return None if layout is None else layout_nbytes(layout, self.buffer_dtype)

    def _assemble(self, samples: list[dict], layout: dict, fill) -> dict:
        """``fill(out)`` writes the large tensors into buffers of ``layout``; the rest of the samples are stacked.
        Inside a worker with slots only the slot number travels (``"_slot"``; ``ResumableLoader`` rebuilds it)."""
        out, slot = self._batch_buffers(layout)
        try:
            fill(out)
        except BaseException:
            if slot is not None and self._slots is not None:  # the slot goes back to this worker's free list
                self._slots.release(slot[0], slot[1])
            raise
        batch = self._stack(samples)
        if slot is not None:
            batch["_slot"] = slot
        else:
            batch.update(out)
        return batch

    def _batch_buffers(self, layout: dict) -> tuple[dict[str, torch.Tensor], tuple | None]:
        """Tensors of ``layout``: a shared slot (in a worker of a ``ResumableLoader``), a pooled storage (in the
        consuming process), or fresh memory (``reuse_buffers=False``, or a plain DataLoader's worker)."""
        dtype = self.buffer_dtype
        nbytes = layout_nbytes(layout, dtype)
        info = get_worker_info()
        if not self.reuse_buffers:
            storage = shared_storage(nbytes) if info is not None else torch.UntypedStorage(nbytes)
            return tensors_on(storage, layout, dtype), None
        if info is None:
            return tensors_on(self._local_buffers.acquire(nbytes), layout, dtype), None
        slots = self._slots
        if slots is not None and nbytes <= slots.nbytes:
            i, storage = slots.acquire(info.id)
            return tensors_on(storage, layout, dtype), (info.id, i, layout, dtype)
        return tensors_on(shared_storage(nbytes), layout, dtype), None

    # ---------------------------------------------------------------- state
    @property
    def rank_world(self) -> tuple[int, int]:
        r, w = _dist_rank_world()
        return (r if self._rank is None else self._rank), (w if self._world is None else self._world)

    def keys(self) -> list[str]:
        if self._keys_cache is None:
            self._keys_cache = sorted(self._keys())
        return self._keys_cache

    def epoch_order(self, epoch: int | None = None) -> EpochOrder:
        return EpochOrder(
            len(self.keys()), self.draws_per_item, self.seed, self.epoch if epoch is None else epoch,
            self.shuffle_window, shuffle_volumes=self.shuffle,
        )

    def __len__(self) -> int:  # units in one epoch, all ranks together
        return len(self.keys()) * self.draws_per_item

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "draws_per_item": self.draws_per_item, "shuffle_window": self.shuffle_window,
                "catalog_as_of": self.catalog_as_of}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "draws_per_item", "shuffle_window"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"state was saved with {k}={state[k]}, this stream has {getattr(self, k)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        # mid-epoch: the same item set as the interrupted run (volumes committed since then wait for the next
        # epoch boundary); at an epoch boundary: the catalog as it is now
        self.catalog_as_of = state.get("catalog_as_of") if self.position > 0 else None
        self._keys_cache = None

    def __getstate__(self) -> dict:  # open readers/caches never cross process boundaries
        d = dict(self.__dict__)
        d["_keys_cache"] = None
        # forkserver workers inherit the server's environment, not ours: carry the store settings along
        d["_env"] = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        for k in [k for k in d if k.startswith("_reader")]:
            d[k] = None
        d.pop("_skip_lock", None)
        if mp.context.get_spawning_popen() is None:  # batch slots go to a starting DataLoader worker, nowhere else
            d["_slots"] = None
        return d

    # ---------------------------------------------------------------- iteration
    def shard(self) -> list[range]:
        """The batches (global position ranges) this process produces for the rest of the current epoch."""
        rank, world = self.rank_world
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return shard_batches(self.position, len(self), self.batch_size or 1, rank, world, worker, nw, self.drop_last)

    def sample_at(self, position: int, epoch: int | None = None) -> dict | None:
        """The sample at a global position (a pure function of seed, epoch, position)."""
        e = self.epoch if epoch is None else epoch
        order = self.epoch_order(e)
        s = self._sample(order, e, position)
        return None if s is None else self._finalize(s)

    def _sample(self, order: EpochOrder, epoch: int, p: int) -> dict | None:
        i, d = order.unit(p)
        return self._sample_unit(self.keys()[i], d, epoch, p)

    def _sample_unit(self, key: str, d: int, epoch: int, p: int) -> dict | None:
        s = self._load(key, d, unit_rng(self.seed, epoch, key, d))
        if s is not None:
            s["position"] = p
            s["epoch"] = epoch
        return s

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        if "skipped" in d:
            import threading

            self._skip_lock = threading.Lock()

    def __iter__(self) -> Iterator[dict]:
        if get_worker_info() is not None and getattr(self, "_env", None):
            os.environ.update(self._env)
        epoch, start = self.epoch, self.position
        order = self.epoch_order(epoch)
        batches = self.shard()
        rank, world = self.rank_world
        bs = self.batch_size or 1
        total = len(self)
        in_main = get_worker_info() is None
        positions = [p for b in batches for p in b]
        samples = self._read_ahead(order, epoch, positions)
        for b in batches:
            got = [s for s in (next(samples) for _ in b) if s is not None]
            if in_main:  # the consumer has taken everything up to the end of this step
                step = (b.start - start) // (bs * world)
                self.position = min(total, start + (step + 1) * bs * world)
            if self.batch_size is None:
                if got:
                    yield self._finalize(got[0])
            elif got:
                yield self._collate(got)
        if self.epoch == epoch:  # ran to the end (a consumer that stops early never gets here)
            # in a persistent worker this advances the worker's copy exactly as the main process advances
            self.epoch, self.position = epoch + 1, 0

    def _read_ahead(self, order: EpochOrder, epoch: int, positions: Sequence[int]) -> Iterator[dict | None]:
        if self.prefetch <= 0 or self.io_threads <= 0 or len(positions) <= 1:
            for p in positions:
                yield self._sample(order, epoch, p)
            return
        keys = self.keys()
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="xwin-read") as pool:
            q: deque = deque()
            for p in positions:
                i, d = order.unit(p)  # in this thread: the order's window cache is not shared with the pool
                q.append(pool.submit(self._sample_unit, keys[i], d, epoch, p))
                if len(q) > self.prefetch:
                    yield q.popleft().result()
            while q:
                yield q.popleft().result()


class XWinStream(ResumableStream):
    """X-WIN samples from a projection dataset (``source.open()`` -> reader with ``volume_ids``/``read_views``).

    Each sample (one ``read_views`` call of the 1 + N views) is a dict:
        context (1,S,S), targets (N,1,S,S) -- appearance-transformed and resized to S; float32, or ``dtype``
        actions (N,) float32 degrees          -- what the predictor is conditioned on (sampling.py, mode)
        actions_norm (N,) float32             -- actions / max_abs_deg, in [-1, 1]
        actions_cumulative (N,) float32       -- target yaw - context yaw, degrees (== actions for "direct")
        context_yaw () float32, target_yaws (N,) float32 -- absolute yaws of the views read (from the store)
        volume_id str, position int, epoch int

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
        sampling: XWinSampling = XWinSampling(),
        image_size: int = 512,
        appearance: str = "minmax",
        dtype: str | torch.dtype | None = None,
        **kw: Any,
    ) -> None:
        kw.setdefault("draws_per_item", kw.pop("draws_per_volume", 1))
        super().__init__(**kw)
        self.source = source
        self.sampling = sampling
        self.image_size = int(image_size)
        self.appearance = appearance
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
        self.reader
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
        return {
            "_views": views,  # (1+N, H, W) stored dtype, consumed by _finalize / _collate
            "actions": torch.from_numpy(d.actions_deg),
            "actions_norm": torch.from_numpy(d.actions_deg / np.float32(self.sampling.max_abs_deg)),
            "actions_cumulative": torch.from_numpy(d.offsets_deg),
            "context_yaw": torch.tensor(yaws[0], dtype=torch.float32),
            "target_yaws": torch.from_numpy(yaws[1:].astype(np.float32)),
            "volume_id": key,
        }

    def _finalize(self, sample: dict) -> dict:
        views = sample.pop("_views", None)
        if views is None:
            return sample
        S = self.image_size
        imgs = empty_output((len(views), 1, S, S), self.dtype, shared=get_worker_info() is not None)
        appearance_into(views, self.appearance, imgs)
        return {"context": imgs[0], "targets": imgs[1:], **sample}

    def _collate(self, samples: list[dict]) -> dict:
        """Batch assembly: each sample's views are transformed straight into its place in the batch tensors, which
        are reused buffers (``ResumableStream._assemble``, ``buffers.py``) unless ``reuse_buffers=False``."""
        if "_views" not in samples[0]:
            return super()._collate(samples)
        views = [s.pop("_views") for s in samples]
        layout = self.batch_layout(len(views), len(views[0]))
        return self._assemble(samples, layout, lambda out: collate_views(
            views, self.appearance, self.image_size, self.dtype, out=out))

    def batch_layout(self, b: int, n: int | None = None) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Context then targets of ``b`` samples of ``n`` views (default 1 + N) at S²."""
        n = 1 + self.sampling.n_targets if n is None else n
        S, B = self.image_size, max(int(self.batch_size or b), b)
        return {"context": (0, (b, 1, S, S)), "targets": (B * S * S, (b, n - 1, 1, S, S))}

    @property
    def buffer_dtype(self) -> torch.dtype:
        return self.dtype


def collate_views(views: Sequence[Any], appearance: str, image_size: int, dtype: torch.dtype = torch.float32,
                  out: dict[str, torch.Tensor] | None = None) -> dict:
    """B samples' stored views (each (1+N,H,W) array or sequence of (H,W) arrays, context first) ->
    ``{"context": (B,1,S,S), "targets": (B,N,1,S,S)}`` of ``dtype``, transformed in place into ``out`` when given,
    else into new tensors that live in shared memory when called in a DataLoader worker (no copy on the way to the
    main process)."""
    B, S, n = len(views), int(image_size), len(views[0])
    if out is not None:
        context, targets = out["context"], out["targets"]
    else:
        shared = get_worker_info() is not None
        context = empty_output((B, 1, S, S), dtype, shared)
        targets = empty_output((B, n - 1, 1, S, S), dtype, shared)
    for i, v in enumerate(views):
        appearance_into(v[:1], appearance, context[i : i + 1])
        appearance_into(v[1:], appearance, targets[i])
    return {"context": context, "targets": targets}


def _agreed_as_of(latest: "datetime | None") -> str:
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


# ------------------------------------------------------------------------------------------------------- loader
def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers share few cores; interpolate's intra-op threads only oversubscribe


def _forkserver_context() -> Any:
    """The forkserver context, preloading torch and this package in the server (a clean process that never opens a
    store), so each worker forks from it in ~0.1 s instead of importing torch again (~2 s)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "xwin.training.data.stream"])  # no effect once the server runs
    return ctx


class ResumableLoader:
    """A DataLoader over a ``ResumableStream`` whose ``state_dict`` counts what the training loop consumed.

    Iterating yields the rest of the current epoch, then advances to the next epoch. Workers persist across epochs
    while the loop consumes whole epochs (each worker's copy advances its epoch itself); after an early stop or a
    ``load_state_dict`` the next iteration starts fresh workers from the current state.
    """

    def __init__(self, dataset: ResumableStream, **loader_kw: Any) -> None:
        self.dataset = dataset
        self.loader_kw = loader_kw
        self._dl: DataLoader | None = None
        self._dl_state: tuple[int, int] | None = None  # the state the persistent workers will start from
        self._slots: SharedSlots | None = None

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Shut the persistent workers down now (they also go when the loader is garbage collected, which reference
        cycles can delay while the workers go on reading ahead)."""
        if self._dl is not None:
            shutdown_workers(self._dl)
        self._dl, self._dl_state, self._slots = None, None, None

    def _make_slots(self) -> SharedSlots | None:
        """Reusable shared-memory batch slots for the workers (``buffers.SharedSlots``), when the dataset makes
        batches that can use them; handed to the workers with the dataset when they start."""
        ds = self.dataset
        nw = int(self.loader_kw.get("num_workers", 0))
        nbytes = ds.batch_nbytes() if getattr(ds, "reuse_buffers", False) and ds.batch_size else None
        if nw == 0 or not nbytes:
            return None
        ctx = self.loader_kw.get("multiprocessing_context") or mp.get_context()
        if isinstance(ctx, str):
            ctx = mp.get_context(ctx)
        return SharedSlots(ctx, nw, nbytes, prefetch_factor=self.loader_kw.get("prefetch_factor") or 2)

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        if self.loader_kw.get("num_workers", 0) == 0:
            yield from ds
            return
        epoch, start = ds.epoch, ds.position
        if self._dl is None or self._dl_state != (epoch, start):
            self._slots = self._make_slots()
            self._dl = DataLoader(ds, batch_size=None, persistent_workers=True, **self.loader_kw)
        self._dl_state = None  # until this epoch completes, the workers' state is unknown
        _, world = ds.rank_world
        step_size = (ds.batch_size or 1) * world
        total = len(ds)
        steps = 0
        slots = self._slots
        pin = bool(self.loader_kw.get("pin_memory")) and torch.cuda.is_available()
        ds._slots = slots  # travels to the workers if this starts them (and only then)
        try:
            batches = iter(self._dl)
        finally:
            ds._slots = None
        for item in batches:
            steps += 1
            ds.position = min(total, start + steps * step_size)
            slot = item.pop("_slot", None)
            if slot is not None:
                assert slots is not None, "a worker sent a batch slot to a loader without slots"
                images = slots.lend(*slot)
                item.update({k: v.pin_memory() for k, v in images.items()} if pin else images)
                del images
            yield item
            item = None  # drop our reference: the slot goes back once the consumer has dropped the batch too
            if slots is not None:
                slots.reclaim()
        if ds.epoch == epoch:
            ds.epoch, ds.position = epoch + 1, 0
            self._dl_state = (ds.epoch, 0)

    def __len__(self) -> int:
        ds = self.dataset
        _, world = ds.rank_world
        rest = max(0, len(ds) - ds.position)
        step = (ds.batch_size or 1) * world
        return rest // step if ds.drop_last else -(-rest // step)


def shutdown_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's (persistent) workers and wait for them to exit."""
    it = getattr(loader, "_iterator", None)
    stop = getattr(it, "_shutdown_workers", None)  # torch's own shutdown path (private, stable since 1.x)
    if stop is not None:
        stop()
    loader._iterator = None


def make_loader(
    dataset: ResumableStream,
    *,
    num_workers: int = 2,
    multiprocessing_context: str | None = None,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
    timeout: float = 0,
) -> ResumableLoader:
    """A resumable loader. Batching happens in the dataset (``batch_size=`` there), so DataLoader batch_size=None.

    Workers are started with ``multiprocessing_context`` "forkserver" (Linux) or "spawn": stores are opened inside
    each worker; never fork a process that holds an fsspec/obstore/zarr event loop.
    """
    kw: dict[str, Any] = {"num_workers": int(num_workers), "pin_memory": pin_memory}
    if num_workers > 0:
        if multiprocessing_context is None:
            multiprocessing_context = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if multiprocessing_context == "forkserver":
            multiprocessing_context = _forkserver_context()
        if multiprocessing_context == "fork":
            raise ValueError("fork is not safe with fsspec/obstore/zarr event loops; use spawn or forkserver")
        kw.update(multiprocessing_context=multiprocessing_context, worker_init_fn=_worker_init, timeout=timeout)
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    return ResumableLoader(dataset, **kw)
