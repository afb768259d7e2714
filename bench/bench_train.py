"""Training step throughput (CPU, tiny preset) vs a named baseline, and the ViT-B/16 @ 512^2 compute budget.

Measured in one run on the same batch:
  xwin_step      one full X-WIN optimisation step (EMA targets, view predictor, MIM on simulated + real images,
                 domain classifier, AdamW, EMA update) -- the tiny preset with a real-image stream;
  encoder_only   baseline: the same encoder, forward + backward + AdamW on as many full images as the X-WIN step
                 feeds its encoders (B*(1+N) + R), no predictors, no masks.
Then the analytic FLOP count of one step of the paper's configuration (ViT-B/16, 512^2, B=12, N=8, R=96) and the
H100 time that implies. Usage: python bench/bench_train.py [--steps 30] [--json]
Every step's seconds and the FLOP breakdown go to bench/results/train-<date>.json (bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)
import torch

from xwin.training.config import load_config
from xwin.training.data.bench import block_flops, xwin_step_flops  # noqa: F401  (block_flops re-exported)
from xwin.training.loop import Trainer
from xwin.training.masks import MultiBlockMasker
from xwin.training.synthetic import SyntheticRealStream, SyntheticRingStream


def time_it(fn, steps: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def bench_cpu(steps: int) -> dict:
    cfg = load_config(preset="tiny", overrides=["out_dir=/tmp/xwin_bench", "log_every=100000", "ckpt_every=0"])
    torch.set_num_threads(cfg.threads or 1)
    d = cfg.data
    sim = SyntheticRingStream(batch_size=d.batch_size, n_targets=d.n_targets, image_size=cfg.model.img_size)
    real = SyntheticRealStream(batch_size=d.real_batch_size, image_size=cfg.model.img_size)
    batch, rb = next(iter(sim)), next(iter(real))
    tr = Trainer(cfg, sim, real)
    step_ts = time_it(lambda: tr.train_step(batch, rb), steps)
    n_img = d.batch_size * (1 + d.n_targets) + d.real_batch_size

    enc = tr.model.encoder
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    imgs = torch.cat([batch["context"], batch["targets"].flatten(0, 1), rb])
    assert imgs.shape[0] == n_img

    def baseline():
        opt.zero_grad(set_to_none=True)
        enc(imgs).pow(2).mean().backward()
        opt.step()

    base_ts = time_it(baseline, steps)
    # alternate a second block of each, so a slow spell of the shared machine hits both
    step_ts += time_it(lambda: tr.train_step(batch, rb), steps, warmup=0)
    base_ts += time_it(baseline, steps, warmup=0)
    t_step, t_base = float(np.median(step_ts)), float(np.median(base_ts))
    return {
        "xwin_step_s_all": step_ts,
        "encoder_only_s_all": base_ts,
        "images_per_step": n_img,
        "xwin_step_s": t_step,
        "encoder_only_s": t_base,
        "xwin_steps_per_s": 1 / t_step,
        "xwin_images_per_s": n_img / t_step,
        "encoder_only_steps_per_s": 1 / t_base,
        "ratio_xwin_over_baseline_time": t_step / t_base,
        "threads": torch.get_num_threads(),
    }


# one definition of the step's FLOPs, shared with the consumer's H100 need (xwin.training.data.bench.vit_b16_need)
base_step_flops = xwin_step_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("train", args)
    cpu = bench_cpu(args.steps)

    base = load_config(preset="base")
    mk = MultiBlockMasker(base.model.grid, **base.masks.model_dump())
    rng = np.random.default_rng(0)
    ks, ms = zip(*[(mb.keep.shape[1], mb.masked.shape[1]) for mb in (mk.sample(rng, 96) for _ in range(20))])
    fl = base_step_flops(base, float(np.mean(ks)), float(np.mean(ms)))
    h100_bf16_dense = 989e12  # FLOP/s, H100 SXM bf16 dense peak
    total_steps = base.optim.total_steps
    out = {
        "cpu_tiny": cpu,
        "base_step": dict(fl.items()),
        "mask_tokens_mean": {"keep": float(np.mean(ks)), "masked": float(np.mean(ms))},
    }
    for mfu in (0.3, 0.45):
        s = fl["total"] / (h100_bf16_dense * mfu)
        out[f"h100_mfu{int(mfu * 100)}"] = {
            "step_s": s,
            "images_per_s": fl["images_per_step"] / s,
            "run_gpu_hours_one_gpu": total_steps * s / 3600,
        }
    rec.save(samples=out)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"CPU tiny preset ({cpu['threads']} thread(s)), {cpu['images_per_step']} images/step:")
    print(f"  xwin_step     {cpu['xwin_steps_per_s']:.2f} steps/s  ({cpu['xwin_images_per_s']:.0f} images/s)")
    print(f"  encoder_only  {cpu['encoder_only_steps_per_s']:.2f} steps/s  (baseline)")
    print(f"  ratio xwin/baseline step time: {cpu['ratio_xwin_over_baseline_time']:.2f}x")
    print(
        f"ViT-B/16 @ 512^2, B=12, N=8, R=96 (mean keep {out['mask_tokens_mean']['keep']:.0f}, "
        f"masked {out['mask_tokens_mean']['masked']:.0f} of 1024 tokens):"
    )
    for k, v in fl.items():
        if k not in ("total", "images_per_step"):
            print(f"  {k:<18s} {v / 1e12:8.1f} TFLOP ({100 * v / fl['total']:.0f}%)")
    print(f"  total              {fl['total'] / 1e12:8.1f} TFLOP per step, {fl['images_per_step']} images")
    for mfu in (30, 45):
        h = out[f"h100_mfu{mfu}"]
        print(
            f"  H100 at {mfu}% MFU: {h['step_s']:.2f} s/step, {h['images_per_s']:.0f} images/s, "
            f"{total_steps} steps = {h['run_gpu_hours_one_gpu']:.0f} GPU-hours"
        )


if __name__ == "__main__":
    main()
