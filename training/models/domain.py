"""Domain classifier f_c (eq. 9-10): two transformer blocks + global average pooling + linear -> one logit.

``forward(tokens (B, L, D)) -> logits (B,)``; sigmoid(logit) = f_c(z) = P(real domain). Tokens already carry
position information from the encoder / predictors, so no PE is added. When ``dim != in_dim`` a linear input
projection maps encoder tokens to the classifier width.
"""

from __future__ import annotations

import torch
from torch import nn

from xwin.training.models.vit import block, init_weights


class DomainClassifier(nn.Module):
    def __init__(self, in_dim: int, dim: int | None = None, depth: int = 2, num_heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        dim = dim or in_dim
        self.inp = nn.Identity() if dim == in_dim else nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList([block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 1)
        init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inp(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1)).squeeze(-1)
