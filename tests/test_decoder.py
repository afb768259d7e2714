"""The VQ-GAN decoder head of the 3-D loop (training/decoder.py, ``xwin train-decoder``): it learns to render the
stored views from the frozen world model's latents, uses many codes, and its checkpoint round-trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_fixtures import tiny_checkpoint

from xwin.training.decoder import (
    PatchDiscriminator,
    VQDecoder,
    WorldModel,
    codebook_usage,
    decoder_config,
    hinge_d_loss,
    load_decoder,
    train_decoder,
)


@pytest.fixture(scope="module")
def world_ckpt(tmp_path_factory, rendered_dataset):
    return tiny_checkpoint(tmp_path_factory.mktemp("world"), rendered_dataset.url, steps=20)


def test_networks_shapes_and_losses():
    cfg = decoder_config("tiny")
    dec = VQDecoder(embed_dim=64, grid=4, patch_size=16, cfg=cfg)
    img, idx, commit = dec(torch.randn(3, 16, 64))
    assert img.shape == (3, 1, 64, 64) and idx.shape == (3, 16) and commit.ndim == 0
    assert idx.min() >= 0 and idx.max() < cfg.codebook_size
    d = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
    assert d(img).shape[:2] == (3, 1) and d(img).shape[-1] > 1  # one logit per patch
    # hinge: 0 when real logits >= 1 and fake <= -1; each side's violation counts half
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -3.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(1.0)
    assert codebook_usage(torch.tensor([[0, 0, 5], [5, 7, 7]]), 16) == pytest.approx(3 / 16)
    with pytest.raises(ValueError, match="channels"):
        VQDecoder(64, 4, 16, decoder_config("tiny", ["channels=[8, 8]"]))
    with pytest.raises(ValueError, match="power of 2"):
        VQDecoder(64, 4, 12, cfg)
    with pytest.raises(ValueError, match="unknown decoder preset"):
        decoder_config("huge")
    base = decoder_config("base")
    assert (base.codebook_size, base.codebook_dim) == (1024, 256)  # the paper's best codebook (Table 5)


def test_decoder_learns_the_views_and_uses_many_codes(tmp_path, world_ckpt, rendered_dataset):
    """The tiny preset (300 steps, adversarial term from step 200) on the stored views of one small CT: the L1 error
    on fixed held batches falls several fold (measured 0.372 -> 0.062 in units of the largest stored value, 6x) and
    the codes used number far more than one (measured 166 of 256 on those batches)."""
    cfg = decoder_config("tiny")
    s = train_decoder(world_ckpt, f"{rendered_dataset.url}#small", cfg, tmp_path / "dec")
    before, after = s["eval"]["before"]["rec_l1"], s["eval"]["after"]["rec_l1"]
    assert after <= before / 4, (before, after)
    assert s["codebook_usage"] * cfg.codebook_size > 16, s["codebook_usage"]
    assert s["steps"] == 300 and s["value_scale"] > 0
    last = s["last"]
    for k in ("rec_l1", "commit", "g_adv", "d_loss", "adaptive_weight", "rec_l1_predicted", "rec_l1_target"):
        assert math.isfinite(last[k]), (k, last)
    assert "d_loss" not in s["first"]  # the discriminator joins at disc_start
    logs = [json.loads(x) for x in (tmp_path / "dec" / "log.jsonl").read_text().splitlines()]
    assert logs[0]["event"] == "start" and logs[-1]["event"] == "evaluation"
    # the checkpoint reproduces the trained decoder
    world = WorldModel(world_ckpt)
    dec, scale, meta = load_decoder(s["checkpoint"], world)
    assert scale == s["value_scale"] and meta["step"] == 300
    tokens = torch.randn(2, 16, 64)
    with torch.no_grad():
        sd = torch.load(s["checkpoint"], weights_only=False)
        fresh = VQDecoder(64, 4, 16, cfg)
        fresh.load_state_dict(sd["decoder"])
        fresh.eval()
        torch.testing.assert_close(dec(tokens)[0], fresh(tokens)[0])


def test_cli_train_decoder(tmp_path, world_ckpt, rendered_dataset):
    from typer.testing import CliRunner

    from xwin.flows.cli import app

    url = f"{rendered_dataset.url}#small"
    args = ["train-decoder", "--checkpoint", str(world_ckpt), "--store", url, "--preset", "tiny"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d"), "--max-steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["steps"] == 3 and s["split"] is None and s["codebook"] == [256, 32]
    assert 0 < s["codebook_usage"] <= 1 and s["quantizer"].startswith("vector-quantize-pytorch")
    assert (tmp_path / "d" / "checkpoints" / "decoder_latest.pt").exists()
    # bad input: one line, exit 2
    for bad, why in (
        (["--checkpoint", str(tmp_path / "nope.pt")], "no such file"),
        (["--store", rendered_dataset.url + "#nocohort"], "no dataset with cohort 'nocohort'"),
        (["--store", str(tmp_path / "nostore") + "#small"], "nostore"),
        (["--preset", "huge"], "unknown decoder preset"),
        (["--set", "codebook_size=1"], "codebook_size"),
    ):
        argv = list(args)
        for i in range(0, len(bad), 2):
            if bad[i] in argv:
                argv[argv.index(bad[i]) + 1] = bad[i + 1]
            else:
                argv += bad[i : i + 2]
        r = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "bad"), "--max-steps", "1"])
        assert r.exit_code == 2 and why in r.output, (bad, r.output)
        assert "Traceback" not in r.output
    # a world checkpoint that is not one
    junk = tmp_path / "junk.pt"
    torch.save({"x": np.zeros(2)}, junk)
    r = CliRunner().invoke(app, [*args[:2], str(junk), *args[3:], "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "not an `xwin train` checkpoint" in r.output


def test_cli_train_decoder_stopped_by_ctrl_c_saves_its_step(tmp_path, world_ckpt, rendered_dataset, monkeypatch):
    """Ctrl-C (SIGINT) during `xwin train-decoder`: the step in progress ends, the decoder of that step is saved and
    evaluated, exit 130 with one line."""
    import os
    import signal

    from typer.testing import CliRunner

    from xwin.flows import stop
    from xwin.flows.cli import app
    from xwin.training import decoder as dec

    real = dec.DecoderTrainer.train_step

    def step_then_signal(self, batch):
        rec = real(self, batch)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return rec

    monkeypatch.setattr(dec.DecoderTrainer, "train_step", step_then_signal)
    args = ["train-decoder", "--checkpoint", str(world_ckpt), "--store", f"{rendered_dataset.url}#small"]
    try:
        res = CliRunner().invoke(app, [*args, "--preset", "tiny", "--out", str(tmp_path / "d"), "--max-steps", "50"])
    finally:
        stop.reset()
    assert res.exit_code == 130, res.output
    assert "decoder trained to step 2:" in res.stdout
    assert "cancelled: stopped at step 2; the decoder so far is in" in res.stderr
    ckpt = torch.load(tmp_path / "d" / "checkpoints" / "decoder_latest.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2
    assert "run it again with --resume auto to continue" in res.stderr
    # --resume auto continues that run: after 6 steps in all, the same weights and optimiser state as a run that
    # never stopped (the data position and random states are in the checkpoint)
    monkeypatch.setattr(dec.DecoderTrainer, "train_step", real)
    again = CliRunner().invoke(
        app, [*args, "--preset", "tiny", "--out", str(tmp_path / "d"), "--max-steps", "6", "--resume", "auto", "--json"]
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 6
    whole = CliRunner().invoke(app, [*args, "--preset", "tiny", "--out", str(tmp_path / "w"), "--max-steps", "6"])
    assert whole.exit_code == 0, whole.output

    def final(run: str) -> dict:
        return torch.load(tmp_path / run / "checkpoints" / "decoder_latest.pt", map_location="cpu", weights_only=False)

    a, b = final("d"), final("w")
    assert a["step"] == b["step"] == 6
    for k in a["decoder"]:
        assert torch.equal(a["decoder"][k], b["decoder"][k]), k
    assert a["opt_g"]["state"][0]["step"] == b["opt_g"]["state"][0]["step"] == 6
    log = [json.loads(x) for x in (tmp_path / "d" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "resume"] == [2]
    # a path that is not there, or a checkpoint of another decoder config: one line, exit 2
    bad = CliRunner().invoke(app, [*args, "--preset", "tiny", "--out", str(tmp_path / "x"), "--resume", "nope.pt"])
    assert bad.exit_code == 2 and "--resume nope.pt: no such file" in bad.output
    bad = CliRunner().invoke(
        app,
        [*args, "--preset", "tiny", "--out", str(tmp_path / "d"), "--resume", "auto", "--set", "codebook_size=128"],
    )
    assert bad.exit_code == 2 and "another config: codebook_size 256 (now 128)" in bad.output, bad.output
    assert "Traceback" not in bad.output
