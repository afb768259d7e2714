"""The resumable, shardable streaming dataset every training stream builds on.

``ResumableStream`` holds everything that is not about X-WIN: which global positions a process produces
(``order.shard_batches``), in what order (``order.EpochOrder``), read-ahead, batch buffers and the resume state
``(epoch, position)``. ``xwin_stream.XWinStream`` turns a position into an X-WIN sample read from a projection
dataset, ``real_cxr.RealCXRStream`` into a real radiograph; ``loader.ResumableLoader`` runs either in workers.

Guarantees (docs/training-data.md): the sample at global position ``p`` of epoch ``e`` is a pure function of
``(seed, epoch, p)`` and of the dataset's volume list; after ``load_state_dict`` a stream produces exactly the
positions not yet consumed, for any number of workers and any ``world_size``.
"""

from __future__ import annotations

import abc
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .buffers import LocalBuffers, SharedSlots, layout_nbytes, shared_storage, tensors_on
from .order import EpochOrder, shard_batches, unit_rng

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
        self._env: dict[str, str] = {}  # set in a worker's copy: the spawning process's store settings

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
            len(self.keys()),
            self.draws_per_item,
            self.seed,
            self.epoch if epoch is None else epoch,
            self.shuffle_window,
            shuffle_volumes=self.shuffle,
        )

    def __len__(self) -> int:  # units in one epoch, all ranks together
        return len(self.keys()) * self.draws_per_item

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "draws_per_item": self.draws_per_item,
            "shuffle_window": self.shuffle_window,
            "catalog_as_of": self.catalog_as_of,
        }

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
        _rank, world = self.rank_world
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
