"""X-WIN networks, multi-block masks and gradient routing (training/models, training/masks.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xwin.training.config import LossConfig, ModelConfig, load_config
from xwin.training.masks import MultiBlockMasker
from xwin.training.models import DomainClassifier, EMAEncoder, MaskPredictor, ViewPredictor, VisionTransformer, XWin
from xwin.training.models.vit import sincos_2d

TINY = load_config(preset="tiny").model


def test_sincos_2d_closed_form():
    D, H, W = 16, 3, 5
    pe = sincos_2d(D, H, W)
    assert pe.shape == (H * W, D)
    r, c, k = 2, 3, 1  # token (row 2, col 3), frequency index 1 of each quarter
    tok = pe[r * W + c]
    w = 1.0 / 10000 ** (k / (D / 4))
    assert tok[k].item() == pytest.approx(math.sin(r * w), abs=1e-6)
    assert tok[D // 4 + k].item() == pytest.approx(math.cos(r * w), abs=1e-6)
    assert tok[D // 2 + k].item() == pytest.approx(math.sin(c * w), abs=1e-6)
    assert tok[3 * D // 4 + k].item() == pytest.approx(math.cos(c * w), abs=1e-6)


def test_vit_shapes_keep_and_fixed_pe():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    assert not any("pos_embed" in n for n, _ in vit.named_parameters())  # fixed, not learned
    x = torch.rand(2, 1, 32, 32)
    full = vit(x)
    assert full.shape == (2, 16, 32)
    keep_all = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(vit(x, keep_all), full)
    keep = torch.tensor([[0, 3, 5], [1, 2, 15]])
    assert vit(x, keep).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="expected 32x32"):
        vit(torch.rand(1, 1, 16, 16))


def test_view_predictor_is_action_conditioned():
    torch.manual_seed(0)
    g = ViewPredictor(grid=4, embed_dim=32, pred_dim=16, depth=1, num_heads=2)
    ctx = torch.randn(2, 16, 32)
    acts = torch.tensor([[-90.0, 0.0, 30.0], [3.0, 3.0, 45.0]])
    z = g(ctx, acts)
    assert z.shape == (2, 3, 16, 32)
    torch.testing.assert_close(z[1, 0], z[1, 1])  # same context + same action -> same prediction
    assert (z[0, 0] - z[0, 2]).abs().max() > 1e-4  # different actions -> different predictions
    with pytest.raises(ValueError):
        g(ctx, acts[:1])


def test_mask_predictor_and_domain_classifier_shapes():
    torch.manual_seed(0)
    gm = MaskPredictor(grid=4, embed_dim=32, pred_dim=16, depth=1, num_heads=2)
    ctx = torch.randn(3, 5, 32)
    keep = torch.arange(5).expand(3, 5)
    masked = torch.arange(10, 14).expand(3, 4)
    assert gm(ctx, keep, masked).shape == (3, 4, 32)
    fc = DomainClassifier(in_dim=32, dim=16, depth=2, num_heads=2)
    tokens = torch.randn(3, 9, 32)
    logits = fc(tokens)
    assert logits.shape == (3,)
    # no PE + global average pooling: the classifier sees a set of tokens (permutation invariant)
    torch.testing.assert_close(fc(tokens[:, torch.randperm(9)]), logits)
    assert len(fc.blocks) == 2


@pytest.mark.parametrize("grid", [4, 8, 32])
def test_multiblock_masks_are_valid(grid):
    m = MultiBlockMasker(grid, min_keep=4 if grid == 4 else 10)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mb = m.sample(rng, 6)
        keep, masked = mb.keep.numpy(), mb.masked.numpy()
        assert keep.shape[0] == masked.shape[0] == 6
        assert keep.shape[1] >= m.min_keep and masked.shape[1] >= 1
        for k, q in zip(keep, masked):
            assert len(set(k) & set(q)) == 0  # context avoids the target blocks
            assert np.all(np.diff(k) > 0) and np.all(np.diff(q) > 0)
            assert k.min() >= 0 and max(k.max(), q.max()) < grid * grid
    a, b = m.sample(np.random.default_rng(5), 3), m.sample(np.random.default_rng(5), 3)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.masked, b.masked)


def test_block_sizes_follow_scale_and_log_uniform_aspect():
    m = MultiBlockMasker(64)
    rng = np.random.default_rng(1)
    hw = np.array([m.block_size(rng, m.pred_scale, m.pred_aspect) for _ in range(4000)], dtype=float)
    area = hw[:, 0] * hw[:, 1] / 64**2
    ar = hw[:, 0] / hw[:, 1]
    assert area.min() > 0.15 * 0.9 and area.max() < 0.2 * 1.1
    assert ar.min() > 0.75 * 0.9 and ar.max() < 1.5 * 1.1
    # log-uniform: log aspect is centred on the middle of [log 0.75, log 1.5] (uniform would centre higher)
    assert np.mean(np.log(ar)) == pytest.approx(0.5 * (math.log(0.75) + math.log(1.5)), abs=0.02)


def test_single_image_mask_is_union_of_four_blocks():
    m = MultiBlockMasker(16, min_keep=10)
    rng = np.random.default_rng(2)
    pred_hw = [m.block_size(rng, m.pred_scale, m.pred_aspect) for _ in range(4)]
    keep, masked = m.sample_one(rng, pred_hw, (16, 16))
    assert len(masked) <= sum(h * w for h, w in pred_hw)
    assert len(masked) >= max(h * w for h, w in pred_hw)
    assert len(keep) + len(masked) == 256  # full-image context block: everything not masked is kept


def test_mask_config_errors():
    with pytest.raises(ValueError, match="min_keep"):
        MultiBlockMasker(4, min_keep=16)
    with pytest.raises(ValueError, match="min_keep"):
        load_config(preset="tiny", overrides=["masks.min_keep=16"])


def _tiny_forward(model: XWin, ema: EMAEncoder, with_real: bool = True):
    torch.manual_seed(3)
    B, N, S = 2, 3, TINY.img_size
    ctx, tgts = torch.rand(B, 1, S, S), torch.rand(B, N, 1, S, S)
    acts = torch.tensor([[-9.0, 3.0, 30.0], [6.0, -3.0, 90.0]])
    masker = MultiBlockMasker(TINY.grid, min_keep=4)
    rng = np.random.default_rng(0)
    t_sim = ema(tgts.flatten(0, 1)).unflatten(0, (B, N))
    real = torch.rand(4, 1, S, S) if with_real else None
    return model(
        ctx,
        acts,
        tgts,
        t_sim,
        masker.sample(rng, B * N),
        real,
        ema(real) if with_real else None,
        masker.sample(rng, 4) if with_real else None,
    )


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else g.abs().sum().item() for g in gs]


def test_gradient_routing():
    torch.manual_seed(0)
    model = XWin(TINY, LossConfig())
    ema = EMAEncoder(model.encoder)
    out = _tiny_forward(model, ema)
    enc = list(model.encoder.parameters())
    fc = list(model.domain.parameters())
    preds = list(model.view_predictor.parameters()) + list(model.mask_predictor.parameters())
    # L_domain does not update f_c, but reaches the encoder and the view predictor
    assert max(_grads(out["domain"], fc)) == 0.0
    assert (
        sum(_grads(out["domain"], enc)) > 0 and sum(_grads(out["domain"], list(model.view_predictor.parameters()))) > 0
    )
    # L_cls trains f_c only: no gradient for the encoder or the predictors
    assert max(_grads(out["cls"], enc + preds)) == 0.0
    assert sum(_grads(out["cls"], fc)) > 0
    # L_align and L_MIM reach the encoder; nothing reaches the EMA encoder
    assert sum(_grads(out["align"], enc)) > 0 and sum(_grads(out["mim"], enc)) > 0
    out["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in ema.parameters())
    assert all(p.grad is not None for p in fc)


def test_total_loss_eq11_and_no_real_stream():
    torch.manual_seed(0)
    lc = LossConfig()
    model = XWin(TINY, lc)
    ema = EMAEncoder(model.encoder)
    out = _tiny_forward(model, ema)
    expect = out["align"] + lc.lambda_mim * out["mim"] + lc.lambda_domain * out["domain"] + lc.lambda_cls * out["cls"]
    assert out["total"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert out["mim"].item() == pytest.approx(out["mim_real"].item() + out["mim_sim"].item(), rel=1e-6)
    sim_only = _tiny_forward(model, ema, with_real=False)
    assert {"cls", "domain", "mim_real"}.isdisjoint(sim_only)
    assert sim_only["total"].item() == pytest.approx((sim_only["align"] + sim_only["mim_sim"]).item(), rel=1e-6)


def test_ema_update_formula():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    ema = EMAEncoder(enc)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))
    ema.update(enc, 0.9)
    for b, e, o in zip(before, ema.parameters(), enc.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * o)
    out = ema(torch.rand(2, 1, 32, 32))
    assert not out.requires_grad
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)  # LayerNorm'd targets


def test_base_config_matches_paper():
    cfg = load_config(preset="base")
    m = cfg.model
    assert (m.img_size, m.patch_size, m.embed_dim, m.depth) == (512, 16, 768, 12)
    assert (m.view_pred_depth, m.view_pred_dim, m.domain_depth) == (3, 384, 2)
    assert ModelConfig.from_arch("vit_large").embed_dim == 1024


# ------------------------------------------------------------------------------------------------ timm encoder
def _timm():
    from xwin.training.models.vit import TimmViT

    return TimmViT


def test_encoder_is_timm_vit_and_matches_timm_forward():
    """Without token dropping the encoder is timm's own forward_features with the sin-cos PE as position embedding."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    assert isinstance(vit, _timm())
    ref = _timm()(img_size=32, patch_size=8, in_chans=1, num_classes=0, global_pool="", embed_dim=32, depth=2,
                  num_heads=4, class_token=False)  # fmt: skip
    ref.load_state_dict(vit.state_dict(), strict=False)  # everything but the learned pos_embed
    with torch.no_grad():
        ref.pos_embed.copy_(sincos_2d(32, 4, 4)[None])
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(vit(x), ref.forward_features(x))
    # token dropping = running only the kept tokens (with their own PE) through the blocks
    keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4], [12, 13, 14, 15]])
    tokens = vit.embed(x)
    manual = vit.norm(vit.blocks(torch.gather(tokens, 1, keep[..., None].expand(-1, -1, 32))))
    torch.testing.assert_close(vit(x, keep), manual)
    # the dropped tokens change nothing: perturbing the image where no kept token looks leaves the output alone
    x2 = x.clone()
    x2[0, :, :8, 8:16] += 1.0  # patch (0, 1) = token 1, not kept for image 0
    torch.testing.assert_close(vit(x2, keep)[0], vit(x, keep)[0])
    assert (vit(x2)[0] - vit(x)[0]).abs().max() > 1e-4


