"""X-WIN view sampling: one context view and N target views at actions ``a_i = k_i * dphi`` (paper §3.1).

Two action designs (the paper's Table 3):

``direct`` (default, the paper's choice)
    ``k_1..k_N`` are drawn without replacement from ``{-K..K}`` (``0`` excluded unless ``allow_zero``), with
    ``K = floor(max_abs_deg / dphi)``. Target ``i`` sits at yaw ``context + k_i*dphi`` and its action is that offset,
    relative to the context. ``actions == actions_cumulative``.
``stepwise``
    The targets form a monotone trajectory away from the context: a direction ``s = +-1`` and N distinct step
    counts ``0 < m_1 < ... < m_N <= K`` are drawn; target ``i`` sits at ``context + s*m_i*dphi``
    (``actions_cumulative``), and its action is the rotation from the *previous* view of the trajectory,
    ``actions[i] = s*(m_i - m_{i-1})*dphi`` with ``m_0 = 0`` (the first is relative to the context). A model
    predicts target ``i`` by applying the actions ``1..i`` in turn, i.e. the direct rotation split into steps.

Yaws are the dataset's own (``RenderSpec.yaws_deg``); every requested view must exist in the ring, so a target set
is only drawn from offsets whose absolute yaw the spec contains (a partial arc restricts the candidates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from xwin.schemas.render import RenderSpec


@dataclass(frozen=True)
class XWinSampling:
    """How one sample's views are chosen.

    n_targets: N target views per sample (paper: 8).
    step_deg: dphi; ``None`` = the dataset's ``yaw_step_deg`` (must be a multiple of it).
    max_abs_deg: actions lie in ``[-max_abs_deg, max_abs_deg]`` (paper: 90).
    context_yaws / context_probs: absolute yaws of the possible context views and their probabilities
        (default frontal 0 and lateral 90, equally likely; ``(0.0,)`` reproduces the released code).
    allow_zero: allow ``k = 0`` (a target identical to the context) in ``direct`` mode.
    mode: ``"direct"`` or ``"stepwise"`` (module docstring).
    """

    n_targets: int = 8
    step_deg: float | None = None
    max_abs_deg: float = 90.0
    context_yaws: tuple[float, ...] = (0.0, 90.0)
    context_probs: tuple[float, ...] | None = None
    allow_zero: bool = False
    mode: Literal["direct", "stepwise"] = "direct"

    def plan(self, spec: RenderSpec) -> SamplingPlan:
        return SamplingPlan.build(self, spec)


@dataclass(frozen=True)
class Draw:
    """The views of one sample: indices into the ring and actions in degrees."""

    context_index: int
    target_indices: np.ndarray  # (N,) int
    actions_deg: np.ndarray  # (N,) float32: what the model is conditioned on
    offsets_deg: np.ndarray  # (N,) float32: target yaw - context yaw (== actions_deg in direct mode)


@dataclass(frozen=True)
class SamplingPlan:
    sampling: XWinSampling
    step_deg: float
    context_index: tuple[int, ...]  # per context choice
    candidates_k: tuple[np.ndarray, ...]  # per context choice: allowed k values (sorted)
    candidate_index: tuple[dict[int, int], ...]  # per context choice: k -> ring index
    probs: np.ndarray

    @staticmethod
    def build(s: XWinSampling, spec: RenderSpec) -> SamplingPlan:
        if s.n_targets < 1:
            raise ValueError(f"n_targets must be >= 1, got {s.n_targets}")
        if s.mode not in ("direct", "stepwise"):
            raise ValueError(f"mode must be 'direct' or 'stepwise', got {s.mode!r}")
        step = float(spec.yaw_step_deg if s.step_deg is None else s.step_deg)
        ratio = step / spec.yaw_step_deg
        if step <= 0 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(
                f"step_deg {step} must be a positive multiple of the dataset's yaw step {spec.yaw_step_deg}"
            )
        kmax = math.floor(s.max_abs_deg / step + 1e-9)
        if not s.context_yaws:
            raise ValueError("context_yaws is empty")
        probs = (
            np.full(len(s.context_yaws), 1.0 / len(s.context_yaws))
            if s.context_probs is None
            else np.asarray(s.context_probs, float)
        )
        if probs.shape != (len(s.context_yaws),) or np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
            raise ValueError(
                f"context_probs {s.context_probs} must be {len(s.context_yaws)} non-negative numbers summing to 1"
            )
        ctx_idx, cands, maps = [], [], []
        for cy in s.context_yaws:
            try:
                ci = spec.view_index(cy)
            except KeyError as e:
                raise ValueError(
                    f"context yaw {cy} deg is not a view of this dataset (yaws {spec.yaws_deg[:3]}...)"
                ) from e
            ks, m = [], {}
            for k in range(-kmax, kmax + 1):
                if k == 0 and not (s.allow_zero and s.mode == "direct"):
                    continue
                try:
                    m[k] = spec.view_index(cy + k * step)
                    ks.append(k)
                except KeyError:
                    continue
            need = s.n_targets
            if s.mode == "direct" and len(ks) < need:
                raise ValueError(f"only {len(ks)} target offsets available around yaw {cy} for n_targets={need}")
            if s.mode == "stepwise" and max(sum(k > 0 for k in ks), sum(k < 0 for k in ks)) < need:
                raise ValueError(f"stepwise needs {need} offsets on one side of yaw {cy}; have {ks}")
            ctx_idx.append(ci)
            cands.append(np.asarray(ks, dtype=np.int64))
            maps.append(m)
        return SamplingPlan(s, step, tuple(ctx_idx), tuple(cands), tuple(maps), probs)

    def draw(self, rng: np.random.Generator) -> Draw:
        s = self.sampling
        c = int(rng.choice(len(self.context_index), p=self.probs)) if len(self.context_index) > 1 else 0
        cand = self.candidates_k[c]
        if s.mode == "direct":
            ks = rng.choice(cand, size=s.n_targets, replace=False)
            offsets = ks.astype(np.float64) * self.step_deg
            actions = offsets
        else:
            pos, neg = cand[cand > 0], -cand[cand < 0][::-1]
            sides = [x for x in ((1, pos), (-1, neg)) if len(x[1]) >= s.n_targets]
            sign, mags = sides[int(rng.integers(len(sides)))]
            m = np.sort(rng.choice(mags, size=s.n_targets, replace=False))
            ks = sign * m
            offsets = ks.astype(np.float64) * self.step_deg
            actions = np.diff(np.concatenate([[0.0], offsets]))
        idx = np.asarray([self.candidate_index[c][int(k)] for k in ks], dtype=np.int64)
        return Draw(self.context_index[c], idx, actions.astype(np.float32), offsets.astype(np.float32))
