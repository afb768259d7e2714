"""The two predictors of X-WIN: the action-conditioned view predictor g_v and the mask predictor g_m.

Both are narrow ViTs (I-JEPA predictor style): encoder tokens are projected to the predictor width, fixed 2D sin-cos
PE of that width is added, a few transformer blocks run, and outputs are projected back to the encoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from xwin.training.models.vit import block, gather_tokens, init_weights, rescale_residuals, sincos_2d


class ViewPredictor(nn.Module):
    """g_v (eq. 1): z_i^patch = g_v(Linear(a_i) (+) (f_theta(u_context) + PE)).

    ``forward(ctx (B, L, D), actions (B, N) degrees) -> z_patch (B, N, L, D)``. The action token is
    ``Linear(a_i / action_scale)`` (degrees scaled so +-90 deg maps to +-1); it is concatenated in front of the L
    context tokens and dropped from the output. Each of the N actions runs as its own sequence.
    """

    pos_embed: torch.Tensor  # fixed sin-cos PE, a non-persistent buffer

    def __init__(
        self,
        grid: int,
        embed_dim: int,
        pred_dim: int = 384,
        depth: int = 3,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        action_scale: float = 90.0,
    ) -> None:
        super().__init__()
        self.action_scale = float(action_scale)
        self.embed = nn.Linear(embed_dim, pred_dim)
        self.action_embed = nn.Linear(1, pred_dim)
        self.register_buffer("pos_embed", sincos_2d(pred_dim, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([block(pred_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.proj = nn.Linear(pred_dim, embed_dim)
        init_weights(self)
        rescale_residuals(self.blocks)

    def forward(self, ctx: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        B, L, _ = ctx.shape
        if actions.ndim != 2 or actions.shape[0] != B:
            raise ValueError(f"actions must be (B={B}, N), got {tuple(actions.shape)}")
        N = actions.shape[1]
        x = self.embed(ctx) + self.pos_embed  # (B, L, P)
        P = x.shape[-1]
        a = self.action_embed((actions.to(x.dtype) / self.action_scale).unsqueeze(-1))  # (B, N, P)
        x = x.unsqueeze(1).expand(B, N, L, P).reshape(B * N, L, P)
        x = torch.cat([a.reshape(B * N, 1, P), x], dim=1)  # (B*N, 1+L, P)
        for blk in self.blocks:
            x = blk(x)
        x = self.proj(self.norm(x[:, 1:]))
        return x.reshape(B, N, L, -1)


class MaskPredictor(nn.Module):
    """g_m (eq. 7): z^mask = g_m(f_theta(v~) (+) m_v + PE), I-JEPA predictor.

    ``forward(ctx (B, K, D), keep (B, K), masked (B, M)) -> (B, M, D)``: context tokens carry the PE of their own
    positions, the M mask tokens (one learned vector) the PE of the masked positions; outputs at the mask tokens.
    """

    pos_embed: torch.Tensor  # fixed sin-cos PE, a non-persistent buffer

    def __init__(
        self,
        grid: int,
        embed_dim: int,
        pred_dim: int = 384,
        depth: int = 3,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.register_buffer("pos_embed", sincos_2d(pred_dim, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([block(pred_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.proj = nn.Linear(pred_dim, embed_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        rescale_residuals(self.blocks)

    def forward(self, ctx: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        B, K, _ = ctx.shape
        if keep.shape != (B, K) or masked.ndim != 2 or masked.shape[0] != B:
            raise ValueError(
                f"keep must be (B, K)={B, K} and masked (B, M), got {tuple(keep.shape)}, {tuple(masked.shape)}"
            )
        pos = self.pos_embed.expand(B, -1, -1)
        x = self.embed(ctx) + gather_tokens(pos, keep)
        m = self.mask_token.to(x.dtype) + gather_tokens(pos, masked).to(x.dtype)
        x = torch.cat([x, m], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, K:]))