def test_timm_checkpoint_loads(tmp_path):
    """A state_dict saved from a timm ViT (RGB, class token, learned PE, head) starts the X-WIN encoder."""
    from xwin.training.models.vit import load_timm_weights

    torch.manual_seed(1)
    src = _timm()(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=4)
    rep = load_timm_weights(vit, path)
    assert {"cls_token", "pos_embed", "head.weight", "head.bias"} <= set(rep["ignored"])
    sd = src.state_dict()
    for k, v in vit.state_dict().items():
        if k != "patch_embed.proj.weight":
            torch.testing.assert_close(v, sd[k], msg=k)
    # RGB -> one channel: timm's adapt_input_conv sums the colour kernels
    torch.testing.assert_close(vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    # the loaded encoder computes what the timm model computes on a grey image (R = G = B) with the sin-cos PE
    # and no class token: same patch tokens, same blocks
    ref = _timm()(img_size=32, patch_size=8, in_chans=3, num_classes=0, global_pool="", embed_dim=32, depth=2,
                  num_heads=4, class_token=False)  # fmt: skip
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("cls_token", "head", "pos_embed"))},
                        strict=False)  # fmt: skip
    with torch.no_grad():
        ref.pos_embed.copy_(sincos_2d(32, 4, 4)[None])
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(vit(x), ref.forward_features(x.expand(-1, 3, -1, -1)))
    # safetensors and a {"model": state_dict} wrapper load too
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vit.safetensors"))
    other = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=4)
    load_timm_weights(other, tmp_path / "vit.safetensors")
    torch.testing.assert_close(other(x), vit(x))
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    load_timm_weights(other, tmp_path / "wrapped.pth")
    # another depth or width is refused with the names of what does not fit
    deeper = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=3, num_heads=4)
    with pytest.raises(ValueError, match=r"missing \['blocks\.2"):
        load_timm_weights(deeper, path)
    wider = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="shapes"):
        load_timm_weights(wider, path)


