"""Batch buffers reused across batches, never while a consumer can still see them.

Why: a 512² X-WIN batch (12 samples x 9 views) is 113 MB of float32. Writing it into freshly allocated memory costs
first-touch page faults (the kernel zeroes every 4 kB page), and a DataLoader worker's batch also costs a new
shared-memory segment that the main process maps and later frees: a large share of the loader's CPU time
(docs/benchmarks.md, Consumer). Reusing a few buffers removes it.

When a buffer may be reused: only when no tensor outside this module refers to its storage. Every tensor (and every
view of one, and every numpy array made from one) holds a reference on the storage; ``storage_free`` reads that
count. So a batch the training loop still holds is never overwritten, whatever the loop does with it; if it keeps
more batches than the pool has room for, the pool allocates fresh memory instead (counted in ``retired``).

``LocalBuffers``: in one process (``num_workers=0``), the collate step takes a free storage from a small pool.

``SharedSlots``: with DataLoader workers. The main process allocates each worker's slots in shared memory and
hands them to the workers when they start (file descriptors, like any shared tensor). A worker writes a batch into
a free slot and sends only the slot number; the main process builds the batch tensors on its own mapping of the
slot (no per-batch mapping, no copy). Before waiting for the next batch the main process returns the slots no one
refers to any more through one queue per worker. A worker has ``prefetch_factor + keep + 1`` slots: enough for
every batch the DataLoader lets it have in flight plus the ``keep`` batches a consumer may hold, so a worker never
waits on a slot while the main process waits on that worker.
"""

from __future__ import annotations

import os
import queue
from collections import deque
from typing import Any

import torch

Layout = dict[str, tuple[int, tuple[int, ...]]]  # name -> (element offset, shape)


def storage_free(storage: torch.UntypedStorage) -> bool:
    """True when only the pool refers to ``storage`` (no tensor, view or numpy array made from it is alive)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1


def shared_storage(nbytes: int) -> torch.UntypedStorage:
    """``nbytes`` of shared memory (file-descriptor backed, like DataLoader's own batches)."""
    return torch.UntypedStorage._new_shared(int(nbytes))


def check_shared_memory(nbytes: int, what: str, shm: str = "/dev/shm") -> None:
    """Fail now, with the numbers, when ``shm`` cannot hold ``nbytes``: shared memory is only reserved when first
    written, so a full /dev/shm (64 MB in a default Docker container) would otherwise kill a worker with SIGBUS."""
    try:
        st = os.statvfs(shm)
    except OSError:  # no such mount (not Linux): nothing to check
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise RuntimeError(
            f"{what} need {nbytes / 2**20:.0f} MiB of shared memory but {shm} has {free / 2**20:.0f} MiB free: "
            "enlarge it (docker run --shm-size, or a larger tmpfs), or lower num_workers, prefetch_factor or the "
            "batch size"
        )


def tensors_on(storage: torch.UntypedStorage, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Contiguous tensors of ``layout`` on ``storage`` (fresh tensor objects each call; they share the storage)."""
    out = {}
    for name, (offset, shape) in layout.items():
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * int(shape[i + 1])
        out[name] = torch.empty((0,), dtype=dtype).set_(storage, int(offset), tuple(shape), tuple(stride))
    return out


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; ``shared`` allocates it in shared memory directly (what DataLoader's default_collate
    does in workers), so sending it to the main process does not copy it into shared memory again."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    return tensors_on(shared_storage(layout_nbytes({"t": (0, shape)}, dtype)), {"t": (0, shape)}, dtype)["t"]


def layout_nbytes(layout: Layout, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    end = 0
    for offset, shape in layout.values():
        n = 1
        for s in shape:
            n *= int(s)
        end = max(end, int(offset) + n)
    return end * item


class LocalBuffers:
    """A small pool of private storages for batches assembled in the consuming process itself."""

    def __init__(self, size: int = 3) -> None:
        self.size = int(size)
        self.pool: list[torch.UntypedStorage] = []
        self.allocated = 0

    def acquire(self, nbytes: int) -> torch.UntypedStorage:
        for st in self.pool:
            if st.nbytes() >= nbytes and storage_free(st):
                return st
        st = torch.empty((int(nbytes),), dtype=torch.uint8).untyped_storage()
        self.allocated += 1
        if len(self.pool) >= self.size:  # the consumer holds the oldest: forget it (it lives on with the consumer)
            self.pool.pop(0)
        self.pool.append(st)
        return st

    def __getstate__(self) -> dict:  # never copied into another process
        return {"size": self.size, "pool": [], "allocated": 0}


class SharedSlots:
    """Shared-memory batch slots owned by the main process and written by DataLoader workers (see module doc)."""

    def __init__(self, ctx: Any, workers: int, nbytes: int, prefetch_factor: int = 2, keep: int = 1) -> None:
        self.nbytes = int(nbytes)
        self.keep = int(keep)
        self.per_worker = int(prefetch_factor) + self.keep + 1
        check_shared_memory(
            workers * self.per_worker * self.nbytes, f"{workers} workers x {self.per_worker} batch slots"
        )
        self.storages = [[shared_storage(self.nbytes) for _ in range(self.per_worker)] for _ in range(workers)]
        self.queues = [ctx.Queue() for _ in range(workers)]
        for q in self.queues:
            for i in range(self.per_worker):
                q.put(i)
        self._lent: list[deque[int]] = [deque() for _ in range(workers)]
        self.retired = 0  # slots given fresh memory because a consumer kept their batches

    # ------------------------------------------------------------------ worker side
    def acquire(self, worker: int, timeout: float = 1.0) -> tuple[int, torch.UntypedStorage]:
        """A free slot of ``worker`` (blocks until the main process returns one)."""
        parent = os.getppid()
        while True:
            try:
                msg = self.queues[worker].get(timeout=timeout)
            except queue.Empty:
                if os.getppid() != parent:
                    raise RuntimeError("batch slots: the loader's process is gone") from None
                continue
            if isinstance(msg, tuple):  # the main process replaced this slot's memory
                i, st = msg
                self.storages[worker][i] = st
                return i, st
            return msg, self.storages[worker][msg]

    def release(self, worker: int, slot: int) -> None:
        """Give back a slot the worker acquired but will not send (its batch failed)."""
        self.queues[worker].put(slot)

    # ------------------------------------------------------------------ main side
    def lend(self, worker: int, slot: int, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The batch tensors of a slot a worker filled; the slot returns to the worker once they are all gone."""
        self._lent[worker].append(slot)
        return tensors_on(self.storages[worker][slot], layout, dtype)

    def reclaim(self) -> None:
        """Return every lent slot no one refers to; keep at most ``keep`` still-referenced slots per worker by giving
        older ones fresh memory (the consumer keeps the old memory for as long as it holds it)."""
        for w, lent in enumerate(self._lent):
            held: deque[int] = deque()
            for i in lent:
                if storage_free(self.storages[w][i]):
                    self.queues[w].put(i)
                else:
                    held.append(i)
            while len(held) > self.keep:
                i = held.popleft()
                st = shared_storage(self.nbytes)
                self.storages[w][i] = st
                self.queues[w].put((i, st))
                self.retired += 1
            self._lent[w] = held

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_lent"] = None  # bookkeeping of the main process only
        return d
