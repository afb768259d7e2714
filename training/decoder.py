"""The VQ-GAN decoder head of the 3-D loop (X-WIN §4.4, Table 5): predicted latent views -> projection images.

A frozen world model (f_theta, f_theta' and g_v of an ``xwin train`` checkpoint) turns a context view and actions
into latent views z = g_v(f_theta(context), a) of shape (L, D). :class:`VQDecoder` maps such a token grid to an
image: LayerNorm + Linear to the codebook dimension, vector quantisation against a codebook (``vector-quantize-
pytorch``'s ``VectorQuantize``: EMA codebook updates, k-means initialisation, dead-code replacement, l2-normalised
codes as in LlamaGen, the paper's ref. [42]), then a convolutional decoder (VQGAN's: residual blocks, nearest x2
upsampling per level, log2(patch) levels) to one channel at the model resolution S.

Training (:class:`DecoderTrainer`, docs/reconstruction.md "3-D loop from predicted views"): targets are the stored
views of the ring (line integrals, mu*mm) divided by one fixed ``value_scale``, so the decoded images are physical
line integrals that FDK can reconstruct (a per-image min-max look would lose the scale FDK needs). The latents are
the predictor's z for the sampled actions and, with ``latents="both"`` (default), also the EMA-encoder tokens of
the ground-truth view (t = LN(f_theta'(u_i)), what g_v is trained to match), so that the same decoder can render
ground-truth latents: the "autoencode" reference row of ``xwin eval recon3d``. Losses (Esser et al. 2021):

    L_G = |x - x_hat|_1 + commitment (beta = 0.25) + lambda_adapt * disc_weight * (-D(x_hat))     (after disc_start)
    L_D = hinge: relu(1 - D(x)) + relu(1 + D(x_hat))                                               (after disc_start)

with D a PatchGAN (Isola et al. 2017: strided 4x4 convolutions, BatchNorm, LeakyReLU, one logit per patch) and
lambda_adapt = |grad L_rec| / |grad L_adv| at the decoder's last layer (VQGAN's adaptive weight). With EMA updates
the codebook term of VQ-VAE is replaced by the EMA update itself (van den Oord et al. 2017, appendix). VQGAN's
LPIPS perceptual term is left out: it needs VGG weights downloaded at run time.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from xwin.training.config import TrainConfig, deep_merge, parse_override
from xwin.training.models.xwin import EMAEncoder, XWin
from xwin.training.runlog import RunLog

log = logging.getLogger("xwin.decoder")
DECODER_CKPT_VERSION = 1
DECODER_KIND = "xwin-vq-decoder"


# ------------------------------------------------------------------------------------------------------- config
class DecoderConfig(BaseModel):
    """Decoder, discriminator, losses, data and optimiser of ``xwin train-decoder`` (presets: :data:`PRESETS`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str = "base"
    # quantiser (vector-quantize-pytorch VectorQuantize)
    codebook_size: int = Field(1024, ge=2)
    codebook_dim: int = Field(256, ge=1)
    cosine: bool = True  # l2-normalised codes and inputs (LlamaGen, ref. [42] of the paper)
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    kmeans_init: bool = True
    dead_code_threshold: float = 2.0  # codes whose EMA cluster size falls below this are re-seeded from the batch
    # convolutional decoder: channels per level, from the token grid up to S (log2(patch) + 1 levels)
    channels: tuple[int, ...] = (512, 256, 256, 128, 128)
    res_blocks: int = 2
    # PatchGAN discriminator and the adversarial term
    disc_channels: int = 64
    disc_layers: int = 3
    disc_weight: float = 0.8
    disc_start: int = 10_000
    # what the decoder learns to render: the predictor's latents, the EMA tokens of the true view, or both
    latents: Literal["both", "predicted", "target"] = "both"
    value_scale: float | None = None  # None: the largest stored value of the first batch (saved in the checkpoint)
    # data (the sampling of the world model's checkpoint unless set here)
    batch_size: int = 12
    n_targets: int | None = None
    num_workers: int = 2
    draws_per_volume: int = 1
    # optimiser (Adam for both networks, VQGAN's betas)
    lr: float = 1e-4
    disc_lr: float | None = None  # None: lr
    betas: tuple[float, float] = (0.5, 0.9)
    max_steps: int = 50_000
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA (the frozen model, convs)
    log_every: int = 50
    ckpt_every: int = 5000
    threads: int | None = None

    @model_validator(mode="after")
    def _check(self) -> DecoderConfig:
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels {self.channels} must be positive")
        return self


# what a resumed run may change: its length, where it runs, how it logs and checkpoints, and the loader's workers
RESUME_FREE = frozenset({"max_steps", "device", "precision", "log_every", "ckpt_every", "threads", "num_workers"})

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's best codebook (Table 5: 1024 x 256) with VQGAN's f16 decoder widths and its optimiser settings
    "base": {},
    # CPU: a narrow decoder and a small codebook, a few hundred steps in well under a minute on the 64^2 tiny model
    "tiny": {
        "codebook_size": 256,
        "codebook_dim": 32,
        "channels": (32, 32, 16, 16, 8),
        "res_blocks": 1,
        "disc_channels": 16,
        "disc_layers": 2,
        # the adversarial term joins late and light: from step 150 at weight 0.8 it undid half the L1 progress
        # of the first 150 steps within 300 (measured: L1 0.061 -> 0.12); at 0.1 from step 200 it costs nothing
        "disc_weight": 0.1,
        "disc_start": 200,
        "batch_size": 2,
        "n_targets": 4,
        "num_workers": 0,
        "draws_per_volume": 4,
        "lr": 3e-3,
        "max_steps": 300,
        "log_every": 10,
        "ckpt_every": 0,
        "threads": 1,
    },
}


