"""Multi-block masking (I-JEPA / CheXWorld): 4 target blocks, a context block that avoids them.

For a ``grid x grid`` patch lattice (tokens numbered row-major):

- block sizes are drawn once per batch: each of ``n_pred`` target blocks covers ``scale ~ U(pred_scale)`` of the
  lattice with aspect ratio (height / width) log-uniform in ``pred_aspect``; the context block covers
  ``U(enc_scale)`` with aspect ``enc_aspect``;
- positions are drawn per image; the masked set M is the union of the target blocks, the kept (context) set is
  the context block minus M. Positions are redrawn (up to ``max_tries``) until at least ``min_keep`` tokens stay
  visible; if that fails, masked tokens are unmasked at random until ``min_keep`` are kept;
- every image of the batch is then cut to the smallest kept and masked counts in the batch (random subsets,
  returned in ascending order) so the index tensors are rectangular.

``MultiBlockMasker.sample(rng, batch) -> MaskBatch(keep (B, K) int64, masked (B, M) int64)``, disjoint per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MaskBatch:
    keep: torch.Tensor  # (B, K) int64, context token indices
    masked: torch.Tensor  # (B, M) int64, target token indices

    def to(self, device: torch.device | str) -> MaskBatch:
        return MaskBatch(self.keep.to(device), self.masked.to(device))


@dataclass
class MultiBlockMasker:
    grid: int
    pred_scale: tuple[float, float] = (0.15, 0.2)
    pred_aspect: tuple[float, float] = (0.75, 1.5)
    n_pred: int = 4
    enc_scale: tuple[float, float] = (0.85, 1.0)
    enc_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    max_tries: int = 20

    def __post_init__(self) -> None:
        L = self.grid * self.grid
        if self.grid < 2:
            raise ValueError(f"mask grid must be >= 2 patches, got {self.grid}")
        if not 1 <= self.min_keep < L:
            raise ValueError(f"min_keep={self.min_keep} must be in [1, {L - 1}] for a {self.grid}x{self.grid} grid")
        for name in ("pred_scale", "enc_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        for name in ("pred_aspect", "enc_aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if self.n_pred < 1:
            raise ValueError(f"n_pred must be >= 1, got {self.n_pred}")

    def block_size(
        self, rng: np.random.Generator, scale: tuple[float, float], aspect: tuple[float, float]
    ) -> tuple[int, int]:
        """(height, width) in patches of a block covering U(scale) of the grid, log-uniform aspect h/w."""
        s = rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        area = s * self.grid * self.grid
        h = round(math.sqrt(area * ar))
        w = round(math.sqrt(area / ar))
        return min(max(h, 1), self.grid), min(max(w, 1), self.grid)

    def _block(self, rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
        h, w = hw
        top = rng.integers(0, self.grid - h + 1)
        left = rng.integers(0, self.grid - w + 1)
        m = np.zeros((self.grid, self.grid), dtype=bool)
        m[top : top + h, left : left + w] = True
        return m

    def sample_one(
        self, rng: np.random.Generator, pred_hw: list[tuple[int, int]], enc_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image -> (keep indices, masked indices), ascending, disjoint, len(keep) >= min_keep, masked >= 1."""
        for _ in range(self.max_tries):
            masked = np.zeros((self.grid, self.grid), dtype=bool)
            for hw in pred_hw:
                masked |= self._block(rng, hw)
            keep = self._block(rng, enc_hw) & ~masked
            if keep.sum() >= self.min_keep:
                return np.flatnonzero(keep), np.flatnonzero(masked)
        # fallback: whole complement as context, then unmask random masked tokens until min_keep are visible
        keep = ~masked
        deficit = self.min_keep - int(keep.sum())
        if deficit > 0:
            mi = np.flatnonzero(masked)
            give = rng.choice(mi, size=min(deficit, len(mi) - 1), replace=False)
            masked.flat[give] = False
            keep.flat[give] = True
        return np.flatnonzero(keep), np.flatnonzero(masked)

    def sample(self, rng: np.random.Generator, batch: int) -> MaskBatch:
        pred_hw = [self.block_size(rng, self.pred_scale, self.pred_aspect) for _ in range(self.n_pred)]
        enc_hw = self.block_size(rng, self.enc_scale, self.enc_aspect)
        pairs = [self.sample_one(rng, pred_hw, enc_hw) for _ in range(batch)]
        K = min(len(k) for k, _ in pairs)
        M = min(len(m) for _, m in pairs)
        keep = np.stack([np.sort(rng.choice(k, size=K, replace=False)) for k, _ in pairs])
        masked = np.stack([np.sort(rng.choice(m, size=M, replace=False)) for _, m in pairs])
        return MaskBatch(torch.from_numpy(keep).long(), torch.from_numpy(masked).long())
