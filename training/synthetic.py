"""Procedural stand-ins for the data streams: rings of parallel projections of random 3D Gaussian-blob phantoms and
"real-domain" images (tests, benchmarks, smoke runs without a store).

``SyntheticRingStream`` yields the same batch dicts as ``xwin.training.data.XWinStream`` with ``batch_size`` set
(context (B,1,S,S), targets (B,N,1,S,S), actions (B,N) degrees, volume_id list) and has the same resume contract:
``state_dict() / load_state_dict()`` hold ``(epoch, position)``; the sample at a position is a pure function of
``(seed, epoch, position)``. ``SyntheticRealStream`` yields (R,1,S,S) image batches with the same contract.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def phantom(rng: np.random.Generator, n_blobs: int = 12) -> np.ndarray:
    """(n_blobs, 5) rows: centre x, y, z in [-0.55, 0.55], sigma, amplitude."""
    c = rng.uniform(-0.55, 0.55, size=(n_blobs, 3))
    s = rng.uniform(0.06, 0.22, size=(n_blobs, 1))
    a = rng.uniform(0.3, 1.0, size=(n_blobs, 1))
    return np.concatenate([c, s, a], axis=1)


def project(blobs: np.ndarray, yaw_deg: np.ndarray, size: int) -> np.ndarray:
    """Parallel projections of a blob phantom about the z axis: (V,) yaws -> (V, size, size) float32, min-max
    normalised per image. Column axis = x cos(yaw) + y sin(yaw), row axis = -z (superior at row 0)."""
    g = np.linspace(-1.0, 1.0, size)
    yaw = np.deg2rad(np.asarray(yaw_deg, dtype=np.float64))[:, None]  # (V, 1)
    x, y, z, s, a = (blobs[:, i][None, :] for i in range(5))  # (1, K)
    u = x * np.cos(yaw) + y * np.sin(yaw)  # (V, K) projected column coordinate
    w = a * s * math.sqrt(2 * math.pi)  # line integral of a 3D Gaussian through its centre
    gu = np.exp(-((g[None, None, :] - u[..., None]) ** 2) / (2 * s[..., None] ** 2))  # (V, K, W)
    gv = np.exp(-((g[None, None, :] + z[..., None]) ** 2) / (2 * s[..., None] ** 2))  # (1, K, H)
    img = np.einsum("vk,vkw,ukh->vhw", np.broadcast_to(w, u.shape), gu, gv)
    lo = img.min(axis=(1, 2), keepdims=True)
    hi = img.max(axis=(1, 2), keepdims=True)
    return ((img - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


class _Resumable(abc.ABC):
    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items < 1 or batch_size < 1:
            raise ValueError(f"need n_items >= 1 and batch_size >= 1, got {n_items}, {batch_size}")
        self.n_items, self.batch_size, self.seed = int(n_items), int(batch_size), int(seed)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.n_items

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']}, this stream has seed={self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @abc.abstractmethod
    def _item(self, epoch: int, p: int) -> dict:
        """Sample ``p`` of ``epoch`` (a pure function of the seed, the epoch and the position)."""

    @abc.abstractmethod
    def _collate(self, items: list[dict]) -> Any:
        """A batch of ``items``: a dict of stacked tensors (rings) or one tensor (real images)."""

    def __iter__(self) -> Iterator:
        """The rest of the current epoch in batches, then the epoch advances (like XWinStream)."""
        epoch = self.epoch
        while self.position < self.n_items:
            hi = min(self.position + self.batch_size, self.n_items)
            batch = self._collate([self._item(epoch, p) for p in range(self.position, hi)])
            self.position = hi
            yield batch
        self.epoch, self.position = epoch + 1, 0


class SyntheticRingStream(_Resumable):
    """Sample ``p``: volume ``p % n_volumes`` (a fixed phantom), a context at one of ``context_yaws`` and
    ``n_targets`` distinct non-zero offsets ``k*step_deg`` within ``+-max_abs_deg``."""

    def __init__(
        self,
        n_volumes: int = 16,
        batch_size: int = 4,
        n_targets: int = 8,
        image_size: int = 64,
        step_deg: float = 3.0,
        max_abs_deg: float = 90.0,
        context_yaws: tuple[float, ...] = (0.0, 90.0),
        seed: int = 0,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__(samples_per_epoch or n_volumes, batch_size, seed)
        K = math.floor(max_abs_deg / step_deg + 1e-9)
        if n_targets > 2 * K:
            raise ValueError(
                f"only {2 * K} non-zero offsets of {step_deg} deg within +-{max_abs_deg}, need {n_targets}"
            )
        self.n_volumes, self.n_targets, self.image_size = n_volumes, n_targets, image_size
        self.step_deg, self.K, self.context_yaws = step_deg, K, tuple(context_yaws)
        self._phantoms = [phantom(np.random.default_rng([seed, v])) for v in range(n_volumes)]

    def _item(self, epoch: int, p: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, p, 1])
        v = p % self.n_volumes
        ctx = float(self.context_yaws[rng.integers(len(self.context_yaws))])
        ks = np.concatenate([np.arange(-self.K, 0), np.arange(1, self.K + 1)])
        k = rng.choice(ks, size=self.n_targets, replace=False)
        actions = (k * self.step_deg).astype(np.float32)
        views = project(self._phantoms[v], np.concatenate([[ctx], ctx + actions]), self.image_size)
        imgs = torch.from_numpy(views).unsqueeze(1)
        return {
            "context": imgs[0],
            "targets": imgs[1:],
            "actions": torch.from_numpy(actions),
            "volume_id": f"syn{v:04d}",
        }

    def _collate(self, items: list[dict]) -> dict:
        out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in ("context", "targets", "actions")}
        out["volume_id"] = [it["volume_id"] for it in items]
        return out


class SyntheticRealStream(_Resumable):
    """ "Real-domain" images: single projections of random phantoms with a different look (gamma, noise, a soft
    vignette), so a domain classifier has something to separate. Yields (R,1,S,S) float32 tensors."""

    def __init__(self, batch_size: int = 8, image_size: int = 64, seed: int = 1, n_images: int = 256) -> None:
        super().__init__(n_images, batch_size, seed)
        self.image_size = image_size

    def _item(self, epoch: int, p: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, p, 2])
        img = project(phantom(rng), np.asarray([rng.uniform(-90, 90)]), self.image_size)[0]
        g = np.linspace(-1, 1, self.image_size)
        vignette = 1.0 - 0.3 * (g[None, :] ** 2 + g[:, None] ** 2)
        img = np.clip(img**0.7 * vignette + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)
        return {"image": torch.from_numpy(img)[None]}

    def _collate(self, items: list[dict]) -> torch.Tensor:
        return torch.stack([it["image"] for it in items])
