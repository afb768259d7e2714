"""The X-WIN training loop: schedules, one optimisation step, JSON-lines logging, checkpoints and resume.

Data interface (``BatchStream``): an iterable of batch dicts ``context (B,1,S,S)``, ``targets (B,N,1,S,S)``,
``actions (B,N)`` degrees, which yields the rest of the current epoch and then advances its epoch, with
``state_dict()/load_state_dict()`` holding the position of what the loop has consumed (``xwin.training.data``'s
``make_loader(XWinStream(...))`` and ``xwin.training.synthetic.SyntheticRingStream`` both qualify). The optional
real-CXR stream yields ``(R,1,S,S)`` tensors (or dicts with ``image``/``images``) under the same contract.

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group (NCCL on CUDA, gloo on
CPU), wraps the model in DDP and each rank reads its own shard (the streams shard by ``torch.distributed`` rank).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from xwin.training.config import TrainConfig
from xwin.training.masks import MaskBatch, MultiBlockMasker
from xwin.training.models.vit import load_timm_weights
from xwin.training.models.xwin import EMAEncoder, XWin
from xwin.training.runlog import RunLog

log = logging.getLogger("xwin.train")
CKPT_VERSION = 1
NO_REAL_NOTE = "no real-image stream: training L_align + L_MIM(simulated) only (L_MIM(real), L_domain, L_cls off)"


@runtime_checkable
class BatchStream(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ------------------------------------------------------------------------------------------------------ schedules
def cosine(start: float, end: float, step: int, total: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step >= total)."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


class Schedules:
    """Per-step LR (linear warmup start_lr -> lr, then cosine to final_lr), weight decay (cosine wd ->
    final_wd) and EMA momentum (cosine m0 -> m1), all over ``total`` steps. Pure functions of the step."""

    def __init__(
        self,
        lr: float,
        final_lr: float,
        start_lr: float,
        warmup: int,
        wd: float,
        final_wd: float,
        ema: tuple[float, float],
        total: int,
    ) -> None:
        self.lr, self.final_lr, self.start_lr, self.warmup = lr, final_lr, start_lr, warmup
        self.wd, self.final_wd, self.ema, self.total = wd, final_wd, tuple(ema), total

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Schedules:
        o = cfg.optim
        return cls(
            o.lr, o.final_lr, o.start_lr, o.warmup_steps, o.weight_decay, o.final_weight_decay, o.ema, o.total_steps
        )

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.start_lr + (self.lr - self.start_lr) * step / self.warmup
        return cosine(self.lr, self.final_lr, step - self.warmup, self.total - self.warmup)

    def wd_at(self, step: int) -> float:
        return cosine(self.wd, self.final_wd, step, self.total)

    def momentum_at(self, step: int) -> float:
        return cosine(self.ema[0], self.ema[1], step, self.total)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        """Schedules are functions of the config; warn when a resumed run changes them."""
        import json

        mine = json.loads(json.dumps(self.state_dict()))
        theirs = json.loads(json.dumps(state))
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            log.warning("schedules differ from the checkpoint's (checkpoint, now): %s", diff)


# ------------------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_bf16_autocast(cfg: TrainConfig, device: torch.device | None = None) -> bool:
    """Whether the trainer runs its forward passes under bf16 autocast (``precision``: bf16, or auto on CUDA)."""
    device = device if device is not None else resolve_device(cfg.device)
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def loader_image_dtype(cfg: TrainConfig) -> str:
    """``data.image_dtype`` resolved: "auto" -> bfloat16 under bf16 autocast (what the encoders see), else float32."""
    dt = cfg.data.image_dtype
    return dt if dt != "auto" else ("bfloat16" if uses_bf16_autocast(cfg) else "float32")


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: weight decay on matrices/kernels only; biases, norms, mask token, temperatures exempt."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def real_images(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict):
        for k in ("image", "images", "real"):
            if k in item:
                return item[k]
    raise TypeError(
        f"real stream item must be a (R,1,S,S) tensor or a dict with 'image'/'images', got {type(item).__name__}"
    )


def endless(stream: Any) -> Iterator[Any]:
    """Iterate a stream across epochs; an epoch that yields nothing twice in a row means an empty stream."""
    empty = 0
    while True:
        got = False
        for item in stream:
            got = True
            yield item
        empty = 0 if got else empty + 1
        if empty >= 2:
            raise RuntimeError(
                f"data stream {type(stream).__name__} yielded no batch in a whole epoch (empty dataset?)"
            )


class DataShardError(ValueError):
    """A data stream has fewer batches an epoch than there are ranks: some rank would get none."""


def batches_per_epoch(units: int, batch_size: int, drop_last: bool = False) -> int:
    return units // batch_size if drop_last else -(-units // batch_size)


def shard_problem(what: str, stream: Any, batch_option: str, world: int) -> str | None:
    """Why ``stream`` cannot feed ``world`` ranks, or None. The streams shard an epoch by batches (batch ``b`` goes to
    rank ``b % world``, ``xwin.training.data.order.shard_batches``), so every rank needs ``world`` batches an epoch
    at least; the line says how many there are and what would make enough."""
    ds = getattr(stream, "dataset", stream)
    if world <= 1 or ds is None or not hasattr(ds, "rank_world") or not hasattr(ds, "keys"):
        return None
    items, draws = len(ds.keys()), int(getattr(ds, "draws_per_item", 1) or 1)
    units, bs, drop = len(ds), int(ds.batch_size or 1), bool(getattr(ds, "drop_last", False))
    n = batches_per_epoch(units, bs, drop)
    if n >= world:
        return None
    kind = "volume" if what in ("data", "validation") else "image"
    fixes = [f"run on at most {n} rank{'s' if n != 1 else ''}" if n else f"give it {kind}s"]
    need = world * bs if drop else (world - 1) * bs + 1  # samples an epoch that make `world` batches
    bmax = units // world if drop else ((units - 1) // (world - 1) if units else 0)
    if batch_option and bmax >= 1:
        fixes.append(f"set {batch_option} to {bmax} or less")
    if kind == "volume" and items:
        fixes.append(f"set data.draws_per_volume to {-(-need // items)} or more")
    return (
        f"{what}: {items} {kind}{'s' if items != 1 else ''} x {draws} draw{'s' if draws != 1 else ''} = {units} "
        f"samples an epoch make {n} batch{'es' if n != 1 else ''} of {bs}, fewer than the {world} ranks (each rank "
        f"needs a batch every epoch): {', or '.join(fixes)}"
    )


def action_step_problem(step_deg: float | None, yaw_step_deg: float, where: str) -> str | None:
    """Why the action step ``data.step_deg`` cannot be sampled from a dataset rendered every ``yaw_step_deg``, or
    None: actions are whole numbers of dataset views apart (``xwin.training.data.sampling``)."""
    if step_deg is None:
        return None
    ratio = step_deg / yaw_step_deg
    if step_deg > 0 and abs(ratio - round(ratio)) <= 1e-6:
        return None
    fit = max(1, math.ceil(ratio - 1e-6)) * yaw_step_deg
    return (
        f"data.step_deg = {step_deg:g}: the action step must be a multiple of the yaw step {yaw_step_deg:g} of "
        f"{where}: set data.step_deg to {fit:g} (or another multiple of {yaw_step_deg:g}, or null for the yaw step "
        f"itself), or train on a dataset rendered with a yaw step that divides {step_deg:g}"
    )


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# --------------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, EMA encoder, optimiser, schedules, mask RNG and the data streams of one run."""

    def __init__(
        self,
        cfg: TrainConfig,
        stream: Any,
        real_stream: Any | None = None,
        *,
        out_dir: str | Path | None = None,
        echo: bool = False,
        val: tuple[Any, Any | None] | None = None,
    ) -> None:
        """``val``: the held-out (DRR stream, real stream or None) of ``cfg.val_every``; default
        ``build_val_streams(cfg)`` when validation is on."""
        self.cfg = cfg
        self.rank, self.world, local_rank = _dist_env()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
            # before anything is built or written: every rank needs a batch of every stream each epoch (the ranks
            # agree on the item lists here, so they all reach the same verdict)
            streams = [("data", stream, "data.batch_size"), ("real images", real_stream, "data.real_batch_size")]
            if val is not None:
                streams += [("validation", val[0], "data.batch_size"), ("validation real images", val[1], "")]
            problem = next((p for p in (shard_problem(*x, self.world) for x in streams) if p), None)
            if problem is not None:
                torch.distributed.destroy_process_group()
                raise DataShardError(problem)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.amp = uses_bf16_autocast(cfg, self.device)

        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.model = XWin(cfg.model, cfg.loss)
        if cfg.init_encoder:
            load_timm_weights(self.model.encoder, cfg.init_encoder)
        self.model.to(self.device)
        self.ema = EMAEncoder(self.model.encoder).to(self.device)
        self.ddp: nn.Module = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=real_stream is None,
            )
        self.opt = torch.optim.AdamW(
            param_groups(self.model), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        self.sched = Schedules.from_config(cfg)
        self.masker = MultiBlockMasker(cfg.model.grid, **cfg.masks.model_dump())
        self.mask_rng = np.random.default_rng([cfg.seed, self.rank, 0x6D61736B])
        torch.manual_seed(cfg.seed + 1000003 * self.rank)
        self.stream, self.real_stream = stream, real_stream
        self.step = 0
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.echo = echo
        self._log = RunLog(self.out_dir, echo)
        self._it: Iterator | None = None
        self._real_it: Iterator | None = None
        if val is None and cfg.val_every > 0:
            val = build_val_streams(cfg)
        self.val_stream: Any = val[0] if val is not None else None
        self.val_real_stream: Any = val[1] if val is not None else None
        # validation restarts its streams here every time: the same held-out batches (and masks) at every step
        self._val_start = [_state(s) if s is not None else None for s in (self.val_stream, self.val_real_stream)]

    # ----------------------------------------------------------------------------------------------- logging
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log_event(self, rec: dict) -> None:
        if not self.is_main:
            return
        self._log.write(rec)

    # ------------------------------------------------------------------------------------------------- step
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def train_step(self, batch: dict, real: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step on a batch (and an optional real-image batch); returns the logged values."""
        lr, wd, m = self.sched.lr_at(self.step), self.sched.wd_at(self.step), self.sched.momentum_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
            g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0
        out, B, N, real = self._losses(self.ddp, batch, real, self.mask_rng)
        self.opt.zero_grad(set_to_none=True)
        out["total"].backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.ema.update(self.model.encoder, m)
        self.step += 1
        rec = {k: float(v.detach()) for k, v in out.items()}
        rec.update(lr=lr, weight_decay=wd, momentum=m)
        rec["images"] = B * (1 + N) + (real.shape[0] if real is not None else 0)
        return rec

    def _losses(
        self, model: nn.Module, batch: dict, real: torch.Tensor | None, rng: np.random.Generator
    ) -> tuple[dict[str, torch.Tensor], int, int, torch.Tensor | None]:
        """Every loss term of eq. 11 on a batch (masks drawn from ``rng``): (terms, B, N, real on the device)."""
        dev = self.device
        context = batch["context"].to(dev, non_blocking=True).float()
        targets = batch["targets"].to(dev, non_blocking=True).float()
        actions = batch["actions"].to(dev, non_blocking=True).float()
        B, N = actions.shape
        sim_masks = self.masker.sample(rng, B * N).to(dev)
        real_masks: MaskBatch | None = None
        if real is not None:
            real = real.to(dev, non_blocking=True).float()
            real_masks = self.masker.sample(rng, real.shape[0]).to(dev)
        with self._autocast():
            t_sim = self.ema(targets.flatten(0, 1)).unflatten(0, (B, N))  # (B, N, L, D), no grad
            t_real = self.ema(real) if real is not None else None
            out = model(context, actions, targets, t_sim, sim_masks, real, t_real, real_masks)
        return out, B, N, real

    # --------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict | None:
        """The mean of every loss term over ``val_batches`` held-out batches (the same batches and masks each time:
        the streams restart from their first position; at most one epoch of held-out DRRs, the real images reused
        when they run out first); logged as a "val" event. None without a validation stream. Each rank validates
        its own shard; rank 0 logs."""
        if self.val_stream is None:
            return None
        for s, st in zip((self.val_stream, self.val_real_stream), self._val_start):
            if s is not None and st is not None:
                s.load_state_dict(st)
        rng = np.random.default_rng([self.cfg.seed, self.rank, 0x76616C])
        sims = iter(self.val_stream)
        reals = iter(self.val_real_stream) if self.val_real_stream is not None else None
        sums: dict[str, float] = {}
        n = images = 0
        self.model.eval()
        try:
            for _ in range(self.cfg.val_batches):
                batch = next(sims, None)
                item = next(reals, None) if reals is not None else None
                if reals is not None and item is None and self.val_real_stream is not None:
                    # fewer held-out real batches than DRR batches: the real images are used again
                    close = getattr(reals, "close", None)
                    if close is not None:
                        close()
                    if self._val_start[1] is not None:
                        self.val_real_stream.load_state_dict(self._val_start[1])
                    reals = iter(self.val_real_stream)
                    item = next(reals, None)
                if batch is None or (reals is not None and item is None):
                    break
                real = real_images(item) if item is not None else None
                out, B, N, real = self._losses(self.model, batch, real, rng)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
                images += B * (1 + N) + (real.shape[0] if real is not None else 0)
        finally:
            self.model.train()
            for it in (sims, reals):
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        if n == 0:
            raise RuntimeError("the validation stream yielded no batch (is the held-out split empty?)")
        rec = {
            "event": "val",
            "step": self.step,
            "batches": n,
            "images": images,
            "real": reals is not None,
            **{k: v / n for k, v in sums.items()},
        }
        self.log_event(rec)
        return rec

    # ------------------------------------------------------------------------------------------------ batches
    def next_batch(self) -> tuple[dict, torch.Tensor | None]:
        if self._it is None:
            self._it = endless(self.stream)
        batch = next(self._it)
        real = None
        if self.real_stream is not None:
            if self._real_it is None:
                self._real_it = endless(self.real_stream)
            real = real_images(next(self._real_it))
        return batch, real

    # -------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "numpy_masks": self.mask_rng.bit_generator.state,
            "python": random.getstate(),
            "numpy_global": np.random.get_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CKPT_VERSION,
            "step": self.step,
            "config": self.cfg.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedules": self.sched.state_dict(),
            "rng": rng,
            "data": _state(self.stream),
            "real_data": _state(self.real_stream) if self.real_stream is not None else None,
            "world_size": self.world,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Atomic checkpoint write (rank 0); returns the path. Default: out_dir/checkpoints/step_XXXXXXXX.pt and
        a copy named latest.pt."""
        ckpt_dir = self.out_dir / "checkpoints"
        path = Path(path) if path is not None else ckpt_dir / f"step_{self.step:08d}.pt"
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            sd = self.state_dict()
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(sd, tmp)
            os.replace(tmp, path)
            if path.parent == ckpt_dir:
                latest = ckpt_dir / "latest.pt"
                tmp2 = ckpt_dir / "latest.pt.tmp"
                if tmp2.exists():
                    tmp2.unlink()
                os.link(path, tmp2)
                os.replace(tmp2, latest)
            self.log_event({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def load(self, path: str | Path) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=False)
        if sd.get("version") != CKPT_VERSION:
            raise ValueError(f"checkpoint {path}: version {sd.get('version')} != {CKPT_VERSION}")
        saved_model = sd["config"]["model"]
        if saved_model != self.cfg.model.model_dump(mode="json"):
            raise ValueError(f"checkpoint {path} was trained with a different model config: {saved_model}")
        self.model.load_state_dict(sd["model"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["optimizer"])
        self.sched.load_state_dict(sd["schedules"])
        self.step = int(sd["step"])
        rng = sd["rng"]
        torch.set_rng_state(rng["torch"])
        self.mask_rng.bit_generator.state = rng["numpy_masks"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy_global"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if sd.get("world_size", 1) != self.world:
            log.warning(
                "resuming a %d-rank run on %d ranks: the data streams re-shard from the saved position",
                sd.get("world_size", 1),
                self.world,
            )
        if sd["data"] is not None and hasattr(self.stream, "load_state_dict"):
            self.stream.load_state_dict(sd["data"])
        if sd.get("real_data") is not None and self.real_stream is not None:
            self.real_stream.load_state_dict(sd["real_data"])
        self._it = self._real_it = None  # restart iteration from the loaded positions
        self.log_event({"event": "resume", "step": self.step, "path": str(path)})

    # ---------------------------------------------------------------------------------------------------- run
    def run(self, max_steps: int | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
        """Train until ``max_steps`` (default cfg.max_steps, else the schedule's total), or until ``should_stop()``
        says so after a step (a stopped command: the caller saves the checkpoint; ``"stopped": True`` then).
        Returns a summary with the logged values of the first and last step of this call."""
        cfg = self.cfg
        stop = min(x for x in (max_steps, cfg.max_steps, cfg.optim.total_steps) if x is not None)
        has_real = self.real_stream is not None
        self.log_event(
            {
                "event": "start",
                "step": self.step,
                "stop": stop,
                "world_size": self.world,
                "device": str(self.device),
                "bf16": self.amp,
                "real_stream": has_real,
                "params": sum(p.numel() for p in self.model.parameters()),
                "config": cfg.model_dump(mode="json"),
            }
        )
        if not has_real:
            log.warning(NO_REAL_NOTE)
            self.log_event({"event": "note", "message": NO_REAL_NOTE})
        first: dict | None = None
        last: dict | None = None
        val: dict | None = None
        t0, imgs = time.perf_counter(), 0.0
        while self.step < stop:
            batch, real = self.next_batch()
            rec = self.train_step(batch, real)
            imgs += rec["images"] * self.world
            if first is None:
                first = rec
            last = rec
            if self.step % cfg.log_every == 0 or self.step == stop:
                dt = time.perf_counter() - t0
                self.log_event(
                    {
                        "event": "step",
                        "step": self.step,
                        "epoch": self.step // cfg.optim.iters_per_epoch,
                        **rec,
                        "images_per_s": imgs / dt if dt > 0 else None,
                    }
                )
                t0, imgs = time.perf_counter(), 0.0
            if cfg.val_every and self.step % cfg.val_every == 0:
                val = self.validate()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if should_stop is not None and self.step < stop and self._all_agree(should_stop()):
                self.log_event({"event": "stopped", "step": self.step})
                break
        out = {"steps": self.step, "first": first, "last": last, "real_stream": has_real}
        if self.step < stop:
            out["stopped"] = True
        if val is not None:
            out["val"] = val
        return out

    def _all_agree(self, flag: bool) -> bool:
        """``flag`` of any rank (DDP): every rank stops after the same step, none is left waiting in a collective."""
        if self.world <= 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        self._log.close()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _state(stream: Any) -> dict | None:
    return stream.state_dict() if hasattr(stream, "state_dict") else None


# ---------------------------------------------------------------------------------------------------- data wiring
def build_streams(cfg: TrainConfig) -> tuple[Any, Any | None]:
    """The simulated stream and the optional real-CXR stream a config asks for.

    ``data.synthetic``: procedural phantoms (``data.real == "synthetic"`` adds procedural real-domain images).
    ``data.store``: ``xwin.training.data.XWinStream`` over the store's projection dataset for ``data.cohort`` (the only
    dataset of the store when cohort is unset), behind ``make_loader``. ``data.real``: a directory of radiographs
    (or a MIMIC-CXR-JPG root) through ``xwin.training.data.RealCXRStream``.
    """
    d, S = cfg.data, cfg.model.img_size
    real_bs = d.real_batch_size or d.batch_size * d.n_targets
    if d.synthetic:
        return synthetic_streams(cfg, seed=cfg.seed, n_volumes=max(16, d.batch_size))
    if not d.store:
        raise ValueError("config has no data source: set data.store (a store URL) or data.synthetic=true")
    from xwin.training.data import RealCXRStream, StoreSource, make_loader

    cohort, spec = resolve_dataset(d.store, d.cohort, d.spec_hash)
    problem = action_step_problem(d.step_deg, spec.yaw_step_deg, f"dataset {cohort}/{spec.spec_hash}")
    if problem is not None:
        raise ValueError(problem)
    try:  # the config's sampling must fit the dataset's ring: one clear error now, not in a loader worker
        store_sampling(cfg).plan(spec)
    except ValueError as e:
        where = f"dataset {cohort}/{spec.spec_hash} ({spec.n_views} views every {spec.yaw_step_deg:g} deg)"
        raise ValueError(f"data sampling (data.n_targets, data.step_deg, data.max_abs_deg, ...) on {where}: {e}") from e
    source = StoreSource(d.store, cohort, spec, split=d.split)
    if d.split is not None:
        source.open()  # a cohort without an assignment, or without that split: one clear error now, not in a worker
    sim = make_loader(store_stream(cfg, source, shuffle_window=d.shuffle_window), num_workers=d.num_workers)
    real = None
    if d.real:
        rs = RealCXRStream(d.real, image_size=S, seed=cfg.seed + 1, batch_size=real_bs, split=d.split)
        real = make_loader(rs, num_workers=d.num_workers)
    return sim, real


def store_sampling(cfg: TrainConfig) -> Any:
    """The X-WIN view sampling of the config (``xwin.training.data.XWinSampling``)."""
    from xwin.training.data import XWinSampling

    d = cfg.data
    return XWinSampling(
        n_targets=d.n_targets, step_deg=d.step_deg, max_abs_deg=d.max_abs_deg, context_yaws=tuple(d.context_yaws)
    )


def store_stream(cfg: TrainConfig, source: Any, **kw: Any) -> Any:
    """The X-WIN stream of a projection dataset with the config's sampling, image size, look and batch size."""
    from xwin.training.data import XWinStream

    d = cfg.data
    sampling = store_sampling(cfg)
    return XWinStream(
        source,
        sampling=sampling,
        image_size=cfg.model.img_size,
        appearance=d.appearance,
        looks=d.looks,
        seed=cfg.seed,
        batch_size=d.batch_size,
        draws_per_volume=d.draws_per_volume,
        dtype=loader_image_dtype(cfg),
        **kw,
    )


def synthetic_streams(cfg: TrainConfig, seed: int, n_volumes: int) -> tuple[Any, Any | None]:
    """Procedural phantom rings (and real-domain images when ``data.real == "synthetic"``) drawn with ``seed``."""
    from xwin.training.synthetic import SyntheticRealStream, SyntheticRingStream

    d, S = cfg.data, cfg.model.img_size
    real_bs = d.real_batch_size or d.batch_size * d.n_targets
    sim = SyntheticRingStream(
        n_volumes=n_volumes,
        batch_size=d.batch_size,
        n_targets=d.n_targets,
        image_size=S,
        step_deg=d.step_deg or 3.0,
        max_abs_deg=d.max_abs_deg,
        context_yaws=d.context_yaws,
        seed=seed,
    )
    real = SyntheticRealStream(batch_size=real_bs, image_size=S, seed=seed + 1) if d.real == "synthetic" else None
    return sim, real


def build_val_streams(cfg: TrainConfig) -> tuple[Any, Any | None]:
    """The held-out streams of ``cfg.val_every``: (DRRs, real images or None), read in-process (no workers). A
    validation reads at most one epoch of each (``data.draws_per_volume`` samples per held-out volume).

    ``data.synthetic``: phantoms of another seed (never trained on). ``data.store``: the volumes of split
    ``data.val_split``; real images: ``data.val_real`` whole, else the ``data.val_split`` subjects of ``data.real``.
    """
    d, S = cfg.data, cfg.model.img_size
    real_bs = d.real_batch_size or d.batch_size * d.n_targets
    sim: Any
    real: Any
    if d.synthetic:  # phantoms of another seed: never trained on
        return synthetic_streams(cfg, seed=cfg.seed + 7919, n_volumes=max(4, d.batch_size))
    if not d.store or not d.val_split:
        raise ValueError("validation needs data.store and data.val_split (or data.synthetic)")
    from xwin.training.data import RealCXRStream, StoreSource, make_loader

    cohort, spec = resolve_dataset(d.store, d.cohort, d.spec_hash)
    problem = action_step_problem(d.step_deg, spec.yaw_step_deg, f"dataset {cohort}/{spec.spec_hash}")
    if problem is not None:
        raise ValueError(problem)
    held_out = StoreSource(d.store, cohort, spec, split=d.val_split)
    if not held_out.open().volume_ids():  # opened here so that a split that is missing or empty is said up front
        raise ValueError(f"validation split {d.val_split!r} of cohort {cohort!r} holds no volume")
    sim = make_loader(store_stream(cfg, held_out), num_workers=0)
    real = None
    if d.val_real or (d.real and d.real != "synthetic"):
        root = str(d.val_real or d.real)
        rs = RealCXRStream(
            root, image_size=S, seed=cfg.seed + 1, batch_size=real_bs, split=None if d.val_real else d.val_split
        )
        real = make_loader(rs, num_workers=0)
    return sim, real


def resolve_dataset(url: str, cohort: str | None, spec_hash: str | None = None):
    """(cohort, RenderSpec) of the projection dataset to train on; cohort None = the store's only dataset (of the
    spec hash, or its unique prefix, when given)."""
    from xwin.storage import open_store

    # a store that does not exist is an error (FileNotFoundError), never a new empty one; DatasetLookupError (a
    # ValueError) names the datasets when none or several match
    ds = open_store(url, create=False).find_dataset(cohort, spec_hash)
    return ds.cohort, ds.spec
