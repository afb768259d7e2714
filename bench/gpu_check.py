"""The GPU check of issue 17, run by ``bench/gpu_check.sh`` (which see for usage): every figure the GPU docs need,
written as JSON to ``OUT/gpu_check.json`` after each section (a run cut short keeps what it measured).

Sections (each: {"status": "ok" | "skipped" | "error", ...}):
  env        torch / triton / CUDA device / versions; what is importable (nanodrr, astra)
  render     views/s at 256^2 and 512^2 (the bundled CT, the default 120-view ring) for ``triton`` (kernel only,
             volume resident on the device, float32 / float16 / bfloat16 storage; and end to end through
             ``render_views``), nanodrr (resident, its fused kernel; and through ``render_views``), the torch
             fallback, DiffDRR's Siddon (chunked), and the numba ``joseph`` reference; each with its relative L2
             against ``joseph`` on the same views
  e2e        the default ring end to end: render_ring + Dataset.write_ring into a local store, rings/s
  astra      ASTRA's GPU forward projector (create_sino3d_gpu) reading only the ASTRA geometry export of that ring
             (``xwin export --what geometry --format astra``): seconds, views/s, relative L2 per view (goal: <= 2%)
  fdk        ASTRA FDK_CUDA against our numba FDK on the same ring: seconds, PSNR/SSIM (protocol of
             docs/reconstruction.md), PSNR difference (goal: within 1 dB; ASTRA <= 1 s)
  train      one X-WIN step of the paper's configuration (ViT-B/16, 512^2, B=12, N=8, R=96) under bf16 autocast:
             seconds, TFLOP/s from the analytic FLOP count, peak memory; the samples/s that step consumes
  consumer   the training stream's samples/s over a 512^2 store (training.data.bench.run_bench) against that need

``--dry-run``: the same code on the CPU at toy sizes (Triton's interpreter, a downsampled CT, 4-8 views of 16-24
px, the "tiny" training preset, ~1-2 min), so the script's first GPU run is not its first run
(tests/test_render_triton.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch


class Skip(Exception):
    """A section (or row) that cannot run here; the reason goes into the JSON."""


def cuda() -> bool:
    return bool(torch.cuda.is_available())


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(float(np.linalg.norm(ref)), 1e-30))


def per_view_l2(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    e = [rel_l2(a[k], ref[k]) for k in range(len(ref))]
    return {"rel_l2_max": max(e), "rel_l2_mean": float(np.mean(e)), "rel_l2_all": rel_l2(a, ref)}


class Run:
    """The JSON report, its time budget and the shared inputs."""

    def __init__(self, out: Path, budget_s: float, dry: bool) -> None:
        self.out, self.budget_s, self.dry, self.t0 = out, budget_s, dry, time.perf_counter()
        self.data: dict[str, Any] = {
            "script": "bench/gpu_check.py",
            "dry_run": dry,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "budget_s": budget_s,
        }
        self.tmp = Path(tempfile.mkdtemp(prefix="xwin-gpu-check-"))
        self.ring_cache: dict[str, Any] = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(path)

    def section(self, name: str, fn: Callable[[], dict], need_s: float) -> None:
        t = time.perf_counter()
        if self.left() < need_s:
            res: dict[str, Any] = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left < {need_s}"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                res = {"status": "ok", **fn()}
            except Skip as e:
                res = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - recorded in the report; the other sections still run
                res = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
        res["section_s"] = round(time.perf_counter() - t, 2)
        self.data[name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res['section_s']} s)", flush=True)
        self.write()

    # ---- inputs ------------------------------------------------------------------------------------------------
    def volume(self) -> tuple[np.ndarray, np.ndarray]:
        """HU (X,Y,Z) int16 and affine: the bundled CT (dry run: block-averaged 8x8x4 to 64x64x33)."""
        if "vol" not in self.ring_cache:
            from xwin.pipeline.example import example_ct_path

            img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
            hu, A = np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
            if self.dry:
                f = (8, 8, 4)
                a = np.maximum(hu.astype(np.float32), -1000.0)
                X, Y, Z = (s - s % k for s, k in zip(a.shape, f))
                a = a[:X, :Y, :Z].reshape(X // f[0], f[0], Y // f[1], f[1], Z // f[2], f[2]).mean(axis=(1, 3, 5))
                A2 = A.copy()
                A2[:3, :3] = A[:3, :3] @ np.diag(f)
                A2[:3, 3] = A[:3, :3] @ ((np.asarray(f) - 1) / 2.0) + A[:3, 3]
                hu, A = np.round(a).astype(np.int16), A2
            self.ring_cache["vol"] = (hu, A)
        return self.ring_cache["vol"]

    def spec(self, size: int | None = None):
        """The default spec (512^2, 120 views) or one of ``size`` px over the same 512 mm (dry run: 8 views)."""
        from xwin.schemas import RenderSpec

        n_views = 8 if self.dry else 120
        size = size or (16 if self.dry else 512)
        return RenderSpec(height=size, width=size, pixel_mm=512.0 / size, n_views=n_views, yaw_step_deg=360 / n_views)


# ---------------------------------------------------------------------------------------------- sections
def section_env(run: Run) -> dict:
    import importlib.util

    from xwin.pipeline.render import available_backends
    from xwin.pipeline.render.triton_joseph import interpreting, triton_importable

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda(),
        "triton_interpret": interpreting(),
        "render_backends": available_backends(),
        "nanodrr_importable": importlib.util.find_spec("nanodrr") is not None,
        "astra_importable": importlib.util.find_spec("astra") is not None,
    }
    if triton_importable():
        import triton

        out["triton"] = triton.__version__
    if cuda():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, device_memory_gb=round(p.total_memory / 2**30, 1), capability=[p.major, p.minor])
    return out


def _time_best(fn: Callable[[], Any], reps: int) -> tuple[Any, float]:
    best, res = float("inf"), None
    for _ in range(max(1, reps)):
        sync()
        t = time.perf_counter()
        res = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return res, best


def section_render(run: Run, size: int) -> dict:
    from xwin.pipeline.geometry import ring_for_volume
    from xwin.pipeline.render import BACKENDS, hu_to_mu, render_views
    from xwin.pipeline.render import triton_joseph as tj

    hu, A = run.volume()
    mu = hu_to_mu(hu)
    spec = run.spec(size)
    ring = ring_for_volume(spec, A, hu.shape)
    V, H, W = len(ring), spec.height, spec.width
    n_conf = min(V, 4 if run.dry else 24)
    conf_idx = np.unique(np.linspace(0, V - 1, n_conf).round().astype(int))
    conf = ring.subset(conf_idx)
    reps = 1 if run.dry else 3
    dev = "cuda" if cuda() else "cpu"
    out: dict[str, Any] = {"detector": [H, W], "views_in_ring": V, "conformance_views": conf_idx.tolist()}

    # the reference: numba joseph on the CPU (warm-up first: numba loads its cached kernels)
    render_views(mu, A, conf.subset([0]), backend="joseph", is_mu=True)
    ref, t = _time_best(lambda: render_views(mu, A, conf, backend="joseph", is_mu=True), 1)
    out["joseph"] = {"device": "cpu", "views": len(conf), "views_per_s": len(conf) / t}

    rows: dict[str, Any] = {}
    if BACKENDS["triton"].available():
        P = tj.ray_table(ring, A, dev)
        for dt in tj.VOLUME_DTYPES:
            if run.dry and dt == "bfloat16":
                rows[f"triton_{dt}"] = {"status": "skipped", "reason": "dry run (numpy has no bfloat16: slow)"}
                continue
            try:
                vol = tj.upload_volume(mu, dev, dt)
                buf = tj.project_device(vol, P, H, W)  # compile (or interpret) once
                _, t = _time_best(lambda vol=vol, buf=buf: tj.project_device(vol, P, H, W, out=buf), reps)
                rows[f"triton_{dt}"] = {
                    "status": "ok",
                    "timing": "one launch for the whole ring, volume resident, kernel only",
                    "views_per_s": V / t,
                    "ms_per_120_views": 1000 * t * 120 / V,
                    **per_view_l2(buf.cpu().numpy()[conf_idx], ref),
                }
                del vol, buf
            except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
                rows[f"triton_{dt}"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        try:
            _, t = _time_best(lambda: render_views(mu, A, ring, backend="triton", is_mu=True), reps)
            rows["triton_end_to_end"] = {
                "status": "ok",
                "timing": "render_views: volume upload + ray table + kernel + download",
                "views_per_s": V / t,
            }
        except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
            rows["triton_end_to_end"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        if rows["triton_float32"]["status"] == "ok":
            rows["triton_float32"]["conformance_ok"] = rows["triton_float32"]["rel_l2_max"] <= 1e-4
    else:
        rows["triton_float32"] = {"status": "skipped", "reason": "triton backend not available here"}

    # nanodrr the same way: volume and cameras resident, one render call for the whole ring (its fused Triton
    # kernel on CUDA), n_samples = 500 (its default; joseph samples one point per voxel plane, ~512 on this CT)
    if BACKENDS["nanodrr"].available():
        from nanodrr.drr import render as nano_render

        from xwin.pipeline.render import nanodrr_backend as nd

        try:
            subj, k_inv, rt_inv, sdd = nd.prepare(mu, A, ring, dev)
            per = V if cuda() else max(1, 2**25 // (500 * H * W))

            def nano_all():
                parts = [
                    nano_render(subj, k_inv[i : i + per], rt_inv[i : i + per], sdd[i : i + per], H, W, 500)
                    for i in range(0, V, per)
                ]
                return torch.cat(parts)[:, 0]

            img = nano_all()  # compile / warm-up
            img, t = _time_best(nano_all, reps)
            rows["nanodrr_resident"] = {
                "status": "ok",
                "timing": "nanodrr.drr.render on the whole ring, volume resident (its fused kernel on CUDA)",
                "n_samples": 500,
                "views_per_s": V / t,
                **per_view_l2(img.float().cpu().numpy()[conf_idx], ref),
            }
            del subj, img
        except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
            rows["nanodrr_resident"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    else:
        rows["nanodrr_resident"] = {"status": "skipped", "reason": "nanodrr not installed"}

    def one(backend: str, idx: np.ndarray, **opts: Any) -> dict:
        if backend not in BACKENDS or not BACKENDS[backend].available():
            return {"status": "skipped", "reason": f"backend {backend!r} not available here"}
        sub = ring.subset(conf_idx[idx])
        render_views(mu, A, sub.subset([0]), backend=backend, is_mu=True, **opts)  # warm-up
        img, t = _time_best(lambda: render_views(mu, A, sub, backend=backend, is_mu=True, **opts), 1)
        row = {"status": "ok", "device": opts.get("device", dev), "views": len(sub), "views_per_s": len(sub) / t}
        return {**row, **per_view_l2(img, ref[idx])}

    all_idx = np.arange(len(conf_idx))
    for name, backend, idx, opts in [
        ("torch", "torch", all_idx, {"device": dev}),
        ("nanodrr", "nanodrr", all_idx, {}),
        ("diffdrr_siddon", "diffdrr", all_idx[: 1 if run.dry else 4], {"device": dev, "chunk_rays": 2**16}),
    ]:
        if run.left() < (20 if run.dry else 60):
            rows[name] = {"status": "skipped", "reason": f"time budget: {run.left():.0f} s left"}
            continue
        try:
            rows[name] = one(backend, idx, **opts)
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            rows[name] = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    out["backends"] = rows
    tri = rows.get("triton_float32", {})
    if tri.get("status") == "ok":
        out["goal_2000_views_per_s"] = bool(tri["views_per_s"] >= 2000) if size >= 512 and not run.dry else None
        nano = rows.get("nanodrr_resident", {})
        ok = nano.get("status") == "ok"
        out["triton_over_nanodrr"] = tri["views_per_s"] / nano["views_per_s"] if ok else None  # both resident
    return out


def section_e2e(run: Run) -> dict:
    from xwin.pipeline.render import render_ring, resolve_backend
    from xwin.storage import open_store

    hu, A = run.volume()
    spec = run.spec()
    backend = resolve_backend("triton" if run.dry else "auto")
    ds = open_store(str(run.tmp / "store")).dataset("gpu-check", spec)
    render_ring(hu, A, spec, backend=backend)  # warm-up (kernel compile)
    n = 2 if run.dry else 3
    t_render = t_commit = 0.0
    views = geom = None
    for i in range(n):
        t = time.perf_counter()
        views, geom = render_ring(hu, A, spec, backend=backend)
        t_render += time.perf_counter() - t
        t = time.perf_counter()
        ds.write_ring(f"gpu-check-{i:03d}", views, geom.view_meta(), {"bench": "gpu_check", "backend": backend})
        t_commit += time.perf_counter() - t
    assert views is not None and geom is not None
    run.ring_cache["ring"] = (views, geom, spec)
    stored = ds.read_ring("gpu-check-000")
    return {
        "backend": backend,
        "spec": {"height": spec.height, "width": spec.width, "n_views": spec.n_views, "store_dtype": spec.store_dtype},
        "rings": n,
        "render_s_per_ring": t_render / n,
        "commit_s_per_ring": t_commit / n,
        "rings_per_s": n / (t_render + t_commit),
        "stored_max_abs_diff": float(np.abs(stored - views).max()),
    }


def section_astra(run: Run) -> dict:
    """ASTRA's forward projector (FP3D_CUDA via ``create_sino3d_gpu``) on the ASTRA export of the e2e ring, reading
    only the exported files: the views it projects against the rendered ones (goal: within 2% per view). Without
    CUDA (the dry run) the export is written and read, ASTRA builds its geometries from it, and the same rays are
    projected on the CPU by ``joseph`` in ASTRA's frame; ASTRA's GPU call is skipped (it aborts without a GPU)."""
    import importlib.util

    from xwin.pipeline.geometry import ConeBeamViews
    from xwin.pipeline.interop import write_astra
    from xwin.pipeline.reconstruct.fdk_astra import cuda_available
    from xwin.pipeline.render import render_views

    if "ring" not in run.ring_cache:
        raise Skip("no ring from the e2e section")
    if importlib.util.find_spec("astra") is None:
        raise Skip("astra not importable")
    import astra

    views, geom, spec = run.ring_cache["ring"]
    hu, A = run.volume()
    out = run.tmp / "astra_export"
    write_astra(out, geom, A, hu, views, {"mu_water_per_mm": spec.mu_water_per_mm})
    # from here on: only what the export holds
    side = json.loads((out / "astra.json").read_text())
    arr = np.load(out / "astra.npz")
    g, vec = side["vol_geom"], arr["vectors"]
    vol_geom = astra.create_vol_geom(
        g["rows"], g["cols"], g["slices"], g["minx"], g["maxx"], g["miny"], g["maxy"], g["minz"], g["maxz"]
    )
    proj_geom = astra.create_proj_geom("cone_vec", side["det_rows"], side["det_cols"], vec)
    ref = arr["projections"].transpose(1, 0, 2)  # (V, H, W)
    mu = (side["mu_water_per_mm"] * np.maximum(0.0, 1.0 + arr["volume_hu"].astype(np.float32) / 1000.0)).astype(
        np.float32
    )
    sx, sy, sz = (
        (g[f"max{a}"] - g[f"min{a}"]) / n for a, n in (("x", g["cols"]), ("y", g["rows"]), ("z", g["slices"]))
    )
    Af = np.diag([sx, sy, sz, 1.0])
    Af[:3, 3] = [g["minx"] + sx / 2, g["miny"] + sy / 2, g["minz"] + sz / 2]
    cpu = render_views(
        mu.transpose(2, 1, 0), Af, ConeBeamViews.from_cone_vecs(vec, side["det_rows"], side["det_cols"]), is_mu=True
    )
    out_d: dict[str, Any] = {
        "views": len(vec),
        "detector": [side["det_rows"], side["det_cols"]],
        "volume": list(mu.shape),
        "voxel_mm": [sx, sy, sz],
        "cpu_joseph_from_export": per_view_l2(cpu, ref),
    }
    if not cuda_available():
        out_d["fp3d_cuda"] = {"status": "skipped", "reason": "no CUDA for ASTRA (FP3D_CUDA aborts without a GPU)"}
        return out_d

    def fp() -> np.ndarray:
        pid, data = astra.create_sino3d_gpu(mu, proj_geom, vol_geom)
        astra.data3d.delete(pid)
        return data

    fp()  # warm-up (context, texture upload paths)
    data, t = _time_best(fp, 3)
    got = np.asarray(data).transpose(1, 0, 2)
    err = per_view_l2(got, ref)
    out_d["fp3d_cuda"] = {
        "status": "ok",
        "seconds": t,
        "views_per_s": len(vec) / t,
        **err,
        "within_2_percent": bool(err["rel_l2_max"] <= 0.02),
    }
    return out_d


def section_fdk(run: Run) -> dict:
    import importlib.util

    from xwin.pipeline.reconstruct import default_grid, reconstruct
    from xwin.pipeline.reconstruct.metrics import reference_mu, score, validation_mask

    if "ring" not in run.ring_cache:
        raise Skip("no ring from the e2e section")
    views, geom, spec = run.ring_cache["ring"]
    hu, A = run.volume()
    grid = default_grid(A, hu.shape)
    ref = reference_mu(hu, A, grid, spec.mu_water_per_mm)
    reconstruct(views[:2], geom.subset([0, len(geom) // 2]), grid, "numba", short_scan=False)  # numba warm-up
    rows: dict[str, Any] = {}
    for backend in ("numba", "astra"):
        if backend == "astra":
            if importlib.util.find_spec("astra") is None:
                rows[backend] = {"status": "skipped", "reason": "astra not importable"}
                continue
            if not cuda():
                rows[backend] = {"status": "skipped", "reason": "no CUDA (ASTRA's FDK_CUDA aborts without a GPU)"}
                continue
        r = reconstruct(views, geom, grid, backend)
        m = score(ref, r.mu, validation_mask(grid, r.orbit))
        rows[backend] = {
            "status": "ok",
            "seconds": r.seconds,
            "psnr_db": m["psnr_db"],
            "ssim": m["ssim"],
            "grid": list(grid.shape),
        }
    out: dict[str, Any] = {"n_views": len(geom), "detector": [spec.height, spec.width], "backends": rows}
    if rows.get("astra", {}).get("status") == "ok":
        d = rows["astra"]["psnr_db"] - rows["numba"]["psnr_db"]
        out.update(
            psnr_astra_minus_numba_db=d,
            psnr_within_1_db=bool(abs(d) <= 1.0),
            astra_within_1_s=bool(rows["astra"]["seconds"] <= 1.0),
            speedup_astra_over_numba=rows["numba"]["seconds"] / rows["astra"]["seconds"],
        )
    return out


def section_train(run: Run) -> dict:
    from xwin.training.config import load_config
    from xwin.training.data.bench import mean_mask_tokens, xwin_step_flops
    from xwin.training.loop import Trainer
    from xwin.training.synthetic import SyntheticRealStream, SyntheticRingStream

    preset = "tiny" if run.dry else "base"
    dev = "cuda" if cuda() else "cpu"
    over = [f"out_dir={run.tmp / 'train'}", "log_every=100000", "ckpt_every=0", f"device={dev}", "precision=bf16"]
    cfg = load_config(preset=preset, overrides=over)
    d = cfg.data
    R = d.real_batch_size or d.batch_size * d.n_targets
    S = cfg.model.img_size
    sim = SyntheticRingStream(batch_size=d.batch_size, n_targets=d.n_targets, image_size=S)
    real = SyntheticRealStream(batch_size=R, image_size=S)
    batch, rb = next(iter(sim)), next(iter(real))
    tr = Trainer(cfg, sim, real)
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    tr.train_step(batch, rb)  # warm-up (allocations, autotuning)
    _, t = _time_best(lambda: tr.train_step(batch, rb), 2 if not run.dry else 1)
    keep, masked = mean_mask_tokens(cfg)
    flops = xwin_step_flops(cfg, keep, masked)["total"]
    out = {
        "preset": preset,
        "device": dev,
        "precision": "bf16 autocast",
        "image_size": S,
        "batch_size": d.batch_size,
        "n_targets": d.n_targets,
        "real_per_step": R,
        "step_s": t,
        "samples_per_s_consumed": d.batch_size / t,
        "drr_views_per_s_consumed": d.batch_size * (1 + d.n_targets) / t,
        "analytic_tflop_per_step": flops / 1e12,
        "achieved_tflop_per_s": flops / t / 1e12,
    }
    if cuda():
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.ring_cache["need"] = out["samples_per_s_consumed"]
    return out


def section_consumer(run: Run) -> dict:
    from xwin.training.data.bench import make_bench_store, run_bench, vit_b16_need

    size = 32 if run.dry else 512
    backend = "joseph" if run.dry else "auto"
    workers = 0 if run.dry else min(8, max(1, (os.cpu_count() or 2) // 2))
    src = make_bench_store(run.tmp / "consumer", n_volumes=2 if run.dry else 8, size=size, backend=backend)
    res = run_bench(
        src,
        workers=(workers,),
        samples=12 if run.dry else 96,
        batch_size=4 if run.dry else 12,
        wds_dir=run.tmp / "wds",
        main_workers=workers,
        fresh_buffers=False,
    )
    measured_need = run.ring_cache.get("need")
    analytic = vit_b16_need()["samples_per_s"]
    sps = res["samples_per_s"]
    return {
        "store": f"{size}^2, 120 views, {res['volumes']} volumes, local disk",
        "workers": workers,
        "samples_per_s": sps,
        "webdataset_baseline_samples_per_s": res["baseline_samples_per_s"],
        "need_measured_step_samples_per_s": measured_need,
        "need_analytic_h100_40pct_samples_per_s": analytic,
        "keeps_up_with_measured_step": (sps / measured_need) if measured_need else None,
        "keeps_up_with_analytic_need": sps / analytic,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, toy sizes (~1-2 min)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip sections past this (default 450; dry 240)")
    ap.add_argument("--sections", default="env,render,e2e,astra,fdk,train,consumer", help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run needs TRITON_INTERPRET=1 in the environment (gpu_check.sh sets it)")
    if not args.dry_run and not cuda():
        ap.error("no CUDA device: run on a GPU, or use --dry-run (CPU, Triton interpreter, toy sizes)")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget_s or (240.0 if args.dry_run else 450.0), args.dry_run)
    want = set(args.sections.split(","))
    sizes = (16, 24) if args.dry_run else (256, 512)
    plan: list[tuple[str, Callable[[], dict], float]] = [("env", lambda: section_env(run), 0)]
    plan += [(f"render_{s}", lambda s=s: section_render(run, s), 20 if args.dry_run else 60) for s in sizes]
    plan += [
        ("e2e", lambda: section_e2e(run), 10 if args.dry_run else 30),
        ("astra", lambda: section_astra(run), 5 if args.dry_run else 20),
        ("fdk", lambda: section_fdk(run), 10 if args.dry_run else 40),
        ("train", lambda: section_train(run), 10 if args.dry_run else 60),
        ("consumer", lambda: section_consumer(run), 10 if args.dry_run else 60),
    ]
    for name, fn, need in plan:
        if name.split("_")[0] in want or name in want:
            run.section(name, fn, need)

    def errors(d: Any, path: str) -> list[str]:  # sections and rows (render backends, FDK backends) that failed
        if not isinstance(d, dict):
            return []
        own = [path] if d.get("status") == "error" else []
        return own + [e for k, v in d.items() for e in errors(v, f"{path}.{k}" if path else k)]

    bad = errors(run.data, "")
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} in {run.data['elapsed_s']} s; errors: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