def decoder_config(preset: str | None = None, overrides: list[str] | None = None, values: dict | None = None):
    """The preset (default base), then ``key=value`` overrides (YAML values), then ``values`` taken as they are."""
    name = preset or "base"
    if name not in PRESETS:
        raise ValueError(f"unknown decoder preset {name!r}; choose one of {sorted(PRESETS)}")
    d = deep_merge(PRESETS[name], {"preset": name})
    for o in overrides or []:
        d = deep_merge(d, parse_override(o))
    return DecoderConfig.model_validate(deep_merge(d, values or {}))


# ------------------------------------------------------------------------------------------------------ networks
def _groups(c: int) -> int:
    return math.gcd(32, c)


class ResBlock(nn.Module):
    """VQGAN's residual block: (GroupNorm, SiLU, conv 3x3) twice, 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c_in), c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class VQDecoder(nn.Module):
    """Token grid (B, L, D) -> quantised codes -> image (B, 1, S, S) in units of ``value_scale``.

    ``forward(tokens) -> (images, indices (B, L) int64, commitment loss 0-d)``.
    """

    def __init__(self, embed_dim: int, grid: int, patch_size: int, cfg: DecoderConfig) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        levels = round(math.log2(patch_size))
        if 2**levels != patch_size:
            raise ValueError(f"the decoder upsamples by 2 per level: patch_size {patch_size} must be a power of 2")
        if len(cfg.channels) != levels + 1:
            raise ValueError(
                f"channels {cfg.channels}: need {levels + 1} widths (the {grid}x{grid} token grid, then one per "
                f"x2 level up to {grid * patch_size}^2)"
            )
        self.grid, self.codebook_size = grid, cfg.codebook_size
        self.norm = nn.LayerNorm(embed_dim)
        self.pre = nn.Linear(embed_dim, cfg.codebook_dim)
        self.vq = VectorQuantize(
            dim=cfg.codebook_dim,
            codebook_size=cfg.codebook_size,
            decay=cfg.ema_decay,
            commitment_weight=cfg.commitment_weight,
            kmeans_init=cfg.kmeans_init,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            use_cosine_sim=cfg.cosine,
        )
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, ch[0], 3, padding=1)]
        layers += [ResBlock(ch[0], ch[0]) for _ in range(cfg.res_blocks)]
        for i in range(1, levels + 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i - 1], ch[i], 3, padding=1)]
            layers += [ResBlock(ch[i], ch[i]) for _ in range(cfg.res_blocks)]
        layers += [nn.GroupNorm(_groups(ch[-1]), ch[-1]), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch[-1], 1, 3, padding=1)

    def quantize(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) -> (codes (B, L, codebook_dim), indices (B, L), commitment loss), in float32."""
        x = self.pre(self.norm(tokens.float()))
        with torch.autocast(x.device.type, enabled=False):
            q, idx, commit = self.vq(x.float())
        return q, idx, commit.float().reshape(())

    def render(self, codes: torch.Tensor) -> torch.Tensor:
        B, L, C = codes.shape
        if self.grid * self.grid != L:
            raise ValueError(f"decoder for a {self.grid}x{self.grid} token grid got {L} tokens")
        x = codes.transpose(1, 2).reshape(B, C, self.grid, self.grid)
        return self.out(self.body(x)).float()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, idx, commit = self.quantize(tokens)
        return self.render(q), idx, commit

    @property
    def last_layer(self) -> torch.Tensor:
        return self.out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN's NLayerDiscriminator): ``forward((B,1,S,S)) -> (B,1,h,w)`` logits per patch."""

    def __init__(self, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------- the frozen model
class WorldModel:
    """The frozen parts of an ``xwin train`` checkpoint: f_theta + g_v (predicted latents) and f_theta' (targets).

    ``predict(context (B,1,S,S) look, actions (B,N) deg) -> (B, N, L, D)``; ``targets(images (n,1,S,S)) -> (n,L,D)``
    (LayerNorm'd EMA tokens, what g_v is trained against); ``look(raw)`` = the training appearance of raw stored
    line integrals (``data.appearance`` of the run).
    """

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu") -> None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path}: no such file")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            raise ValueError(f"checkpoint {path}: not a torch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not {"config", "model", "ema"} <= set(sd):
            raise ValueError(f"checkpoint {path}: not an `xwin train` checkpoint (needs config, model, ema)")
        self.path = path
        self.cfg = TrainConfig.model_validate(sd["config"])
        self.step = int(sd.get("step", 0))
        self.device = torch.device(device)
        self.model = XWin(self.cfg.model, self.cfg.loss)
        self.model.load_state_dict(sd["model"])
        self.ema = EMAEncoder(self.model.encoder)
        self.ema.load_state_dict(sd["ema"])
        for m in (self.model, self.ema):
            m.to(self.device).eval()
            for p in m.parameters():
                p.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.cfg.model.img_size

    def look(self, raw: torch.Tensor) -> torch.Tensor:
        from xwin.training.data.transforms import appearance_fn

        name = self.cfg.data.appearance
        if name == "none":
            return raw
        fn = appearance_fn(name)
        return cast(torch.Tensor, fn(raw))  # type: ignore[arg-type]  # the appearance functions take tensors too

    @torch.no_grad()
    def predict(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.model.view_predictor(self.model.encoder(context), actions)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.ema(images)

    def info(self) -> dict:
        return {"checkpoint": str(self.path), "step": self.step, "preset": self.cfg.preset}


# -------------------------------------------------------------------------------------------------- the trainer
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def codebook_usage(indices: torch.Tensor | np.ndarray, codebook_size: int) -> float:
    """Fraction of the codebook's entries that occur in ``indices`` (the paper: used codes at inference time)."""
    idx = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices).reshape(-1)
    return float(len(np.unique(idx[idx >= 0]))) / float(codebook_size)


class DecoderTrainer:
    """Trains a :class:`VQDecoder` (+ PatchGAN) on a frozen :class:`WorldModel` from raw-view batches."""

    def __init__(
        self, cfg: DecoderConfig, world: WorldModel, stream: Any, *, out_dir: str | Path, echo: bool = False
    ) -> None:
        self.cfg, self.world, self.stream = cfg, world, stream
        self.device = world.device
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.amp = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        m = world.cfg.model
        self.decoder = VQDecoder(m.embed_dim, m.grid, m.patch_size, cfg).to(self.device)
        self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(self.device)
        self.opt_g = torch.optim.Adam(self.decoder.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas)
        self.value_scale = cfg.value_scale
        self.step = 0
        self.out_dir = Path(out_dir)
        self.echo = echo
        self._log = RunLog(self.out_dir, echo)
        self._it: Any = None

    # -------------------------------------------------------------------------------------------- logging
    def log_event(self, rec: dict) -> None:
        self._log.write(rec)

    def close(self) -> None:
        self._log.close()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    # ----------------------------------------------------------------------------------------------- step
    def latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(latents (M, L, D), targets (M, 1, S, S) in units of value_scale, number of predicted rows first)."""
        dev = self.device
        ctx_raw = batch["context"].to(dev).float()
        tgt_raw = batch["targets"].to(dev).float()  # (B, N, 1, S, S)
        actions = batch["actions"].to(dev).float()
        if self.value_scale is None:
            self.value_scale = float(tgt_raw.max())
            if not self.value_scale > 0:
                raise ValueError("the first batch's stored views are all <= 0: cannot pick value_scale")
        flat = tgt_raw.flatten(0, 1)
        parts, n_pred = [], 0
        with self._autocast():
            if self.cfg.latents in ("both", "predicted"):
                z = self.world.predict(self.world.look(ctx_raw), actions).flatten(0, 1)
                parts.append(z.float())
                n_pred = z.shape[0]
            if self.cfg.latents in ("both", "target"):
                parts.append(self.world.targets(self.world.look(flat)).float())
        reps = len(parts)
        return torch.cat(parts), (flat / self.value_scale).repeat(reps, 1, 1, 1), n_pred

    def _adaptive_weight(self, rec: torch.Tensor, g_adv: torch.Tensor) -> torch.Tensor:
        last = self.decoder.last_layer
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
        w = torch.linalg.vector_norm(g_rec) / (torch.linalg.vector_norm(g_gan) + 1e-4)
        return torch.clamp(w, 0.0, 1e4).detach() * self.cfg.disc_weight

    def train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        lat, target, n_pred = self.latents(batch)
        self.decoder.train()
        self.disc.train()
        with self._autocast():
            rec_img, idx, commit = self.decoder(lat)
        err = (rec_img - target).abs()
        rec = err.mean()
        total = rec + commit
        out = {"rec_l1": float(rec.detach()), "commit": float(commit.detach())}
        if n_pred and n_pred < err.shape[0]:
            out["rec_l1_predicted"] = float(err[:n_pred].mean().detach())
            out["rec_l1_target"] = float(err[n_pred:].mean().detach())
        gan_on = self.step >= cfg.disc_start
        if gan_on:
            with self._autocast():
                g_adv = -self.disc(rec_img).float().mean()
            w = self._adaptive_weight(rec, g_adv)
            total = total + w * g_adv
            out.update(g_adv=float(g_adv.detach()), adaptive_weight=float(w))
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        if gan_on:
            with self._autocast():
                d_loss = hinge_d_loss(self.disc(target).float(), self.disc(rec_img.detach()).float())
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            out["d_loss"] = float(d_loss.detach())
        self.step += 1
        out["total"] = float(total.detach())
        out["batch_codebook_usage"] = codebook_usage(idx, cfg.codebook_size)
        out["images"] = int(target.shape[0])
        return out

    # ----------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict[str, float]:
        """L1 error (units of value_scale) and codebook usage of the decoder on fixed batches, in eval mode. The
        global random state is left as it was (training goes on the same whether or not it evaluated)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(batches)

    def _evaluate(self, batches: list[dict]) -> dict[str, float]:
        self.decoder.eval()
        errs, idxs, n = 0.0, [], 0
        for b in batches:
            lat, target, _ = self.latents(b)
            with self._autocast():
                img, idx, _ = self.decoder(lat)
            errs += float((img - target).abs().sum())
            n += target.numel()
            idxs.append(idx.reshape(-1).cpu())
        self.decoder.train()
        return {"rec_l1": errs / max(n, 1), "codebook_usage": codebook_usage(torch.cat(idxs), self.cfg.codebook_size)}

    def next_batch(self) -> dict:
        from xwin.training.loop import endless

        if self._it is None:
            self._it = endless(self.stream)
        return next(self._it)

    # -------------------------------------------------------------------------------------------------- run
    def run(self, max_steps: int | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
        """Train until ``max_steps`` (default cfg.max_steps), or until ``should_stop()`` says so after a step (then
        ``"stopped": True``; the caller saves the checkpoint)."""
        cfg = self.cfg
        stop = max_steps if max_steps is not None else cfg.max_steps
        self.log_event(
            {
                "event": "start",
                "step": self.step,
                "stop": stop,
                "device": str(self.device),
                "bf16": self.amp,
                "world_model": self.world.info(),
                "decoder_params": sum(p.numel() for p in self.decoder.parameters()),
                "disc_params": sum(p.numel() for p in self.disc.parameters()),
                "config": cfg.model_dump(mode="json"),
            }
        )
        first = last = None
        t0, imgs = time.perf_counter(), 0.0
        while self.step < stop:
            rec = self.train_step(self.next_batch())
            imgs += rec["images"]
            first = first or rec
            last = rec
            if self.step % max(cfg.log_every, 1) == 0 or self.step == stop:
                dt = time.perf_counter() - t0
                self.log_event({"event": "step", "step": self.step, **rec, "images_per_s": imgs / dt if dt else None})
                t0, imgs = time.perf_counter(), 0.0
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if should_stop is not None and self.step < stop and should_stop():
                self.log_event({"event": "stopped", "step": self.step})
                break
        out = {"steps": self.step, "first": first, "last": last, "value_scale": self.value_scale}
        if self.step < stop:
            out["stopped"] = True
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "version": DECODER_CKPT_VERSION,
            "kind": DECODER_KIND,
            "step": self.step,
            "config": self.cfg.model_dump(mode="json"),
            "world_model": {**self.world.info(), "model_config": self.world.cfg.model.model_dump(mode="json")},
            "appearance": self.world.cfg.data.appearance,
            "value_scale": self.value_scale,
            "decoder": self.decoder.state_dict(),
            "disc": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            # what an exact resume needs besides the weights: the data position and the random states
            "data": self.stream.state_dict() if hasattr(self.stream, "state_dict") else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy_global": np.random.get_state(),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
            },
        }

    def load(self, path: str | Path) -> None:
        """Continue a run from its checkpoint ``path``: weights, optimisers, step, value scale, data position and
        random states, so that training goes on as if it had not stopped. Refuses a checkpoint of another world
        model architecture or of a decoder config that differs in anything but the run's length, device, logging,
        checkpointing and loader workers."""
        p = Path(path)
        sd = read_decoder_checkpoint(p, self.world)
        mine, theirs = (
            self.cfg.model_dump(mode="json"),
            DecoderConfig.model_validate(sd["config"]).model_dump(mode="json"),
        )
        differ = sorted(k for k in mine if k not in RESUME_FREE and mine[k] != theirs.get(k))
        if differ:
            raise ValueError(
                f"decoder checkpoint {p} was trained with another config: "
                + ", ".join(f"{k} {theirs.get(k)!r} (now {mine[k]!r})" for k in differ)
            )
        self.decoder.load_state_dict(sd["decoder"])
        self.disc.load_state_dict(sd["disc"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.opt_d.load_state_dict(sd["opt_d"])
        self.step, self.value_scale = int(sd["step"]), sd["value_scale"]
        if sd.get("data") is not None and hasattr(self.stream, "load_state_dict"):
            self.stream.load_state_dict(sd["data"])
        else:
            log.warning("decoder checkpoint %s holds no data position: the sample order starts afresh", p)
        rng = sd.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy_global"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self._it = None  # iterate again from the loaded position
        self.log_event({"event": "resume", "step": self.step, "path": str(p)})

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.out_dir / "checkpoints" / f"decoder_{self.step:08d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        latest = path.parent / "decoder_latest.pt"
        if path != latest:
            tmp2 = path.parent / "decoder_latest.pt.tmp"
            tmp2.unlink(missing_ok=True)
            os.link(path, tmp2)
            os.replace(tmp2, latest)
        self.log_event({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path


def read_decoder_checkpoint(p: Path, world: WorldModel) -> dict:
    """The state dict of ``xwin train-decoder`` checkpoint ``p``, refused (one line: no such file, not a checkpoint,
    another version, a decoder of a world model of another architecture than ``world``'s) before anything uses it."""
    if not p.is_file():
        raise FileNotFoundError(f"decoder {p}: no such file")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"decoder {p}: not a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or sd.get("kind") != DECODER_KIND:
        raise ValueError(f"decoder {p}: not an `xwin train-decoder` checkpoint")
    if sd.get("version") != DECODER_CKPT_VERSION:
        raise ValueError(f"decoder {p}: version {sd.get('version')} != {DECODER_CKPT_VERSION}")
    if sd["world_model"]["model_config"] != world.cfg.model.model_dump(mode="json"):
        raise ValueError(f"decoder {p} was trained on a world model with another architecture than {world.path}")
    return sd


def load_decoder(path: str | Path, world: WorldModel) -> tuple[VQDecoder, float, dict]:
    """(decoder in eval mode on the world model's device, value_scale, the checkpoint's metadata); refuses a decoder
    trained on a world model of another architecture."""
    p = Path(path)
    sd = read_decoder_checkpoint(p, world)
    cfg = DecoderConfig.model_validate(sd["config"])
    m = world.cfg.model
    dec = VQDecoder(m.embed_dim, m.grid, m.patch_size, cfg)
    dec.load_state_dict(sd["decoder"])
    dec.to(world.device).eval()
    meta = {k: sd[k] for k in ("step", "config", "world_model", "appearance")}
    return dec, float(sd["value_scale"]), meta


# ---------------------------------------------------------------------------------------------------- data
def decoder_stream(dataset_url: str, world: WorldModel, cfg: DecoderConfig, split: str | None) -> Any:
    """Batches of raw stored views (appearance "none", resized to the model's S) sampled like the world model's
    training: ``context (B,1,S,S)``, ``targets (B,N,1,S,S)`` in mu*mm, ``actions (B,N)`` degrees."""
    from xwin.training.data import StoreSource, XWinSampling, XWinStream, make_loader

    src = StoreSource.parse(dataset_url)
    src = StoreSource(src.url, src.cohort, src.spec, split=split)
    d = world.cfg.data
    sampling = XWinSampling(
        n_targets=cfg.n_targets or d.n_targets,
        step_deg=d.step_deg,
        max_abs_deg=d.max_abs_deg,
        context_yaws=tuple(d.context_yaws),
    )
    ds = XWinStream(
        src,
        sampling=sampling,
        image_size=world.image_size,
        appearance="none",
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        draws_per_volume=cfg.draws_per_volume,
    )
    return make_loader(ds, num_workers=cfg.num_workers)


def default_split(dataset_url: str, wanted: str) -> str | None:
    """``wanted`` when the cohort of ``dataset_url`` has a split assignment, else None (every volume)."""
    from xwin.storage import open_store
    from xwin.training.data import StoreSource

    src = StoreSource.parse(dataset_url)
    return wanted if open_store(src.url, create=False).read_splits(src.cohort) is not None else None


def train_decoder(
    checkpoint: str | Path,
    dataset_url: str,
    cfg: DecoderConfig,
    out_dir: str | Path,
    *,
    split: str | None = None,
    max_steps: int | None = None,
    eval_batches: int = 4,
    echo: bool = False,
    should_stop: Callable[[], bool] | None = None,
    resume: str | Path | None = None,
) -> dict:
    """Train a decoder on the frozen world model of ``checkpoint`` from the views of ``dataset_url``
    (``<store>#<cohort>[/<spec hash>]``); returns the summary ``xwin train-decoder --json`` prints. ``should_stop``:
    asked after each step; when it says so, training ends there (evaluated and saved as at the end). ``resume``: a
    decoder checkpoint of this run to continue from (:meth:`DecoderTrainer.load`); the evaluation batches are the
    run's first batches either way."""
    from importlib.metadata import version

    device = resolve_device(cfg.device)
    world = WorldModel(checkpoint, device)
    stream = decoder_stream(dataset_url, world, cfg, split)
    tr = DecoderTrainer(cfg, world, stream, out_dir=out_dir, echo=echo)
    try:
        held = [tr.next_batch() for _ in range(eval_batches)]
        held = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in held]
        if resume is not None:
            tr.load(resume)
        before = tr.evaluate(held)
        summary = tr.run(max_steps, should_stop)
        after = tr.evaluate(held)
        ckpt = tr.save()
        tr.log_event({"event": "evaluation", "before": before, "after": after})
    finally:
        tr.close()
    summary.update(
        checkpoint=str(ckpt),
        out_dir=str(out_dir),
        preset=cfg.preset,
        split=split,
        dataset=dataset_url,
        codebook=[cfg.codebook_size, cfg.codebook_dim],
        codebook_usage=after["codebook_usage"],
        eval={"batches": eval_batches, "before": before, "after": after},
        world_model=world.info(),
        quantizer=f"vector-quantize-pytorch {version('vector-quantize-pytorch')}",
    )
    return summary