def test_trainer_starts_from_timm_weights(tmp_path):
    from xwin.training.loop import Trainer
    from xwin.training.synthetic import SyntheticRingStream

    t = TINY
    torch.manual_seed(2)
    src = _timm()(img_size=t.img_size, patch_size=t.patch_size, in_chans=1, embed_dim=t.embed_dim, depth=t.depth,
                  num_heads=t.num_heads, num_classes=0)  # fmt: skip
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    cfg = load_config(preset="tiny", overrides=[f"out_dir={tmp_path}", f"init_encoder={tmp_path / 'vit.pth'}"])
    tr = Trainer(cfg, SyntheticRingStream(batch_size=2), None)
    w = src.state_dict()["blocks.1.mlp.fc2.weight"]
    torch.testing.assert_close(tr.model.encoder.blocks[1].mlp.fc2.weight, w)
    torch.testing.assert_close(tr.ema.encoder.blocks[1].mlp.fc2.weight, w)  # the EMA copy starts there too
    tr.close()


def test_checkpoints_of_the_handwritten_blocks_still_load():
    """State dicts with the former parameter names (mlp.0 / mlp.2, patch_embed.weight) load into the timm modules."""
    torch.manual_seed(0)
    model = XWin(TINY, LossConfig())
    sd = model.state_dict()
    old = {}
    for k, v in sd.items():
        k2 = (
            k.replace(".mlp.fc1.", ".mlp.0.")
            .replace(".mlp.fc2.", ".mlp.2.")
            .replace("patch_embed.proj.", "patch_embed.")
        )
        old[k2] = v
    assert "encoder.patch_embed.weight" in old and "view_predictor.blocks.0.mlp.0.weight" in old
    fresh = XWin(TINY, LossConfig())
    fresh.load_state_dict(old)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    ema = EMAEncoder(fresh.encoder)
    ema.load_state_dict({("encoder." + k[len("encoder.") :]): v for k, v in old.items() if k.startswith("encoder.")})
