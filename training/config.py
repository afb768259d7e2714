"""Training configuration: pydantic models with the paper's defaults, presets, file loading and CLI overrides.

``load_config(path=None, preset="base", overrides=["optim.lr=1e-4", ...]) -> TrainConfig``: the preset gives the
starting values, a YAML/JSON file (which may name its own ``preset:``) is merged over it, then ``key.sub=value``
overrides (values parsed as YAML scalars/lists; a quoted value stays a string), then ``values`` (a nested mapping
taken as it is: what command-line options like ``--cohort 2024`` set, never re-parsed). Unknown keys are errors.
``build_config`` does the same from a mapping already read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from xwin.schemas.look import LookRanges

# standard ViT widths: (embed_dim, depth, num_heads)
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Encoder f_theta (ViT, fixed 2D sin-cos PE), predictors g_v and g_m, domain classifier f_c."""

    img_size: int = 512
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    view_pred_dim: int = 384
    view_pred_depth: int = 3
    view_pred_heads: int = 6
    mask_pred_dim: int = 384
    mask_pred_depth: int = 3
    mask_pred_heads: int = 6
    domain_dim: int | None = None  # None: the encoder width
    domain_depth: int = 2
    domain_heads: int = 12
    action_scale_deg: float = 90.0  # Linear(a / action_scale_deg): +-90 deg -> +-1

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        for dim, heads, name in (
            (self.embed_dim, self.num_heads, "encoder"),
            (self.view_pred_dim, self.view_pred_heads, "view predictor"),
            (self.mask_pred_dim, self.mask_pred_heads, "mask predictor"),
            (self.domain_dim or self.embed_dim, self.domain_heads, "domain classifier"),
        ):
            if dim % heads or dim % 4:
                raise ValueError(f"{name}: width {dim} must be divisible by its heads ({heads}) and by 4")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @classmethod
    def from_arch(cls, arch: str, **kw: Any) -> ModelConfig:
        if arch not in VIT_ARCHS:
            raise ValueError(f"unknown ViT arch {arch!r}; choose one of {sorted(VIT_ARCHS)}")
        d, depth, heads = VIT_ARCHS[arch]
        return cls(embed_dim=d, depth=depth, num_heads=heads, domain_heads=heads, **kw)


class MaskConfig(_Strict):
    """Multi-block masking (I-JEPA / CheXWorld), see training/masks.py."""

    pred_scale: tuple[float, float] = (0.15, 0.2)
    pred_aspect: tuple[float, float] = (0.75, 1.5)
    n_pred: int = 4
    enc_scale: tuple[float, float] = (0.85, 1.0)
    enc_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10


class LossConfig(_Strict):
    lambda_affinity: float = 0.4
    lambda_mim: float = 1.0
    lambda_domain: float = 0.6
    lambda_cls: float = 1.0
    tau_init: float = 0.1
    tau_tilde_init: float = 0.1
    tau_min: float = 0.01
    # sim (eq. 3-4) = the dot product of the pooled vectors (paper); True: of L2-normalised vectors (cosine)
    normalize: bool = False


class OptimConfig(_Strict):
    """AdamW; per-step cosine schedules for LR (after linear warmup), weight decay and EMA momentum."""

    lr: float = 2e-5
    final_lr: float = 1e-6
    start_lr: float = 1e-6  # warmup starts here
    warmup_steps: int = 5000  # 2 of the paper's 2,500-iteration epochs
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.994, 1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100
    iters_per_epoch: int = 2500
    grad_clip: float | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch


class DataConfig(_Strict):
    """Where batches come from. ``store`` = an xwin store URL (projection dataset of ``cohort``); ``synthetic``
    uses the built-in procedural phantom stream (tests, benchmarks). ``real`` = an optional real-CXR source."""

    # ``store`` may name the dataset whole: ``<store url>#<cohort>[/<spec hash>]`` (split into the three fields)
    store: str | None = None
    cohort: str | None = None
    spec_hash: str | None = None  # the dataset's spec hash (a unique prefix is enough) when the cohort has several
    # the subject-level split to train on (``xwin splits assign``): the DRR stream reads only its volumes, the real
    # stream only the images of subjects its hash puts in the same split; None = everything (no split assigned)
    split: str | None = None
    # validation (``val_every``): the held-out split of the DRRs, whose subjects' images of ``real`` are the held-out
    # real images too, unless ``val_real`` names a directory of held-out radiographs (taken whole)
    val_split: str | None = None
    val_real: str | None = None
    synthetic: bool = False
    real: str | None = None
    real_batch_size: int | None = None  # None: batch_size * n_targets (one real image per simulated target)
    batch_size: int = 12
    n_targets: int = 8
    step_deg: float | None = 3.0
    max_abs_deg: float = 90.0
    context_yaws: tuple[float, ...] = (0.0, 90.0)
    appearance: str = "minmax"
    # domain actions: per sample a radiograph look (spectrum, dose, blur, scatter) drawn from these ranges makes the
    # images from the rings' material bases (a dataset rendered with materials: true; docs/appearance.md); the
    # sample records it. None: the stored line integrals through ``appearance``.
    looks: LookRanges | None = None
    num_workers: int = 2
    draws_per_volume: int = 1
    shuffle_window: int = 1024
    # dtype of the DRR image tensors the loader hands over; the trainer widens them to float32 on the device.
    # bfloat16 halves the bytes a worker writes and ships (the gain in samples/s: docs/benchmarks.md, Consumer).
    # Images only enter the model through the encoders' patch embedding, which bf16 autocast runs in bf16: with
    # autocast, bf16 images are exactly what the model sees anyway. "auto": bfloat16 when the trainer autocasts to
    # bf16 (precision bf16, or auto on CUDA), else float32.
    image_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _dataset_url(cls, data: Any) -> Any:
        store = data.get("store") if isinstance(data, dict) else None
        if isinstance(store, str) and "#" in store:
            from xwin.storage.layout import split_dataset_url

            url, cohort, spec_hash = split_dataset_url(store)
            data = {**data, "store": url}
            for name, given in (("cohort", cohort), ("spec_hash", spec_hash)):
                mine = data.get(name)
                if mine is not None and given is not None and mine != given:
                    raise ValueError(f"store {store!r} names {name} {given!r} but data.{name} is {mine!r}")
                if given is not None:
                    data[name] = given
        return data


