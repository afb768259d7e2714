"""The loader: a DataLoader over a ``ResumableStream`` that knows what the training loop consumed, with forkserver
workers and reusable shared-memory batch slots (``buffers.SharedSlots``)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .buffers import SharedSlots
from .stream import ResumableStream


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers share few cores; interpolate's intra-op threads only oversubscribe


def forkserver_context() -> Any:
    """The forkserver context, preloading torch and this package in the server (a clean process that never opens a
    store), so each worker forks from it instead of importing torch again."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "xwin.training.data.xwin_stream"])  # no effect once the server runs
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
        # a plain counter, not enumerate(): enumerate's cached result tuple would keep the last batch (and its slot)
        # referenced until the next one arrives
        for item in batches:
            steps += 1  # noqa: SIM113
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
            multiprocessing_context = forkserver_context()
        if multiprocessing_context == "fork":
            raise ValueError("fork is not safe with fsspec/obstore/zarr event loops; use spawn or forkserver")
        kw.update(multiprocessing_context=multiprocessing_context, worker_init_fn=worker_init, timeout=timeout)
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    return ResumableLoader(dataset, **kw)
