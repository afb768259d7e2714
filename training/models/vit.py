"""The X-WIN encoder: ``timm``'s Vision Transformer with fixed 2D sine-cosine positional embeddings and token dropping.

Shapes: images ``(B, C, H, W)``; a patch grid of ``h = H // p`` rows by ``w = W // p`` columns gives ``L = h * w``
tokens numbered row-major; token sequences are ``(B, L, D)``. ``keep`` index tensors ``(B, K)`` (int64, values in
``[0, L)``) select the tokens an encoder processes (I-JEPA style context encoding: masked patches are dropped, not
replaced).

The encoder is ``timm.models.vision_transformer.VisionTransformer`` (no class token, no head, no learned position
embedding); its parameter names are timm's, so weights of a timm ViT of the same width and depth load into it
(:func:`load_timm_weights`). The transformer blocks of the predictors and the domain classifier are timm's ``Block``
too (:func:`block`).
"""

from __future__ import annotations

import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

log = logging.getLogger("xwin.models")


def _import_timm() -> Any:
    """``timm.models.vision_transformer``. timm imports torchvision, and a torchvision wheel built for CUDA beside a
    CPU-only torch cannot load its operators: torchvision 0.28 then fails on import when it registers fake kernels
    for ``nms``/``qnms``. timm needs only torchvision's Python modules, so in that case the two operator schemas are
    declared (without kernels: calling them still fails) and the import is retried."""
    try:
        import timm.models.vision_transformer as tvit
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for k in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[k]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        import timm.models.vision_transformer as tvit
    return tvit


_KEEP: list[Any] = []  # the operator library of _import_timm lives as long as the process
_tvit = _import_timm()
if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
else:
    TimmViT = _tvit.VisionTransformer
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Transformer sinusoidal encoding of positions ``pos`` (M,) -> (M, dim): [sin(pos*w_k), cos(pos*w_k)]."""
    if dim % 2:
        raise ValueError(f"sincos_1d needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).to(torch.float32)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (grid_h*grid_w, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.reshape(-1)), sincos_1d(dim // 2, cols.reshape(-1))], dim=1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), idx (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def block(dim: int, num_heads: int, mlp_ratio: float = 4.0) -> nn.Module:
    """timm's pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); LayerNorm eps 1e-6 (ViT's)."""
    return _tvit.Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (I-JEPA/ViT convention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_residuals(blocks: nn.Module) -> None:
    """Divide each block's residual output projections by sqrt(2 * depth index) (I-JEPA's fix_init_weight)."""
    for i, blk in enumerate(blocks.children(), start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))  # type: ignore[union-attr, operator]
        blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))  # type: ignore[union-attr, operator]


# parameter names of the hand-written ViT blocks this package used before timm -> timm's
_LEGACY = ((".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))


def rename_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """A load_state_dict pre-hook: checkpoints written before the timm blocks (``mlp.0``/``mlp.2``,
    ``patch_embed.weight``) load under timm's names (``mlp.fc1``/``mlp.fc2``, ``patch_embed.proj.weight``)."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        new = k
        for old, cur in _LEGACY:
            new = new.replace(old, cur)
        if isinstance(module, VisionTransformer) and k in (prefix + "patch_embed.weight", prefix + "patch_embed.bias"):
            new = prefix + "patch_embed.proj." + k.rsplit(".", 1)[1]
        if new != k:
            state_dict[new] = state_dict.pop(k)


class VisionTransformer(TimmViT):
    """ViT encoder f_theta: timm's VisionTransformer (conv patch embedding, pre-norm blocks, final LayerNorm) without
    class token or head, with a fixed 2D sin-cos PE (a non-persistent buffer, as the paper) instead of a learned one.

    ``forward(x (B,C,H,W), keep (B,K) | None) -> (B, K or L, D)``: tokens outside ``keep`` are dropped after the PE
    is added, before the blocks. Without ``keep`` this equals timm's own ``forward_features``.
    """

    pos_embed: torch.Tensor  # type: ignore[assignment]  # fixed sin-cos PE, a non-persistent buffer

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ) -> None:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=False,
            pos_embed="none",
            norm_layer=LayerNorm6,
            fix_init=True,  # residual projections / sqrt(2 * layer): I-JEPA's fix_init_weight
        )
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        del self.pos_embed  # timm's (None, with pos_embed="none"), replaced by the fixed buffer
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid, self.grid)[None], persistent=False)
        # I-JEPA's patch embedding init (timm leaves the conv at PyTorch's default)
        w = self.patch_embed.proj.weight.data
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.register_load_state_dict_pre_hook(rename_legacy_keys)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) -> patch tokens + PE (B, L, D)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.patch_embed(x) + self.pos_embed

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x = self.embed(x)
        if keep is not None:
            x = gather_tokens(x, keep)
        return self.norm(self.blocks(self.norm_pre(x)))


# keys of a timm ViT checkpoint that this encoder has no use for: the class / register tokens and the classifier;
# the learned position embedding is replaced by the fixed sin-cos one
_TIMM_UNUSED = ("cls_token", "reg_token", "pos_embed", "head.", "fc_norm.", "attn_pool.")


def load_timm_weights(encoder: VisionTransformer, source: str | Path | dict) -> dict:
    """Start ``encoder`` from the weights of a timm ViT of the same width, depth and patch size.

    ``source``: a state_dict, or a file holding one (``.safetensors``, or a torch file whose state_dict may sit
    under ``model``/``state_dict``). The class/register tokens, the learned position embedding and the classifier
    head are left out (the X-WIN encoder has none of them and a fixed sin-cos PE); RGB patch weights are summed to
    ``in_chans`` channels (timm's ``adapt_input_conv``). Every other tensor must match: a missing or extra key or
    a shape difference raises ``ValueError``. Returns ``{"loaded": n, "ignored": [keys]}``.
    """
    from timm.models._manipulate import adapt_input_conv

    sd: dict[str, Any]
    if isinstance(source, dict):
        sd = dict(source)
        where = "state_dict"
    else:
        where = str(source)
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"ViT checkpoint {p} is not a file")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        for k in ("model", "state_dict"):
            inner = sd.get(k)
            if isinstance(inner, dict):
                sd = inner
    ignored = sorted(k for k in sd if k.startswith(_TIMM_UNUSED))
    sd = {k: v for k, v in sd.items() if not k.startswith(_TIMM_UNUSED)}
    w = sd.get("patch_embed.proj.weight")
    want = encoder.patch_embed.proj.weight
    if w is not None and w.ndim == 4 and w.shape[1] != want.shape[1] and w.shape[2:] == want.shape[2:]:
        sd["patch_embed.proj.weight"] = adapt_input_conv(want.shape[1], w)
    mine = encoder.state_dict()
    bad = [
        f"{k}: {tuple(v.shape)} != {tuple(mine[k].shape)}"
        for k, v in sd.items()
        if k in mine and v.shape != mine[k].shape
    ]
    missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    if bad or missing or extra:
        raise ValueError(
            f"{where} does not fit this encoder (embed_dim {encoder.embed_dim}, depth {len(encoder.blocks)}, patch "
            f"{encoder.patch_size}): shapes {bad[:3]}, missing {missing[:3]}, unexpected {extra[:3]}"
        )
    encoder.load_state_dict(sd)
    log.info("encoder weights from %s: %d tensors (left out: %s)", where, len(sd), ignored)
    return {"loaded": len(sd), "ignored": ignored}
