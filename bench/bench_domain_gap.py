"""The domain gap between simulated and real chest radiographs in a world model's features (the X-WIN paper's Table 4
metric, ``xwin eval domain-gap``), for plain DRRs and for realistic ones (a look's radiographs of the rings' material
bases, docs/appearance.md), under three encoders.

Real radiographs (``--real-dicom``, default: the folder of the ``pydicom-data`` package, ``pip install
pydicom-data==1.0.0``), each set through ``xwin prepare-cxr``:
  chest             RG1_UNCR: a PA chest computed radiograph (CR, 1955 x 1841, 150 kVp, MONOCHROME1); one image;
  chest-j2k-lossy   RG1_J2KI: the same radiograph, lossy JPEG 2000: how far an encoding alone moves the figure;
  tibia             RG3_UNCR: an AP radiograph of a distal tibia, a control that is not a chest (it should be the
                    farthest from chest DRRs under a trained encoder).
Simulated: ``xwin phantoms`` (``--n`` subjects varied from the bundled chest CT), ``xwin ingest``, ``xwin render``
with ``materials: true`` (128² detector at 4 mm, 120 views at 3 deg), ``xwin splits assign --fractions
train=0.5,test=0.5``; the DRRs are the frontal views (yaw 0, ``--yaws 0``) of the test split's volumes.
Encoders (EMA encoder of ``xwin train --preset tiny``, same ``--steps``, train split only), for each training seed of
``--seeds``:
  random-init   the encoder before any step (the initialisation both trained models of that seed start from);
  plain         trained on the stored views in X-WIN's min-max look;
  looks         trained with domain actions: per sample a look drawn from the default ranges of ``data.looks``
                (70-120 kVp, 2.5-4 mm Al, 10^4-10^6 quanta per pixel, blur 0-0.5 mm, scatter 0-0.4, display output)
                with console processing (unsharp-mask gain 0-1.5, 5-20 mm).
Views: ``plain`` = the stored views in the checkpoint's training appearance (min-max); ``realistic`` = ``xwin eval
domain-gap --look`` with the chest look below (120 kVp, 3 mm Al, 10^6 quanta per 4 mm pixel, 0.3 mm blur, scatter
fraction 0.3, display output); ``processed`` = the same look with the console's unsharp mask (gain 1, 10 mm). The
chest look was fixed before any figure was seen; the processed look was added after a first run of plain and
realistic.
Every (seed, encoder, views, real set) row: ``xwin eval domain-gap ... --json`` in a subprocess: cosine similarity
and L2 distance between the two feature centres, with N of each side, and each test volume's own centre against the
real one (``per_volume``: plain and realistic DRRs of the same volume compared pairwise). Results:
bench/results/domain-gap-<date>.json.

    pip install -e '.[bench]'                                     # pydicom-data
    .venv/bin/python bench/bench_domain_gap.py                    # 24 subjects, 3 seeds x 3000 steps (~30 min)
    .venv/bin/python bench/bench_domain_gap.py --ci --no-record --work /tmp/x --real-dicom DIR  # the plumbing
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import record  # bench/record.py (the script's folder is on sys.path)

REAL_SETS = {"chest": "RG1_UNCR.dcm", "chest-j2k-lossy": "RG1_J2KI.dcm", "tibia": "RG3_UNCR.dcm"}
ENCODERS = ("random-init", "plain", "looks")
VIEWS = ("plain", "realistic", "processed")
CHEST_LOOK = {
    "kvp": 120.0,
    "filtration_mm_al": 3.0,
    "photons_per_pixel": 1e6,
    "blur_mm": 0.3,
    "scatter_fraction": 0.3,
    "seed": 0,
    "output": "display",
}
PROCESSED_LOOK = {**CHEST_LOOK, "enhance_amount": 1.0, "enhance_mm": 10.0}
TRAIN_LOOKS = {"enhance_amount": [0.0, 1.5], "enhance_mm": [5.0, 20.0]}  # the rest: LookRanges' defaults
FULL = {"n": 24, "downsample": "4,4,2", "detector": 128, "pixel_mm": 4.0, "steps": 3000, "seeds": [0, 1, 2]}
CI = {"n": 4, "downsample": "8,8,4", "detector": 32, "pixel_mm": 16.0, "steps": 3, "seeds": [0]}


def xwin_exe() -> str:
    exe = Path(sys.executable).parent / "xwin"
    return str(exe) if exe.exists() else (shutil.which("xwin") or "xwin")


def xwin(*args: str) -> str:
    """One ``xwin`` command in a subprocess; its stdout. A non-zero exit status stops the bench."""
    p = subprocess.run([xwin_exe(), *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"xwin {' '.join(args)} exited with status {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def pydicom_data_dir() -> Path:
    try:
        import data_store  # the pydicom-data package
    except ImportError:
        raise SystemExit("no real radiographs: pip install pydicom-data==1.0.0, or give --real-dicom DIR") from None
    return Path(data_store.__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------------------------------- the data
def check_real(src: Path) -> None:
    """Every real radiograph is there (one line naming the first missing file, before anything is made)."""
    for fname in REAL_SETS.values():
        if not (src / fname).is_file():
            raise SystemExit(f"real radiograph {src / fname}: no such file")


def real_sets(work: Path, src: Path) -> dict[str, dict[str, Any]]:
    """Each real set in its own folder, through ``xwin prepare-cxr`` (256², 8-bit JPEG)."""
    check_real(src)
    out = {}
    for name, fname in REAL_SETS.items():
        f = src / fname
        raw, prepared = work / "real" / name, work / "real-prepared" / name
        raw.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, raw / fname)
        out_text = xwin("prepare-cxr", str(raw), str(prepared), "--size", "256", "--json")
        rep = json.loads(out_text.strip().splitlines()[-1])
        if rep["skipped"]:
            raise SystemExit(f"prepare-cxr skipped {f}: {rep['skip_reasons']}")
        out[name] = {"source": fname, "dir": str(prepared), "images": rep["images"]}
    return out


def build_cohort(work: Path, p: dict, seed: int) -> str:
    """Phantoms -> ingest -> render with material bases -> splits: the store URL."""
    ph, url = work / "phantoms", str(work / "store")
    spec = work / "spec.json"
    spec.write_text(
        json.dumps({"height": p["detector"], "width": p["detector"], "pixel_mm": p["pixel_mm"], "materials": True})
    )
    if not (ph / "truth.csv").exists():
        xwin("phantoms", "--n", str(p["n"]), "--seed", str(seed), "--downsample", p["downsample"], "--out", str(ph))
    xwin("ingest", str(ph / "ct"), "--store", url, "--cohort", "phantoms")
    xwin("render", "--store", url, "--all", "--cohort", "phantoms", "--spec", str(spec))
    xwin("splits", "assign", "--store", url, "--cohort", "phantoms", "--fractions", "train=0.5,test=0.5")
    return url


# ------------------------------------------------------------------------------------------------------ training
def train(work: Path, url: str, name: str, steps: int, seed: int, looks: bool) -> dict[str, Any]:
    """A tiny world model on the train split; with ``looks`` the domain actions of the default ranges. Returns its
    checkpoint and that of its initialisation (step 0)."""
    import torch

    from xwin.training.config import load_config
    from xwin.training.loop import Trainer, build_streams

    torch.set_num_threads(1)
    data: dict[str, Any] = {"store": url, "cohort": "phantoms", "split": "train", "num_workers": 0}
    data["draws_per_volume"] = 4
    if looks:
        data["looks"] = dict(TRAIN_LOOKS)
    values = {
        "data": data,
        "out_dir": str(work / name),
        "seed": seed,
        "log_every": max(1, steps // 10),
        "ckpt_every": 0,
        "optim": {"epochs": 1, "iters_per_epoch": steps, "warmup_steps": max(1, steps // 20)},
    }
    cfg = load_config(preset="tiny", values=values)
    tr = Trainer(cfg, *build_streams(cfg))
    init = tr.save(work / name / "init.pt")
    t0 = time.perf_counter()
    s = tr.run(max_steps=steps)
    wall = time.perf_counter() - t0
    ckpt = tr.save()
    tr.close()
    return {
        "checkpoint": str(ckpt),
        "init": str(init),
        "steps": s["steps"],
        "seconds": wall,
        "first": s.get("first"),
        "last": s.get("last"),
        "looks": looks,
    }


# ---------------------------------------------------------------------------------------------------- evaluation
def gap(ckpt: str, url: str, real_dir: str, look: Path | None) -> dict[str, Any]:
    argv = ["eval", "domain-gap", "--checkpoint", ckpt, "--store", f"{url}#phantoms", "--split", "test"]
    argv += ["--yaws", "0", "--real", real_dir, "--real-split", "all", "--device", "cpu", "--json"]
    if look is not None:
        argv += ["--look", str(look)]
    r = json.loads(xwin(*argv).strip().splitlines()[-1])
    keep = ("cosine_similarity", "l2_distance", "n_simulated", "n_real", "dim", "volumes", "real_skipped", "per_volume")
    return {k: r[k] for k in keep}


def figure(url: str, real: dict[str, dict], looks: list[Path], out: Path) -> str:
    """The first test volume's frontal view, plain (min-max) and in each look, beside the real chest (model inputs
    before resizing): a PNG for docs/appearance.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from xwin.pipeline.radiograph import radiograph
    from xwin.pipeline.render.appearance import minmax
    from xwin.schemas.look import Look
    from xwin.training.data import StoreSource

    src = StoreSource.parse(f"{url}#phantoms")
    ds = StoreSource(src.url, src.cohort, src.spec, split="test").open()
    vid = sorted(ds.volume_ids())[0]
    i = ds.spec.view_index(0.0)
    panels = [(minmax(np.asarray(ds.read_views(vid, [i])[0][0], np.float32)), "phantom, plain (min-max)")]
    for path in looks:
        lk = Look.model_validate_json(path.read_text())
        img = radiograph(ds.read_materials(vid, [i]), lk, pixel_mm=float(ds.spec.pixel_mm), view_indices=[i])[0]
        extra = f", unsharp {lk.enhance_amount:g} x {lk.enhance_mm:g} mm" if lk.enhance_amount else ""
        panels.append((img, f"phantom, {lk.kvp:g} kVp{extra}"))
    chest = np.asarray(Image.open(next(Path(real["chest"]["dir"]).rglob("*.jpg"))), np.float32) / 255.0
    panels.append((chest, "real chest CR (pydicom-data RG1)"))
    fig, ax = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for a, (img, title) in zip(ax, panels):
        a.imshow(img, cmap="gray", vmin=0, vmax=1)
        a.set_title(title, fontsize=9)
        a.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return str(out)


