"""The X-WIN world model: encoder f_theta, EMA target encoder f_theta', view predictor g_v, mask predictor g_m,
domain classifier f_c and the two learnable temperatures, with the full objective of eq. 11.

``XWin.forward`` computes every loss term from already-encoded targets (the EMA encoder runs outside, under
``no_grad``, see ``encode_targets``); this keeps one module to wrap in DDP. Gradient routing (paper §3.3-3.4):

- L_cls sees *detached* real/simulated token maps: it trains f_c only (not the encoder or predictors);
- L_domain calls f_c with *detached parameters* (``torch.func.functional_call``): it trains g_v and f_theta only;
- the EMA encoder has ``requires_grad=False`` and is updated by ``ema_update`` only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from xwin.training import losses as L
from xwin.training.config import LossConfig, ModelConfig
from xwin.training.masks import MaskBatch
from xwin.training.models.domain import DomainClassifier
from xwin.training.models.predictors import MaskPredictor, ViewPredictor
from xwin.training.models.vit import VisionTransformer, gather_tokens, rename_legacy_keys


def build_encoder(cfg: ModelConfig) -> VisionTransformer:
    return VisionTransformer(
        cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio
    )


class XWin(nn.Module):
    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_cfg = loss_cfg or LossConfig()
        self.encoder = build_encoder(cfg)
        self.view_predictor = ViewPredictor(
            cfg.grid,
            cfg.embed_dim,
            cfg.view_pred_dim,
            cfg.view_pred_depth,
            cfg.view_pred_heads,
            cfg.mlp_ratio,
            action_scale=cfg.action_scale_deg,
        )
        self.mask_predictor = MaskPredictor(
            cfg.grid, cfg.embed_dim, cfg.mask_pred_dim, cfg.mask_pred_depth, cfg.mask_pred_heads, cfg.mlp_ratio
        )
        self.domain = DomainClassifier(cfg.embed_dim, cfg.domain_dim, cfg.domain_depth, cfg.domain_heads, cfg.mlp_ratio)
        lc = self.loss_cfg
        self.tau = L.LearnableTemperature(lc.tau_init, lc.tau_min)
        self.tau_tilde = L.LearnableTemperature(lc.tau_tilde_init, lc.tau_min)
        self.register_load_state_dict_pre_hook(rename_legacy_keys)  # checkpoints of the hand-written blocks

    # ------------------------------------------------------------------------------------------------- pieces
    def mim(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked image modelling on images (B,1,S,S) with target tokens (B, L, D) -> (loss, full token set
        (B, K+M, D): visible encoder tokens followed by the reconstructed mask tokens)."""
        ctx = self.encoder(images, masks.keep)  # (B, K, D)
        pred = self.mask_predictor(ctx, masks.keep, masks.masked)  # (B, M, D)
        loss = L.token_mse(pred, gather_tokens(targets, masks.masked))
        return loss, torch.cat([ctx, pred], dim=1)

    def domain_logits_frozen(self, tokens: torch.Tensor) -> torch.Tensor:
        """f_c(tokens) with detached parameters: gradients reach ``tokens`` only (stop-gradient of eq. 10)."""
        params = {k: v.detach() for k, v in self.domain.named_parameters()}
        buffers = dict(self.domain.named_buffers())
        return functional_call(self.domain, {**params, **buffers}, (tokens,))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        context: torch.Tensor,
        actions: torch.Tensor,
        targets: torch.Tensor,
        t_sim: torch.Tensor,
        sim_masks: MaskBatch,
        real: torch.Tensor | None = None,
        t_real: torch.Tensor | None = None,
        real_masks: MaskBatch | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms of eq. 11.

        context (B,1,S,S); actions (B,N) degrees; targets (B,N,1,S,S) simulated target views u_i; t_sim (B,N,L,D)
        EMA tokens of the targets; sim_masks for the B*N targets; real (R,1,S,S), t_real (R,L,D), real_masks for
        the optional real-CXR batch. Returns a dict with ``total`` and every term (0-d tensors).
        """
        lc = self.loss_cfg
        _B, _N = actions.shape
        ctx = self.encoder(context)  # (B, L, D)
        z_patch = self.view_predictor(ctx, actions)  # (B, N, L, D)
        tau, tau_tilde = self.tau(), self.tau_tilde()
        out = L.align_loss(z_patch.mean(2), t_sim.mean(2), tau, tau_tilde, lc.lambda_affinity, lc.normalize)

        sim_imgs = targets.flatten(0, 1)  # (B*N, 1, S, S)
        mim_sim, sim_tokens = self.mim(sim_imgs, sim_masks, t_sim.flatten(0, 1))
        out["mim_sim"] = mim_sim
        total = out["align"] + lc.lambda_mim * mim_sim
        if real is not None:
            if t_real is None or real_masks is None:
                raise ValueError("real images need their EMA tokens t_real and real_masks")
            mim_real, real_tokens = self.mim(real, real_masks, t_real)
            out["mim_real"] = mim_real
            out["mim"] = mim_sim + mim_real
            # eq. 9: f_c learns real (1) vs simulated (0) on detached token maps
            out["cls"] = L.cls_loss(self.domain(real_tokens.detach()), self.domain(sim_tokens.detach()))
            # eq. 10: predicted views should keep the targets' structure and look real to a frozen f_c
            logits_z = self.domain_logits_frozen(z_patch.flatten(0, 1))
            out.update(L.domain_loss(z_patch, t_sim, logits_z))
            total = total + lc.lambda_mim * mim_real + lc.lambda_domain * out["domain"] + lc.lambda_cls * out["cls"]
        else:
            out["mim"] = mim_sim
        out["total"] = total
        out["tau"] = tau.detach()
        out["tau_tilde"] = tau_tilde.detach()
        return out


class EMAEncoder(nn.Module):
    """f_theta': a frozen copy of the encoder updated as theta' <- m theta' + (1 - m) theta."""

    def __init__(self, encoder: VisionTransformer) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, encoder: nn.Module, momentum: float) -> None:
        src: list[torch.Tensor] = list(encoder.parameters())
        dst: list[torch.Tensor] = list(self.encoder.parameters())
        torch._foreach_mul_(dst, momentum)
        torch._foreach_add_(dst, [p.detach() for p in src], alpha=1.0 - momentum)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Target tokens: (B,1,S,S) -> LayerNorm(f_theta'(images)) (B, L, D), no affine (I-JEPA targets)."""
        h = self.encoder(images)
        return F.layer_norm(h, (h.shape[-1],))
