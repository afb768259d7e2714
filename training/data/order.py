"""The sample order: a pure function of (seed, epoch, global position).

An epoch is a sequence of ``n_units = n_volumes * draws_per_volume`` *units*; a unit is one (volume, draw) pair and
becomes one training sample. Position ``p`` of epoch ``e`` maps to a unit as follows:

1. volumes are permuted with a generator seeded by ``(seed, epoch)``; the unit stream lists each volume's
   ``draws_per_volume`` draws consecutively (volume-major);
2. the unit stream is cut into windows of ``shuffle_window`` units and each window is permuted with a generator
   seeded by ``(seed, epoch, window)``.

Step 2 is the deterministic form of a bounded shuffle buffer: a unit moves at most ``shuffle_window - 1`` positions,
nothing but integer indices is held in memory, and the unit at position ``p`` is computable in O(1) amortised
without replaying the stream. Because the order does not depend on how positions are split among workers or ranks,
any split (and any change of split on resume) sees the same global sequence.

Each unit also gets its own random generator, keyed by ``(seed, epoch, volume key, draw)``: the views a unit reads
(context choice, target actions) do not depend on its position either.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

_TAG_VOLUMES = 0x766F6C  # "vol"
_TAG_WINDOW = 0x77696E  # "win"
_TAG_UNIT = 0x756E74  # "unt"


def volume_key(volume_id: str) -> int:
    """Stable 32-bit key of a volume id (crc32), so unit randomness survives catalog growth."""
    return zlib.crc32(volume_id.encode("utf-8")) & 0xFFFFFFFF


def unit_rng(seed: int, epoch: int, volume_id: str, draw: int) -> np.random.Generator:
    """Generator for one unit's random choices: a pure function of (seed, epoch, volume id, draw)."""
    return np.random.default_rng([_TAG_UNIT, int(seed), int(epoch), volume_key(volume_id), int(draw)])


@dataclass
class EpochOrder:
    """Maps global positions of one epoch to units ``(volume index, draw)``.

    ``volume index`` indexes the list of volume ids the order was built for (sorted catalog order).
    """

    n_volumes: int
    draws_per_volume: int
    seed: int
    epoch: int
    shuffle_window: int = 1024
    shuffle_volumes: bool = True
    _window_cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n_volumes < 0 or self.draws_per_volume < 1:
            raise ValueError(
                f"need n_volumes >= 0 and draws_per_volume >= 1, got {self.n_volumes}, {self.draws_per_volume}"
            )
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.shuffle_volumes:
            rng = np.random.default_rng([_TAG_VOLUMES, int(self.seed), int(self.epoch)])
            self.volume_perm = rng.permutation(self.n_volumes)
        else:
            self.volume_perm = np.arange(self.n_volumes)

    def __len__(self) -> int:
        return self.n_volumes * self.draws_per_volume

    def _window(self, w: int) -> np.ndarray:
        perm = self._window_cache.get(w)
        if perm is None:
            start = w * self.shuffle_window
            size = min(self.shuffle_window, len(self) - start)
            if self.shuffle_window == 1:
                perm = np.zeros(1, dtype=np.int64)
            else:
                perm = np.random.default_rng([_TAG_WINDOW, int(self.seed), int(self.epoch), w]).permutation(size)
            if len(self._window_cache) >= 4:  # sequential readers touch one or two windows at a time
                self._window_cache.pop(next(iter(self._window_cache)))
            self._window_cache[w] = perm
        return perm

    def unit(self, p: int) -> tuple[int, int]:
        """Global position ``p`` (0 <= p < len) -> (volume index, draw)."""
        if not 0 <= p < len(self):
            raise IndexError(f"position {p} outside epoch of {len(self)} units")
        w, o = divmod(p, self.shuffle_window)
        q = w * self.shuffle_window + int(self._window(w)[o])
        vpos, draw = divmod(q, self.draws_per_volume)
        return int(self.volume_perm[vpos]), int(draw)


def shard_batches(
    start: int,
    total: int,
    batch_size: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    drop_last: bool,
) -> list[range]:
    """Global positions handled by one (rank, worker), as a list of batches (each a contiguous ``range``).

    From ``start``, positions are cut into consecutive batches of ``batch_size``. Training step ``s`` consumes the
    ``world_size`` batches ``s*world_size + r`` (rank ``r`` takes one each); within a rank, DataLoader worker ``w``
    produces the steps ``s`` with ``s % num_workers == w``. A DataLoader returns its workers' outputs round-robin in
    worker order, so the batches one rank sees come in step order, and after ``k`` steps exactly the positions
    ``[start, start + k*world_size*batch_size)`` have been consumed by all ranks together.
    """
    if batch_size < 1 or world_size < 1 or num_workers < 1:
        raise ValueError("batch_size, world_size and num_workers must be >= 1")
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank {rank}/{world_size} or worker {worker}/{num_workers} out of range")
    out: list[range] = []
    remaining = max(0, total - start)
    n_batches = remaining // batch_size if drop_last else -(-remaining // batch_size)
    b = rank + world_size * worker  # global batch index of this shard's first step
    stride = world_size * num_workers
    while b < n_batches:
        lo = start + b * batch_size
        out.append(range(lo, min(lo + batch_size, total)))
        b += stride
    return out
