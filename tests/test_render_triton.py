"""The fused Triton renderer (backend "triton"), proven on the CPU with Triton's interpreter (TRITON_INTERPRET=1):
the same values as the numba ``joseph`` projector on rings, oblique grids and odd geometries; its float16/bfloat16
volume storage error; the kernel compiles for the GPUs we target (no GPU needed); the registry and ``auto``; the
batched torch fallback; ``xwin backfill --backend triton`` from the command line.

Sizes stay small: the interpreter runs every kernel step as a numpy operation. The DiffDRR conformance of "triton"
runs with the other backends in tests/test_render.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from xwin.pipeline.geometry import ConeBeamViews, ring_for_volume, rot_z
from xwin.pipeline.render import BACKENDS, available_backends, backends, render_views, resolve_backend
from xwin.schemas import RenderSpec

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def interpret(monkeypatch):
    """Triton's CPU interpreter for this test (the kernel is built for the mode in force when it is first used)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _oblique_affine(spacing, shape, angle_deg=25.0, flip=True):
    axis = np.array([1.0, 1.0, 0.3]) / np.linalg.norm([1.0, 1.0, 0.3])
    th = np.deg2rad(angle_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K
    A = np.eye(4)
    A[:3, :3] = R @ np.diag([-spacing[0] if flip else spacing[0], spacing[1], spacing[2]])
    A[:3, 3] = -A[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + [5.0, -3.0, 2.0]
    return A


def _smooth_random(shape, seed=0):
    """Random positive mu [1/mm] with structure at several scales (no constant regions to hide index errors)."""
    rng = np.random.default_rng(seed)
    v = rng.random(shape)
    for ax in range(3):
        v = v + 0.5 * np.roll(v, 1, axis=ax)
    return (0.01 + 0.03 * v / v.max()).astype(np.float32)


# ---------------------------------------------------------------------------------------------- values = joseph
def test_triton_equals_joseph_on_a_ct_ring(interpret, small_ct_path):
    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj), img.affine
    spec = RenderSpec(height=40, width=48, pixel_mm=12.0, n_views=6, yaw_step_deg=67.0, yaw_start_deg=11.0)
    g = ring_for_volume(spec, A, hu.shape)
    ref = render_views(hu, A, g, backend="joseph")  # the ring fast path
    got = render_views(hu, A, g, backend="triton")
    assert got.shape == ref.shape and got.dtype == np.float32
    for k in range(len(g)):
        assert rel_l2(got[k], ref[k]) < 1e-4, (k, rel_l2(got[k], ref[k]))
    assert np.all(got[ref == 0] == 0) and float(ref.max()) > 1.0


def _odd_views(A, shape) -> ConeBeamViews:
    """Views no ring produces: tilted detectors, a source inside the volume's box, a detector half off the
    volume, rays exactly parallel to voxel planes (direction components of exactly 0)."""
    c = (A @ np.append((np.asarray(shape) - 1) / 2.0, 1.0))[:3]
    rows = []
    # 1: tilted, rotated detector (general path in joseph)
    R = rot_z(30.0) @ np.array([[1, 0, 0], [0, np.cos(0.5), -np.sin(0.5)], [0, np.sin(0.5), np.cos(0.5)]])
    rows.append(np.r_[c + R @ [0, 150, 0], c + R @ [0, -60, 0], R @ [-2.0, 0, 0], R @ [0, 0, -2.5]])
    # 2: source inside the box, short source-detector distance
    rows.append(np.r_[c + np.array([3.0, 4.0, -2.0]), c + np.array([3.0, -70.0, -2.0]), [-3.0, 0, 0], [0, 0, -3.0]])
    # 3: detector and rays shifted so that a part of the image misses the volume
    rows.append(
        np.r_[c + np.array([40.0, 200.0, 10.0]), c + np.array([40.0, -100.0, 10.0]), [-2.5, 0, 0], [0, 0, -2.5]]
    )
    return ConeBeamViews.from_cone_vecs(np.array(rows), 17, 23)


@pytest.mark.parametrize("grid", ["oblique_flipped", "axis_aligned"])
def test_triton_equals_joseph_general_geometry(interpret, grid):
    shape = (24, 20, 14)
    vol = _smooth_random(shape)
    if grid == "oblique_flipped":
        A = _oblique_affine((2.0, 2.5, 3.0), shape)
    else:  # identity rotation: ring rays have direction components of exactly 0 (the slab-parallel branch)
        A = np.diag([2.0, 2.5, 3.0, 1.0])
    views = _odd_views(A, shape)
    ring = ring_for_volume(RenderSpec(height=9, width=31, pixel_mm=3.0, n_views=4, yaw_step_deg=90.0), A, shape)
    for g in (views, ring):
        ref = render_views(vol, A, g, backend="joseph", is_mu=True, method="general")
        got = render_views(vol, A, g, backend="triton", is_mu=True)
        assert rel_l2(got, ref) < 1e-4, (grid, rel_l2(got, ref))
        assert np.abs(got - ref).max() < 1e-4 * float(ref.max())
        assert np.all(got[ref == 0] == 0)
    assert (ref == 0).any() and (ref > 0).mean() > 0.3  # rays that miss and rays that hit


def test_triton_batches_views_in_one_launch_and_small_detectors(interpret, monkeypatch):
    """The whole view set is one kernel launch (``max_views`` splits it, same values); 1-row and 1-column
    detectors work (no integer specialisation of the sizes)."""
    from xwin.pipeline.render import triton_joseph as tj

    shape = (16, 18, 10)
    vol = _smooth_random(shape, seed=1)
    A = np.diag([3.0, 2.5, 4.0, 1.0])
    launches = []
    real = tj.project_device
    monkeypatch.setattr(tj, "project_device", lambda *a, **k: launches.append(a[1].shape[0]) or real(*a, **k))
    g = ring_for_volume(RenderSpec(height=12, width=20, pixel_mm=5.0, n_views=7, yaw_step_deg=51.0), A, shape)
    one = tj.project(vol, A, g, device="cpu")
    assert launches == [7]
    seen: list[tuple[int, int]] = []
    split = tj.project(vol, A, g, device="cpu", max_views=3, on_progress=lambda d, n: seen.append((d, n)))
    assert launches[1:] == [3, 3, 1] and np.array_equal(one, split)
    assert seen == [(3, 7), (6, 7), (7, 7)]
    for h, w in [(1, 20), (12, 1)]:
        gg = ConeBeamViews.from_cone_vecs(g.subset([0, 3]).cone_vecs, h, w)
        ref = render_views(vol, A, gg, backend="joseph", is_mu=True)
        assert rel_l2(tj.project(vol, A, gg, device="cpu"), ref) < 1e-4


def test_half_precision_volume_storage_error(interpret, small_ct_path):
    """float16 / bfloat16 volume storage: the error it costs against the float32 joseph render (the figures in
    docs/benchmarks.md were measured the same way on the full CT)."""
    from xwin.pipeline.render import triton_joseph as tj

    img = nib.load(str(small_ct_path))
    hu, A = np.asarray(img.dataobj), img.affine
    g = ring_for_volume(RenderSpec(height=24, width=24, pixel_mm=20.0, n_views=2, yaw_step_deg=90.0), A, hu.shape)
    ref = render_views(hu, A, g, backend="joseph")
    err = {dt: rel_l2(render_views(hu, A, g, backend="triton", volume_dtype=dt), ref) for dt in tj.VOLUME_DTYPES}
    assert err["float32"] < 1e-5
    assert 1e-6 < err["float16"] < 1e-4  # 11-bit mantissa
    assert err["float16"] < err["bfloat16"] < 1e-3  # 8-bit mantissa
    assert tj.upload_volume(np.zeros((2, 2, 2), np.float32), "cpu", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="volume_dtype"):
        tj.upload_volume(np.zeros((2, 2, 2), np.float32), "cpu", "int8")


@pytest.mark.parametrize("vol_type", ["*fp32", "*fp16", "*bf16"])
def test_kernel_compiles_for_hopper(vol_type):
    """The real Triton compiler (not the lenient interpreter) takes the kernel down to a cubin for sm_90 (H100 /
    H200) on this CPU machine: type errors the interpreter lets through would fail here."""
    from triton.backends.compiler import GPUTarget

    from xwin.pipeline.render._triton_kernel import joseph_kernel

    ints = ["H", "W", "nx", "ny", "nz", "n_tiles_c", "tiles_per_view"]
    sig = {"vol_ptr": vol_type, "P_ptr": "*fp64", "out_ptr": "*fp32", **dict.fromkeys(ints, "i32")}
    sig.update(BLOCK="constexpr", TILE_R="constexpr")
    src = triton.compiler.ASTSource(
        fn=triton.jit(joseph_kernel, do_not_specialize=ints), signature=sig, constexprs={"BLOCK": 128, "TILE_R": 32}
    )
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": True})
    assert len(k.asm["cubin"]) > 1000 and ".entry joseph_kernel" in k.asm["ptx"]


# ---------------------------------------------------------------------------------------------- registry
def test_registry_triton_auto_and_nanodrr_is_nanodrr(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # "nanodrr" used to be an alias of the torch projector; now it is nanodrr's own renderer or nothing
    assert BACKENDS["nanodrr"].module == "xwin.pipeline.render.nanodrr_backend"
    assert all(b.name == n for n, b in BACKENDS.items())  # no aliases
    if not torch.cuda.is_available():
        assert "triton" not in available_backends()
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_backends() and resolve_backend("triton") == "triton"
    assert resolve_backend("auto") == ("triton" if torch.cuda.is_available() else "joseph")  # never the interpreter
    assert backends.backend_versions("triton")["triton_mode"] == "interpreter"
    monkeypatch.setattr(backends, "_cuda", lambda: True)
    assert resolve_backend("auto") == "triton"
    from xwin.pipeline.render import triton_joseph

    monkeypatch.setattr(triton_joseph, "triton_importable", lambda: False)
    assert resolve_backend("auto") == "gpu"  # CUDA without triton: the torch projector


def test_cpu_device_without_interpreter_is_joseph(monkeypatch):
    """``device="cpu"`` without the interpreter (where render_views sends a view set that ran out of CUDA memory)
    renders with joseph: the same values."""
    from xwin.pipeline.render import joseph, triton_joseph

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vol, A = _smooth_random((8, 9, 10)), np.diag([2.0, 2.0, 2.0, 1.0])
    g = ring_for_volume(RenderSpec(height=8, width=9, pixel_mm=4.0, n_views=2), A, vol.shape)
    assert np.array_equal(triton_joseph.project(vol, A, g, device="cpu"), joseph.project(vol, A, g))
    with pytest.raises(ValueError, match="volume_dtype"):
        triton_joseph.project(vol, A, g, device="cpu", volume_dtype="float16")


# ---------------------------------------------------------------------------------------------- nanodrr
def test_nanodrr_backend_renders_our_rays_with_nanodrr(monkeypatch):
    """The "nanodrr" backend really calls nanodrr (its render function; its torch path on the CPU) with its pinhole
    camera mapped from ConeBeamViews: on an oblique flipped grid seen by a tilted detector, a detector half off the
    volume and a ring, it matches joseph within 0.6% (nanodrr's even sampling vs joseph's planes, on a smooth volume
    with an air border: the two models differ only in the outer half voxel), while the same detectors moved by half
    a pixel differ by several percent. (Views with the source inside the volume are left out: joseph counts the
    partial voxel at the source as a whole plane, ~2% on a 25-voxel path; nanodrr does not.)"""
    from scipy.ndimage import gaussian_filter

    nanodrr_drr = pytest.importorskip("nanodrr.drr")
    calls = []
    real = nanodrr_drr.render
    monkeypatch.setattr(nanodrr_drr, "render", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    shape = (24, 20, 14)
    vol = np.zeros(shape, np.float32)
    vol[2:-2, 2:-2, 2:-2] = gaussian_filter(_smooth_random((20, 16, 10), seed=3), 1.0)
    A = _oblique_affine((2.0, 2.5, 3.0), shape)
    ring = ring_for_volume(RenderSpec(height=12, width=16, pixel_mm=6.0, n_views=3, yaw_step_deg=120.0), A, shape)
    for g in (_odd_views(A, shape).subset([0, 2]), ring):
        ref = render_views(vol, A, g, backend="joseph", is_mu=True, method="general")
        got = render_views(vol, A, g, backend="nanodrr", is_mu=True, n_samples=400)
        cv = g.cone_vecs.copy()
        cv[:, 3:6] += 0.5 * cv[:, 6:9]  # every detector moved by half a pixel along u
        moved = render_views(vol, A, ConeBeamViews.from_cone_vecs(cv, g.height, g.width), backend="joseph", is_mu=True)
        assert rel_l2(got, ref) < 0.006 and rel_l2(moved, ref) > 5 * rel_l2(got, ref), (
            rel_l2(got, ref),
            rel_l2(moved, ref),
        )
    assert calls and set(calls) == {"auto"}
    skew = ring.cone_vecs[:1].copy()
    skew[:, 9:] += skew[:, 6:9]  # v no longer orthogonal to u
    bad = ConeBeamViews.from_cone_vecs(skew, 8, 8)
    with pytest.raises(ValueError, match="orthogonal"):
        render_views(vol, A, bad, backend="nanodrr", is_mu=True)


# ---------------------------------------------------------------------------------------------- torch fallback
def test_torch_projector_is_batched_over_views(monkeypatch):
    """The torch projector groups the rays of all views: its grid_sample calls follow the samples (one per axis
    group here), not the number of views (the old per-view loop made >= 1 call per view)."""
    calls = []
    real = torch.nn.functional.grid_sample
    monkeypatch.setattr(torch.nn.functional, "grid_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    shape = (14, 16, 12)
    vol, A = _smooth_random(shape, seed=2), _oblique_affine((2.0, 2.0, 2.5), shape, angle_deg=10.0)
    g = ring_for_volume(RenderSpec(height=10, width=12, pixel_mm=4.0, n_views=12, yaw_step_deg=30.0), A, shape)
    got = render_views(vol, A, g, backend="torch", is_mu=True, device="cpu")
    assert 1 <= len(calls) <= 3
    ref = render_views(vol, A, g, backend="joseph", is_mu=True)
    assert rel_l2(got, ref) < 1e-5
    # batches of 2 views (max_rays) and 100-sample chunks: more calls, the same values
    calls.clear()
    small = render_views(vol, A, g, backend="torch", is_mu=True, device="cpu", max_rays=240, max_samples=100)
    assert len(calls) > 12 and np.allclose(small, got, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- command line
def test_cli_backfill_with_triton_backend(tmp_path, small_ct_path):
    """``xwin backfill ... --backend triton`` in a fresh process under the interpreter: the committed ring equals
    joseph's render of the same volume (as stored, float16) and its provenance names the Triton mode."""
    from xwin.storage import open_store

    spec = RenderSpec(height=16, width=20, pixel_mm=24.0, n_views=4, yaw_step_deg=90.0)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    store = tmp_path / "store"
    env = dict(os.environ, TRITON_INTERPRET="1", XWIN_STAGE_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "xwin.flows.cli", "backfill", "--cohort", "test", "--store", str(store)]
    cmd += ["--source", str(small_ct_path), "--spec", str(spec_file), "--backend", "triton"]
    cmd += ["--no-prefect", "--no-validate", "--verify", "shallow", "--json"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{") :])
    assert len(out["done"]) == 1 and not out["failed"], out
    vid = out["done"][0]["volume_id"]
    ds = open_store(str(store)).dataset("test", spec)
    ring = ds.read_ring(vid)
    from xwin.pipeline.ingest import load_candidate, plan_inputs
    from xwin.pipeline.render import render_ring

    (cand,), _ = plan_inputs([str(small_ct_path)], "test")
    rec, hu = load_candidate(cand)
    want, _ = render_ring(hu, np.asarray(rec.affine), spec, "joseph")
    want = want.astype(spec.store_dtype).astype(np.float32)
    assert np.abs(ring - want).max() <= 2e-3 * float(want.max())  # float16 storage rounding of both
    prov = ds.provenance(vid)
    text = json.dumps(prov)
    assert '"triton_mode": "interpreter"' in text and '"triton"' in text


# ---------------------------------------------------------------------------------------------- the GPU check script
@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """``bench/gpu_check.sh --dry-run``: the GPU check's own code end to end on the CPU (Triton interpreter, toy
    sizes), so that its first run on a lent GPU is not its first run. Every section runs; the figures are real."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_TIMEOUT_S="420")
    env.pop("TRITON_INTERPRET", None)  # the script sets it
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["dry_run"] is True and (tmp_path / "gpu_check.log").stat().st_size > 0
    sections = ["env", "render_16", "render_24", "e2e", "astra", "fdk", "train", "consumer"]
    assert {k: rep[k]["status"] for k in sections} == dict.fromkeys(sections, "ok")
    assert rep["env"]["triton_interpret"] is True and rep["env"]["cuda_available"] is False
    for size in ("render_16", "render_24"):
        b = rep[size]["backends"]
        assert b["triton_float32"]["rel_l2_max"] <= 1e-4 and b["triton_float32"]["conformance_ok"] is True
        assert 1e-6 < b["triton_float16"]["rel_l2_max"] < 1e-3  # half storage: a real, small error
        assert b["torch"]["rel_l2_max"] <= 1e-5
        assert b["diffdrr_siddon"]["rel_l2_max"] < 0.05  # a different model (Siddon) on a coarse toy volume
        if importlib.util.find_spec("nanodrr"):  # nanodrr's torch path through the backend and called directly
            assert b["nanodrr"]["rel_l2_max"] < 0.05 and b["nanodrr_resident"]["rel_l2_max"] < 0.05
        assert all(b[k]["views_per_s"] > 0 for k in ("triton_float32", "triton_end_to_end", "torch"))
    e2e = rep["e2e"]
    assert e2e["backend"] == "triton" and e2e["rings_per_s"] > 0 and e2e["stored_max_abs_diff"] < 0.01
    # the ASTRA export, read back in ASTRA's conventions, holds the ring's rays; ASTRA's GPU projector waits for a GPU
    assert rep["astra"]["cpu_joseph_from_export"]["rel_l2_max"] < 1e-5
    assert rep["astra"]["fp3d_cuda"]["status"] == "skipped"
    assert rep["fdk"]["backends"]["numba"]["psnr_db"] > 10
    assert rep["fdk"]["backends"]["astra"]["status"] == "skipped"  # FDK_CUDA aborts without a GPU
    assert rep["train"]["step_s"] > 0 and rep["train"]["precision"] == "bf16 autocast"
    assert rep["consumer"]["samples_per_s"] > 0 and rep["consumer"]["need_measured_step_samples_per_s"] > 0