# --------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    p = {**(CI if args.ci else FULL)}
    for k in ("n", "steps"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if args.seeds is not None:
        p["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
    src = Path(args.real_dicom) if args.real_dicom else pydicom_data_dir()
    check_real(src)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rec = record.start(
        "domain-gap",
        args,
        **p,
        real_dicom=str(src),
        chest_look=CHEST_LOOK,
        processed_look=PROCESSED_LOOK,
        train_looks=TRAIN_LOOKS,
    )
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    real = real_sets(work, src)
    url = build_cohort(work, p, 0)
    look, processed = work / "chest-look.json", work / "processed-look.json"
    look.write_text(json.dumps(CHEST_LOOK))
    processed.write_text(json.dumps(PROCESSED_LOOK))
    look_of = {"plain": None, "realistic": look, "processed": processed}
    t["data_s"] = time.perf_counter() - t0
    runs, rows, t["eval_s"] = {}, [], 0.0
    for seed in p["seeds"]:
        for name in ("plain", "looks"):
            runs[f"{name}/{seed}"] = train(work / f"seed{seed}", url, name, p["steps"], seed, looks=(name == "looks"))
        ckpts = {"random-init": runs[f"plain/{seed}"]["init"], "plain": runs[f"plain/{seed}"]["checkpoint"]}
        ckpts["looks"] = runs[f"looks/{seed}"]["checkpoint"]
        t0 = time.perf_counter()
        for enc in ENCODERS:
            for views in VIEWS:
                for rname, rs in real.items():
                    g = gap(ckpts[enc], url, rs["dir"], look_of[views])
                    rows.append({"seed": seed, "encoder": enc, "views": views, "real": rname, **g})
                    print(
                        f"seed {seed} {enc:11s} {views:9s} vs {rname:15s}: cosine {g['cosine_similarity']:.4f}, "
                        f"L2 {g['l2_distance']:.4f} ({g['n_simulated']} DRRs, {g['n_real']} real)",
                        flush=True,
                    )
        t["eval_s"] += time.perf_counter() - t0
    fig = figure(url, real, [look, processed], Path(args.figure)) if args.figure else None
    samples = {
        "real": {k: {kk: vv for kk, vv in v.items() if kk != "dir"} for k, v in real.items()},
        "train": {k: {kk: vv for kk, vv in v.items() if kk not in ("checkpoint", "init")} for k, v in runs.items()},
        "rows": rows,
        "timings": t,
    }
    summary = {
        "n_simulated": rows[0]["n_simulated"],
        "n_real": {k: v["images"] for k, v in real.items()},
        "figure": fig,
    }
    path = rec.save(samples=samples, summary=summary)
    return {"result": str(path) if path else None, "samples": samples, "summary": summary, "params": p}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/xwin-domain-gap", help="folder for the cohort, store, runs")
    ap.add_argument("--real-dicom", default=None, help="folder holding RG1_UNCR.dcm, RG1_J2KI.dcm, RG3_UNCR.dcm")
    ap.add_argument("--seeds", default=None, help="training seeds, comma separated (default 0,1,2)")
    ap.add_argument("--n", type=int, default=None, help="subjects (default 24)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 3000)")
    ap.add_argument("--ci", action="store_true", help="a miniature: 4 subjects, 32² views, 3 steps")
    ap.add_argument("--figure", default=None, help="write the views' figure here (PNG)")
    record.add_args(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
