"""Real-radiograph stream (``RealCXRStream``) throughput by source format, vs the trainer's need of real images.

Sources, made from ``--images`` DRRs of the bundled CT (joseph, 256² at 2 mm, one ring) so the content is chest-like:
  mimic-jpeg   upsampled to MIMIC-CXR-JPG size (2544 wide x 3056 high) with pixel noise (sigma 4 grey levels),
               8-bit JPEG quality 95 (what MIMIC-CXR-JPG ships);
  png16-512    the same images at 512², 16-bit PNG;
  prepared     ``prepare_real_cxr`` (``xwin prepare-cxr --size 512``) of the mimic-jpeg folder: 8-bit JPEG, 512².
Each source is read by ``RealCXRStream`` (S = 512, batch 16) under ``make_loader`` with 0 and 2 workers, ``--repeats``
rounds interleaving the configurations, timed from the first batch on over ``--samples`` images. The need: the real
images per second one H100 consumes (``vit_b16_need``). Every round goes to bench/results/real-cxr-<date>.json.

    .venv/bin/python bench/bench_real_cxr.py [--images 48] [--samples 192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import record  # bench/record.py (the script's folder is on sys.path)
from PIL import Image

from xwin.pipeline.example import example_ct_path
from xwin.pipeline.render import render_ring
from xwin.schemas.render import RenderSpec
from xwin.training.data import RealCXRStream, make_loader
from xwin.training.data.bench import vit_b16_need
from xwin.training.data.real_prepare import prepare_real_cxr

MIMIC_WH = (2544, 3056)


def make_sources(root: Path, n: int) -> dict[str, Path]:
    spec = RenderSpec(n_views=n, height=256, width=256, pixel_mm=2.0, yaw_step_deg=360.0 / n)
    img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
    views, _ = render_ring(np.asarray(img.dataobj), img.affine, spec, backend="joseph")
    rng = np.random.default_rng(0)
    dirs = {k: root / k for k in ("mimic-jpeg", "png16-512")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for i, v in enumerate(views):
        u = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
        big = np.asarray(Image.fromarray(u.astype(np.float32)).resize(MIMIC_WH, Image.BILINEAR))
        big8 = np.clip(big * 255.0 + rng.normal(0.0, 4.0, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(big8).save(dirs["mimic-jpeg"] / f"p{i:03d}.jpg", quality=95)
        small = np.asarray(Image.fromarray(u.astype(np.float32)).resize((512, 512), Image.BILINEAR))
        Image.fromarray((np.clip(small, 0, 1) * 65535).astype(np.uint16)).save(dirs["png16-512"] / f"p{i:03d}.png")
    t = time.perf_counter()
    prepare_real_cxr(dirs["mimic-jpeg"], root / "prepared", size=512, workers=2)
    dirs["prepared"] = root / "prepared"
    print(f"prepare_real_cxr of {n} MIMIC-size JPEGs (2 workers): {time.perf_counter() - t:.1f} s", flush=True)
    return dirs


def drain(loader, min_images: int) -> tuple[int, float, float]:
    """(images, seconds, start-up seconds): epochs until ``min_images`` after the first batch, timed from it."""
    t0 = time.perf_counter()
    n, first, t1 = 0, True, t0
    while True:
        for b in loader:
            if first:
                t1, first = time.perf_counter(), False
                continue
            n += len(b["path"])
            if n >= min_images:
                return n, time.perf_counter() - t1, t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--samples", type=int, default=192, help="images timed per configuration")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker-counts", default="0,2")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("real-cxr", args)
    workers = [int(x) for x in args.worker_counts.split(",") if x.strip()]
    out: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="xwin-bench-cxr-") as tmp:
        dirs = make_sources(Path(tmp), args.images)
        sizes = {k: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / args.images for k, d in dirs.items()}
        for _ in range(max(1, args.repeats)):
            for name, d in dirs.items():
                for w in workers:
                    loader = make_loader(RealCXRStream(d, image_size=512, batch_size=16, seed=0), num_workers=w)
                    try:
                        n, s, up = drain(loader, args.samples)
                    finally:
                        loader.close()
                    out.setdefault(name, {}).setdefault(str(w), []).append({"images": n, "seconds": s, "startup_s": up})
                    print(f"{name} workers {w}: {n / s:.1f} images/s", flush=True)
    need = vit_b16_need()
    rec.save(
        samples={"measures": out, "bytes_per_image": sizes},
        need_real_images_per_s=need["real_images_per_s"],
        gpu_need=need,
    )


if __name__ == "__main__":
    main()
