"""X-WIN objectives (training/losses.py) against direct computations on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xwin.training import losses as L

torch.manual_seed(0)


def _zt(B=3, N=5, D=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=torch.float64), torch.randn(
        B, N, D, generator=g, dtype=torch.float64
    )


def _direct_logp(z: np.ndarray, t: np.ndarray, tau: float, normalize: bool) -> np.ndarray:
    """Eq. 3 with explicit loops, float64."""
    if normalize:
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    N = z.shape[0]
    out = np.zeros((N, N))
    for i in range(N):
        den = sum(math.exp(float(z[i] @ t[m]) / tau) for m in range(N))
        for j in range(N):
            out[i, j] = math.log(math.exp(float(z[i] @ t[j]) / tau) / den)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_info_nce_equals_cross_entropy_with_identity_labels(normalize):
    z, t = _zt()
    tau = torch.tensor(0.7)
    got = L.info_nce(z, t, tau, normalize)
    zz, tt = (F.normalize(z, dim=-1), F.normalize(t, dim=-1)) if normalize else (z, t)
    logits = (zz @ tt.transpose(1, 2)).float() / tau  # (B, N, N)
    B, N = logits.shape[:2]
    ref = F.cross_entropy(logits.reshape(B * N, N), torch.arange(N).repeat(B))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_log_p_matches_eq3_loops(normalize):
    z, t = _zt(B=2, N=4, D=3, seed=1)
    lp = L.log_p(z, t, torch.tensor(0.5), normalize)
    for b in range(2):
        ref = _direct_logp(z[b].numpy(), t[b].numpy(), 0.5, normalize)
        np.testing.assert_allclose(lp[b].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_affinity_matrix_eq4():
    _, t = _zt(B=2, N=4, D=6, seed=2)
    tau_t = 0.9
    A = L.affinity(t, torch.tensor(tau_t)).numpy()
    np.testing.assert_allclose(A.sum(-1), 1.0, rtol=1e-6)
    for b in range(2):
        tb = t[b].numpy()
        for i in range(4):
            den = sum(math.exp(float(tb[i] @ tb[m]) / tau_t) for m in range(4))
            for j in range(4):
                assert A[b, i, j] == pytest.approx(math.exp(float(tb[i] @ tb[j]) / tau_t) / den, rel=1e-5)


def test_affinity_loss_eq5_direct():
    z, t = _zt(B=2, N=4, D=5, seed=3)
    tau, tau_t = 0.8, 1.3
    got = L.affinity_loss(z, t, torch.tensor(tau), torch.tensor(tau_t)).item()
    A = L.affinity(t, torch.tensor(tau_t)).double().numpy()
    ref = 0.0
    for b in range(2):
        lp = _direct_logp(z[b].numpy(), t[b].numpy(), tau, False)
        ref += -(A[b] * lp).sum() / 4
    assert got == pytest.approx(ref / 2, rel=1e-5)


def test_affinity_with_identity_affinity_equals_info_nce():
    z, t = _zt(seed=4)
    tau = torch.tensor(0.6)
    lp = L.log_p(z, t, tau)
    eye = torch.eye(lp.shape[-1], dtype=lp.dtype).expand_as(lp)
    assert L.soft_cross_entropy(eye, lp).item() == pytest.approx(L.info_nce(z, t, tau).item(), rel=1e-6)
    # orthogonal, large targets and a small tau~ make A = I numerically: L_affinity -> L_InfoNCE
    B, N = 2, 4
    t_orth = 10.0 * torch.eye(N, 6, dtype=torch.float64).expand(B, N, 6)
    A = L.affinity(t_orth, torch.tensor(0.05))
    assert torch.allclose(A, torch.eye(N, dtype=A.dtype).expand_as(A), atol=1e-12)
    z2 = torch.randn(B, N, 6, dtype=torch.float64)
    a = L.affinity_loss(z2, t_orth, tau, torch.tensor(0.05)).item()
    assert a == pytest.approx(L.info_nce(z2, t_orth, tau).item(), rel=1e-6)


def test_uniform_affinity_bounds_loss_by_log_n():
    """With identical targets A is uniform and p is uniform: L_affinity = L_InfoNCE = log N."""
    B, N, D = 2, 6, 4
    t = torch.randn(1, 1, D).expand(B, N, D)
    z = torch.randn(B, N, D)
    out = L.align_loss(z, t, torch.tensor(0.3), torch.tensor(0.3), lambda_affinity=0.4)
    assert out["info_nce"].item() == pytest.approx(math.log(N), rel=1e-5)
    assert out["affinity"].item() == pytest.approx(math.log(N), rel=1e-5)
    assert out["align"].item() == pytest.approx(1.4 * math.log(N), rel=1e-5)


def test_align_is_info_nce_plus_weighted_affinity():
    z, t = _zt(seed=5)
    tau, tau_t = torch.tensor(0.4), torch.tensor(0.9)
    out = L.align_loss(z, t, tau, tau_t, lambda_affinity=0.4)
    assert out["info_nce"].item() == pytest.approx(L.info_nce(z, t, tau).item(), rel=1e-6)
    assert out["affinity"].item() == pytest.approx(L.affinity_loss(z, t, tau, tau_t).item(), rel=1e-6)
    assert out["align"].item() == pytest.approx(out["info_nce"].item() + 0.4 * out["affinity"].item(), rel=1e-6)


def test_temperatures_are_learnable_and_receive_gradients():
    tau, tau_t = L.LearnableTemperature(0.1), L.LearnableTemperature(0.2)
    assert tau().item() == pytest.approx(0.1, rel=1e-6)
    z, t = _zt(seed=6)
    out = L.align_loss(z.float(), t.float(), tau(), tau_t())
    out["align"].backward()
    assert tau.log_tau.grad is not None and tau.log_tau.grad.abs() > 0
    assert tau_t.log_tau.grad is not None and tau_t.log_tau.grad.abs() > 0  # through A (eq. 4-5)
    with torch.no_grad():
        tau.log_tau.fill_(math.log(1e-5))
    assert tau().item() == pytest.approx(0.01)  # clamped at min_value
    with pytest.raises(ValueError):
        L.LearnableTemperature(0.001, min_value=0.01)


def test_mim_and_token_mse():
    g = torch.Generator().manual_seed(7)
    p, q, r, s = (torch.randn(2, 5, 3, generator=g) for _ in range(4))
    assert L.token_mse(p, q).item() == pytest.approx(((p - q) ** 2).sum().item() / p.numel(), rel=1e-6)
    out = L.mim_loss(p, q, r, s)
    assert out["mim"].item() == pytest.approx(out["mim_real"].item() + out["mim_sim"].item(), rel=1e-6)
    only_sim = L.mim_loss(None, None, r, s)
    assert "mim_real" not in only_sim and only_sim["mim"].item() == pytest.approx(L.token_mse(r, s).item())
    with pytest.raises(ValueError, match="shape mismatch"):
        L.token_mse(p, q[:, :4])


def test_cls_loss_eq9_direct():
    lr = torch.tensor([2.0, -0.5, 0.3])
    ls = torch.tensor([-1.0, 0.7, 0.1])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    ref = -(np.mean(np.log(sig(lr.numpy()))) + np.mean(np.log(1 - sig(ls.numpy()))))
    assert L.cls_loss(lr, ls).item() == pytest.approx(ref, rel=1e-6)


def test_domain_loss_eq10_direct():
    g = torch.Generator().manual_seed(8)
    z, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    logits = torch.tensor([0.5, -2.0, 1.0, 0.0, 3.0, -0.1])
    out = L.domain_loss(z, t, logits)
    struct = ((z - t) ** 2).mean().item()
    adv = -np.mean(np.log(1 / (1 + np.exp(-logits.numpy()))))
    assert out["domain_struct"].item() == pytest.approx(struct, rel=1e-6)
    assert out["domain_adv"].item() == pytest.approx(adv, rel=1e-6)
    assert out["domain"].item() == pytest.approx(struct + adv, rel=1e-6)