class TrainConfig(_Strict):
    preset: str = "base"
    model: ModelConfig = Field(default_factory=ModelConfig)
    masks: MaskConfig = Field(default_factory=MaskConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    out_dir: str = "runs/xwin"
    log_every: int = 10
    ckpt_every: int = 1000
    max_steps: int | None = None  # stop early (schedules still span optim.total_steps)
    threads: int | None = None  # torch intra-op threads on CPU
    # every ``val_every`` steps (0: never) the losses on ``val_batches`` fixed held-out batches go to the log
    # ("val" events): DRRs of ``data.val_split`` and held-out real images (docs/training.md, Validation)
    val_every: int = 0
    val_batches: int = 4
    # the weights of a timm ViT of the same width, depth and patch size (a state_dict file, .pth or .safetensors) to
    # start the encoder (and so its EMA copy) from; position embedding, class token and head are left out
    init_encoder: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.masks.min_keep >= self.model.grid**2:
            raise ValueError(f"masks.min_keep={self.masks.min_keep} must be < {self.model.grid**2} patches")
        d = self.data
        if self.val_every > 0 and not d.synthetic:
            if not d.val_split:
                raise ValueError("val_every > 0 needs data.val_split: the held-out split to validate on")
            if d.split is None or d.split == d.val_split:
                raise ValueError(
                    f"validating on split {d.val_split!r} needs training on another one: set data.split "
                    f"(now {d.split!r}), or the held-out volumes are trained on"
                )
        return self


PRESETS: dict[str, dict[str, Any]] = {
    # the paper: ViT-B/16 at 512^2, batch 12, N = 8, 100 x 2,500 iterations
    "base": {},
    # CPU smoke/overfit configuration: 64^2 images, 4x4 patches, a 2-block 64-wide encoder
    "tiny": {
        "model": {
            "img_size": 64,
            "patch_size": 16,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
            "view_pred_dim": 32,
            "view_pred_depth": 1,
            "view_pred_heads": 2,
            "mask_pred_dim": 32,
            "mask_pred_depth": 1,
            "mask_pred_heads": 2,
            "domain_dim": 32,
            "domain_depth": 2,
            "domain_heads": 2,
        },
        "masks": {"min_keep": 4},
        # target dot products scale with the width: at D=64 they are ~12x smaller than at D=768
        "loss": {"tau_tilde_init": 0.02},
        "optim": {
            "lr": 1e-3,
            "final_lr": 1e-4,
            "start_lr": 1e-4,
            "warmup_steps": 5,
            "epochs": 1,
            "iters_per_epoch": 1000,
        },
        "data": {"batch_size": 4, "n_targets": 8, "num_workers": 0, "real_batch_size": 8},
        "log_every": 1,
        "ckpt_every": 100,
        "threads": 1,  # tiny ops: a second thread costs more in synchronisation than it saves
    },
}


def deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": parsed value}}}`` (value parsed as YAML, so 1e-4 -> float)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    val = yaml.safe_load(raw) if raw.strip() else None
    quoted = raw.strip()[:1] in ("'", '"')
    if isinstance(val, str) and not quoted:  # YAML reads 1e-4 as a string; try a number
        with contextlib.suppress(ValueError):
            val = float(val)
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = val
    return out


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return deep_merge(PRESETS[name], {"preset": name})


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    values: dict | None = None,
) -> TrainConfig:
    file_d: dict = {}
    if path is not None:
        text = Path(path).read_text()
        file_d = (json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)) or {}
        if not isinstance(file_d, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(file_d).__name__}")
    return build_config(file_d, preset, overrides, values)


def build_config(
    file_d: dict, preset: str | None = None, overrides: list[str] | None = None, values: dict | None = None
) -> TrainConfig:
    """The config of a file's mapping ``file_d`` (see the module docstring for the order of the layers)."""
    name = preset or file_d.get("preset") or "base"
    d = deep_merge(preset_dict(name), file_d)
    d["preset"] = name
    for o in overrides or []:
        d = deep_merge(d, parse_override(o))
    d = deep_merge(d, values or {})
    return TrainConfig.model_validate(d)
