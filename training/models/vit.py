"""A plain Vision Transformer (ViT) with fixed 2D sine-cosine positional embeddings.

Shapes: images ``(B, C, H, W)``; a patch grid of ``h = H // p`` rows by ``w = W // p`` columns gives ``L = h * w``
tokens numbered row-major; token sequences are ``(B, L, D)``. ``keep`` index tensors ``(B, K)`` (int64, values in
``[0, L)``) select the tokens an encoder processes (I-JEPA style context encoding: masked patches are dropped, not
replaced).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, L, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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


def rescale_residuals(blocks: nn.ModuleList) -> None:
    """Divide each block's residual output projections by sqrt(2 * depth index) (I-JEPA's fix_init_weight)."""
    for i, blk in enumerate(blocks, start=1):
        assert isinstance(blk, Block)
        blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        cast(nn.Linear, blk.mlp[2]).weight.data.div_(math.sqrt(2.0 * i))


class VisionTransformer(nn.Module):
    """ViT encoder f_theta: conv patch embedding + fixed 2D sin-cos PE + ``depth`` blocks + final LayerNorm.

    ``forward(x (B,C,H,W), keep (B,K) | None) -> (B, K or L, D)``; no class token (tokens are pooled by the caller).
    """

    pos_embed: torch.Tensor  # fixed sin-cos PE, a non-persistent buffer

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
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        w = self.patch_embed.weight.data
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        assert self.patch_embed.bias is not None
        nn.init.zeros_(self.patch_embed.bias)
        rescale_residuals(self.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,C,H,W) -> patch tokens + PE (B, L, D)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x)
        if keep is not None:
            x = gather_tokens(x, keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
