"""X-WIN objectives (paper eqs. 2-10) as pure functions on small tensors.

Conventions
- InfoNCE is computed per sample over its N target views (all views of one CT volume): z, t are ``(B, N, D)``,
  similarities ``(B, N, N)``, and every loss is averaged over the B samples.
- ``sim`` is the dot product (eq. 3) of the pooled vectors (``normalize=False``, the paper and the default); with
  ``normalize=True`` the vectors are L2-normalised first (cosine). The raw dot product lets both the prediction
  and the target scale set the sharpness of p and A; with cosine, nearly collinear pooled targets (the usual state
  early in training) leave A almost uniform, and L_affinity >= H(A) then cannot fall.
- ``||a - b||^2`` in eqs. 8 and 10 is taken as the mean squared error per element (over tokens and channels), the
  I-JEPA convention; a literal sum over ~10^3 tokens x 768 channels would swamp the other terms of eq. 11.
- Everything is evaluated in float32, whatever the autocast dtype of the inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LearnableTemperature(nn.Module):
    """A positive temperature parameterised by its log; ``forward() -> tau`` (0-d), clamped to ``>= min_value``."""

    def __init__(self, init: float = 0.1, min_value: float = 0.01) -> None:
        super().__init__()
        if not init > min_value > 0:
            raise ValueError(f"need init > min_value > 0, got init={init}, min_value={min_value}")
        self.min_value = float(min_value)
        self.log_tau = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(min=self.min_value)


def similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """sim(a_i, b_j) for a (B, N, D), b (B, M, D) -> (B, N, M), dot product (of unit vectors if ``normalize``)."""
    a, b = a.float(), b.float()
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.transpose(-1, -2)


def log_p(z: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Eq. 3 in log form: log p_ij = log softmax_j(sim(z_i, t_j) / tau); (B, N, N)."""
    return F.log_softmax(similarity(z, t, normalize) / tau, dim=-1)


def soft_cross_entropy(labels: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum_ij Y_ij log p_ij, averaged over the batch; labels, logp (B, N, N)."""
    return -(labels * logp).sum(dim=(-1, -2)).div(logp.shape[-2]).mean()


def info_nce(z: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Eq. 2: Y = identity."""
    lp = log_p(z, t, tau, normalize)
    eye = torch.eye(lp.shape[-1], device=lp.device, dtype=lp.dtype).expand_as(lp)
    return soft_cross_entropy(eye, lp)


def affinity(t: torch.Tensor, tau_tilde: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Eq. 4: A_ij = softmax_j(sim(t_i, t_j) / tau~); t (B, N, D) -> (B, N, N), rows sum to 1."""
    return torch.softmax(similarity(t, t, normalize) / tau_tilde, dim=-1)


def affinity_loss(
    z: torch.Tensor, t: torch.Tensor, tau: torch.Tensor, tau_tilde: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Eq. 5: eq. 2 with Y replaced by A (gradients reach tau~ through A)."""
    return soft_cross_entropy(affinity(t, tau_tilde, normalize), log_p(z, t, tau, normalize))


def align_loss(
    z: torch.Tensor,
    t: torch.Tensor,
    tau: torch.Tensor,
    tau_tilde: torch.Tensor,
    lambda_affinity: float = 0.4,
    normalize: bool = False,
) -> dict[str, torch.Tensor]:
    """Eq. 6: L_align = L_InfoNCE + lambda_affinity * L_affinity. Returns all three terms."""
    lp = log_p(z, t, tau, normalize)
    eye = torch.eye(lp.shape[-1], device=lp.device, dtype=lp.dtype).expand_as(lp)
    l_nce = soft_cross_entropy(eye, lp)
    l_aff = soft_cross_entropy(affinity(t, tau_tilde, normalize), lp)
    return {"info_nce": l_nce, "affinity": l_aff, "align": l_nce + lambda_affinity * l_aff}


def token_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 as a per-element mean (see module docstring); any equal shapes."""
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).mean()


def mim_loss(
    pred_real: torch.Tensor | None, tgt_real: torch.Tensor | None, pred_sim: torch.Tensor, tgt_sim: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Eq. 8: L_MIM = MSE(real masked tokens) + MSE(simulated masked tokens); the real term is absent without a
    real-image stream. Inputs (B, M, D)."""
    out = {"mim_sim": token_mse(pred_sim, tgt_sim)}
    if pred_real is not None and tgt_real is not None:
        out["mim_real"] = token_mse(pred_real, tgt_real)
        out["mim"] = out["mim_sim"] + out["mim_real"]
    else:
        out["mim"] = out["mim_sim"] + 0.0
    return out


def cls_loss(logits_real: torch.Tensor, logits_sim: torch.Tensor) -> torch.Tensor:
    """Eq. 9: -(1/N) sum [log f_c(z_real) + log(1 - f_c(z_sim))], f_c = sigmoid(logit); each domain averaged."""
    lr, ls = logits_real.float(), logits_sim.float()
    return F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)) + F.binary_cross_entropy_with_logits(
        ls, torch.zeros_like(ls)
    )


def domain_loss(z_patch: torch.Tensor, t_patch: torch.Tensor, logits_z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 10: ||z^patch - t^patch||^2 - (1/N) sum log f_c(z^patch). ``logits_z`` must come from an f_c whose
    parameters are detached (the stop-gradient of the paper); returns the structure term, the adversarial term and
    their sum."""
    structure = token_mse(z_patch, t_patch)
    adversarial = -F.logsigmoid(logits_z.float()).mean()
    return {"domain_struct": structure, "domain_adv": adversarial, "domain": structure + adversarial}
