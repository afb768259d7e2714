"""Evaluations of a trained world model: the 3-D loop from predicted views (``xwin eval recon3d``, X-WIN §4.4,
Table 5) and the domain gap between simulated and real features (``xwin eval domain-gap``, Table 4).

recon3d, per volume (docs/reconstruction.md, "3-D loop from predicted views"):
  1. context = the frontal view (yaw 0) of the stored ring, in the training look, at the model resolution S;
  2. the predictor's latent views z = g_v(f_theta(context), a) for every offset a = k * (the ring's step) within
     +-``data.max_abs_deg`` of the checkpoint (+-90 deg: 61 views at 3 deg), a = 0 included;
  3. decoded by the VQ decoder (``xwin train-decoder``) into line integrals (mu*mm), resized back to the detector;
  4. FDK (``xwin.pipeline.reconstruct.validate_volume``: Parker short-scan weights, the default grid and the
     protocol of docs/reconstruction.md) against the source CT.
  Projection metrics: PSNR / SSIM of each predicted view against the stored view at the detector's resolution, the
  peak (and SSIM's data range) being the stored view's own range (so the figures equal those of both views
  min-max normalised by the stored view's min and max), averaged over the arc's views.
  Reference rows, computed the same way: ``oracle`` = FDK of the stored views of the same arc (the upper bound);
  ``autoencode`` = FDK of the decoded EMA-encoder tokens of the stored views (the decoder's own error).
  Codebook usage: distinct codes of the volume's predicted views / codebook size (the paper: used codes at
  inference time); ``codebook_usage_all`` counts the union over all volumes.

domain-gap: the centre (mean) of the pooled encoder features (mean over tokens, the probe's features) of held-out
DRRs and of held-out real radiographs; cosine similarity and L2 distance between the two centres (and between each
volume's own centre and the real centre, ``per_volume``, for paired comparisons). The DRRs are the
stored views in the checkpoint's training appearance, or, with a look (docs/appearance.md), the radiographs that look
makes from the ring's material bases, given to the model as the training stream gives its domain actions (the look's
output, resized to the model's input).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xwin.training.decoder import VQDecoder, WorldModel, codebook_usage, load_decoder, resolve_device

log = logging.getLogger("xwin.eval3d")

MEAN_KEYS = (
    "projection_psnr_db",
    "projection_ssim",
    "volume_psnr_db",
    "volume_ssim",
    "codebook_usage",
    "oracle_volume_psnr_db",
    "oracle_volume_ssim",
    "autoencode_volume_psnr_db",
    "autoencode_volume_ssim",
    "autoencode_projection_psnr_db",
    "autoencode_projection_ssim",
)


# --------------------------------------------------------------------------------------------------- the arc
@dataclass(frozen=True)
class Arc:
    """The views of one evaluation: offsets (n,) degrees from the context, their ring indices, the context's."""

    offsets_deg: np.ndarray
    indices: np.ndarray
    context_index: int
    step_deg: float
    context_yaw_deg: float = 0.0

    def to_dict(self) -> dict:
        return {
            "context_yaw_deg": self.context_yaw_deg,
            "offsets_deg": [float(self.offsets_deg[0]), float(self.offsets_deg[-1])],
            "step_deg": self.step_deg,
            "n_views": len(self.offsets_deg),
        }


def arc_for(spec: Any, max_abs_deg: float, context_yaw: float = 0.0) -> Arc:
    """Offsets k * ``spec.yaw_step_deg`` within +-``max_abs_deg`` around ``context_yaw``, as ring indices."""
    step = float(spec.yaw_step_deg)
    K = math.floor(max_abs_deg / step + 1e-9)
    offsets = np.arange(-K, K + 1, dtype=np.float64) * step
    idx = []
    for o in offsets:
        try:
            idx.append(spec.view_index(context_yaw + o))
        except KeyError:
            raise ValueError(
                f"the ring has no view at yaw {context_yaw + o:g} deg: recon3d needs every view within "
                f"+-{max_abs_deg:g} deg of the frontal view (yaws {spec.yaws_deg[0]:g}..{spec.yaws_deg[-1]:g} "
                f"step {step:g})"
            ) from None
    return Arc(offsets, np.asarray(idx, dtype=np.int64), spec.view_index(context_yaw), step, float(context_yaw))


# ------------------------------------------------------------------------------------------------- metrics
def projection_metrics(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over views of ``pred`` vs ``ref`` (n, H, W); each view's peak and SSIM data range
    are the reference view's range (max - min)."""
    from skimage.metrics import structural_similarity

    ps, ss = [], []
    for p, r in zip(np.asarray(pred, np.float64), np.asarray(ref, np.float64)):
        rng = float(r.max() - r.min())
        mse = float(np.mean((p - r) ** 2))
        ps.append(float("inf") if mse == 0 else 10.0 * math.log10(rng**2 / mse))
        ss.append(float(structural_similarity(r, p, data_range=rng)))
    return float(np.mean(ps)), float(np.mean(ss))


# ------------------------------------------------------------------------------------------------ rendering
class ViewRenderer:
    """Stored views <-> the model: the context in the training look at S, latents decoded back to mu*mm at the
    detector's (H, W)."""

    def __init__(self, world: WorldModel, decoder: VQDecoder, value_scale: float, chunk: int = 16) -> None:
        self.world, self.decoder, self.value_scale, self.chunk = world, decoder, float(value_scale), int(chunk)

    def to_model(self, raw: np.ndarray) -> torch.Tensor:
        """(n, H, W) stored views -> (n, 1, S, S) in the training look (the loader's own transform)."""
        from xwin.training.data.transforms import appearance_into

        S = self.world.image_size
        out = torch.empty((len(raw), 1, S, S), dtype=torch.float32)
        appearance_into(np.asarray(raw), self.world.cfg.data.appearance, out)
        return out.to(self.world.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, hw: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
        """(n, L, D) -> ((n, H, W) float32 mu*mm, codes (n, L))."""
        import torch.nn.functional as F

        imgs, codes = [], []
        for i in range(0, latents.shape[0], self.chunk):
            img, idx, _ = self.decoder(latents[i : i + self.chunk].float())
            if tuple(img.shape[-2:]) != hw:
                img = F.interpolate(img, size=hw, mode="bilinear", align_corners=False)
            imgs.append((img[:, 0] * self.value_scale).float().cpu())
            codes.append(idx.cpu())
        return torch.cat(imgs).numpy().astype(np.float32), torch.cat(codes)

    @torch.no_grad()
    def predicted(self, context_raw: np.ndarray, offsets_deg: np.ndarray, hw: tuple[int, int]):
        ctx = self.to_model(context_raw[None])
        acts = torch.as_tensor(offsets_deg, dtype=torch.float32, device=ctx.device)
        z = torch.cat(
            [self.world.predict(ctx, acts[i : i + self.chunk][None])[0] for i in range(0, len(acts), self.chunk)]
        )
        return self.decode(z, hw)

    @torch.no_grad()
    def autoencoded(self, views_raw: np.ndarray, hw: tuple[int, int]):
        imgs = self.to_model(views_raw)
        t = torch.cat([self.world.targets(imgs[i : i + self.chunk]) for i in range(0, len(imgs), self.chunk)])
        return self.decode(t, hw)


# ---------------------------------------------------------------------------------------------------- recon3d
def _open(dataset_url: str, split: str | None):
    from xwin.storage import open_store
    from xwin.training.data import StoreSource

    src = StoreSource.parse(dataset_url)
    store = open_store(src.url, create=False)
    ds = StoreSource(src.url, src.cohort, src.spec, split=split).open()
    return store, ds


def eval_split(dataset_url: str, split: str | None, volumes: list[str] | None) -> str | None:
    """The split to read: ``split`` if given; else "test" when the cohort has a split assignment; else None, which
    needs an explicit ``volumes`` list (never an evaluation on training volumes by default)."""
    from xwin.storage import open_store
    from xwin.training.data import StoreSource

    if split is not None:
        return split
    src = StoreSource.parse(dataset_url)
    if open_store(src.url, create=False).read_splits(src.cohort) is not None:
        return "test"
    if not volumes:
        raise ValueError(
            f"cohort {src.cohort!r} has no split assignment, so there is no held-out test split: pass --volumes "
            f"ID,... (or run `xwin splits assign --store {src.url} --cohort {src.cohort}`)"
        )
    return None


def _volumes(ds: Any, volumes: list[str] | None, limit: int | None) -> list[str]:
    ids = list(volumes) if volumes else list(ds.volume_ids())
    if not ids:
        raise ValueError("no volumes to evaluate (the split is empty)")
    return ids[:limit] if limit else ids


def evaluate_volume(
    store: Any, ds: Any, volume_id: str, renderer: ViewRenderer, arc: Arc, backend: str, out_dir: Path | None
) -> tuple[dict, torch.Tensor]:
    """One row of ``xwin eval recon3d`` (see the module docstring) and the volume's codes."""
    from xwin.pipeline.geometry import ConeBeamViews
    from xwin.pipeline.reconstruct import validate_volume

    try:
        record, hu = store.read_volume(volume_id)
    except KeyError as e:
        raise ValueError(f"volume {volume_id!r}: the store holds no source CT for it ({e})") from None
    geometry = ConeBeamViews.from_view_meta(ds.read_geometry(volume_id)).subset(arc.indices)
    want = np.concatenate([[arc.context_index], arc.indices])
    views, _ = ds.read_views(volume_id, want)
    views = np.asarray(views, dtype=np.float32)
    context, gt = views[0], views[1:]
    hw = (gt.shape[1], gt.shape[2])
    affine = np.asarray(record.affine, dtype=np.float64)
    mu_water = ds.spec.mu_water_per_mm

    pred, codes = renderer.predicted(context, arc.offsets_deg, hw)
    auto, _ = renderer.autoencoded(gt, hw)
    row: dict[str, Any] = {"volume_id": volume_id}
    row["projection_psnr_db"], row["projection_ssim"] = projection_metrics(pred, gt)
    row["autoencode_projection_psnr_db"], row["autoencode_projection_ssim"] = projection_metrics(auto, gt)
    row["codebook_usage"] = codebook_usage(codes, renderer.decoder.codebook_size)
    results = {}
    for name, proj in (("predicted", pred), ("oracle", gt), ("autoencode", auto)):
        res = validate_volume(proj, geometry, hu, affine, mu_water, backend=backend)
        results[name] = res
        prefix = "" if name == "predicted" else f"{name}_"
        row[f"{prefix}volume_psnr_db"] = float(res.metrics["psnr_db"])
        row[f"{prefix}volume_ssim"] = float(res.metrics["ssim"])
    m = results["oracle"].metrics
    row["fdk"] = {
        "backend": m["backend"],
        "short_scan": m.get("short_scan"),
        "short_scan_incomplete": m.get("short_scan_incomplete"),
        "arc_deg": m["orbit"]["arc_deg"],
        "grid": m["grid"]["shape"],
    }
    if out_dir is not None:
        row["png"] = write_slices(out_dir / f"{volume_id}_slices.png", volume_id, results)
    return row, codes


def run_recon3d(
    checkpoint: str | Path,
    decoder: str | Path,
    dataset_url: str,
    *,
    split: str | None = None,
    volumes: list[str] | None = None,
    limit: int | None = None,
    backend: str = "auto",
    out_dir: str | Path | None = None,
    device: str = "auto",
    arc_deg: float | None = None,
) -> dict:
    """``xwin eval recon3d``: one row per volume and the means (module docstring); writes ``recon3d.json`` and a
    slices PNG per volume under ``out_dir`` when given. ``arc_deg``: the half-arc of the views (default the
    checkpoint's ``data.max_abs_deg``; e.g. 90 evaluates a model trained on +-180 deg on the paper's arc)."""
    split = eval_split(dataset_url, split, volumes)
    world = WorldModel(checkpoint, resolve_device(device))
    dec, scale, meta = load_decoder(decoder, world)
    store, ds = _open(dataset_url, split)
    arc = arc_for(ds.spec, arc_deg if arc_deg is not None else world.cfg.data.max_abs_deg)
    if backend == "auto" and not torch.cuda.is_available():
        backend = "numba"  # no GPU: skip ASTRA's CUDA probe (a subprocess)
    renderer = ViewRenderer(world, dec, scale)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows, all_codes = [], []
    for vid in _volumes(ds, volumes, limit):
        try:
            row, codes = evaluate_volume(store, ds, vid, renderer, arc, backend, out)
        except KeyError as e:  # a volume of another split, or without a committed ring
            raise ValueError(f"volume {vid!r}: {e.args[0] if e.args else e}") from None
        log.info("recon3d %s: %s", vid, {k: row[k] for k in MEAN_KEYS})
        rows.append(row)
        all_codes.append(codes.reshape(-1))
    means = {k: float(np.mean([r[k] for r in rows])) for k in MEAN_KEYS}
    summary = {
        "checkpoint": str(checkpoint),
        "decoder": str(decoder),
        "decoder_step": meta["step"],
        "codebook": [dec.codebook_size, int(meta["config"]["codebook_dim"])],
        "dataset": dataset_url,
        "split": split,
        "backend": rows[0]["fdk"]["backend"],
        "arc": arc.to_dict(),
        "volumes": rows,
        "means": means,
        "codebook_usage_all": codebook_usage(torch.cat(all_codes), dec.codebook_size),
    }
    if out is not None:
        summary["out_dir"] = str(out)
        (out / "recon3d.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal centre slices of an (i, j, k) volume, displayed as pipeline/reconstruct/report.py."""
    nx, ny, nz = vol.shape
    return [np.flipud(vol[:, :, nz // 2].T), np.flipud(vol[:, ny // 2, :].T), np.flipud(vol[nx // 2, :, :].T)]


def write_slices(path: Path, volume_id: str, results: dict) -> str:
    """Rows axial / coronal / sagittal; columns: reference CT (mu), FDK of the stored views (oracle), of the
    decoded true latents (autoencode), of the predicted views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    ref, mask = first.reference, first.mask
    lo, hi = float(ref[mask].min()), float(ref[mask].max())
    sp = first.grid.spacing
    aspects = [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]]
    cols = [("reference", ref, None)]
    cols += [(n, results[n].reconstruction, results[n].metrics) for n in ("oracle", "autoencode", "predicted")]
    fig, axes = plt.subplots(3, len(cols), figsize=(3.2 * len(cols), 9))
    for c, (name, vol, m) in enumerate(cols):
        for r, img in enumerate(_slices(vol)):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspects[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                title = name if m is None else f"{name}\n{m['psnr_db']:.2f} dB / SSIM {m['ssim']:.3f}"
                ax.set_title(title, fontsize=9)
    for r, name in enumerate(("axial", "coronal", "sagittal")):
        axes[r, 0].set_ylabel(name)
    fig.suptitle(f"{volume_id}: FDK from the views of the arc (mu [1/mm], window {lo:.4f}..{hi:.4f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------- domain gap
@torch.no_grad()
def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(n, 1, S, S) -> (n, D): the mean of the encoder's tokens (the linear probe's features)."""
    return torch.cat([encoder(images[i : i + batch]).float().mean(1).cpu() for i in range(0, len(images), batch)])


def gap(sim: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and L2 distance between the centres (means) of two feature sets (n, D), (m, D)."""
    cs, cr = sim.double().mean(0), real.double().mean(0)
    cos = float(torch.dot(cs, cr) / (cs.norm() * cr.norm()).clamp_min(1e-12))
    return {"cosine_similarity": cos, "l2_distance": float((cs - cr).norm())}


def run_domain_gap(
    checkpoint: str | Path,
    dataset_url: str,
    real_root: str | Path,
    *,
    split: str | None = None,
    real_split: str | None = "test",
    volumes: list[str] | None = None,
    limit: int | None = None,
    yaws: tuple[float, ...] | None = None,
    max_real: int | None = None,
    encoder: str = "ema",
    device: str = "auto",
    look: Any = None,
) -> dict:
    """``xwin eval domain-gap`` (paper Table 4): centres of pooled encoder features of held-out DRRs (views at
    ``yaws``, default the checkpoint's context yaws, of each volume) and of real radiographs under ``real_root``
    (``real_split``: only the subjects of that split of the default policy, docs/training-data.md; by default the
    held-out "test" subjects, which needs one folder per subject or a MIMIC-CXR-JPG root; "all" or None: every
    image). ``look`` (an ``xwin.schemas.look.Look``): the DRRs are that look's radiographs of the rings' material
    bases instead of the stored views (the rings need bases: a render spec with ``materials: true``)."""
    from xwin.training.data import RealCXRStream

    if encoder not in ("ema", "online"):
        raise ValueError(f"encoder must be 'ema' or 'online', got {encoder!r}")
    split = eval_split(dataset_url, split, volumes)
    world = WorldModel(checkpoint, resolve_device(device))
    enc = world.ema.encoder if encoder == "ema" else world.model.encoder
    _, ds = _open(dataset_url, split)
    yaws = tuple(world.cfg.data.context_yaws) if yaws is None else tuple(yaws)
    try:
        idx = np.asarray([ds.spec.view_index(y) for y in yaws], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"yaws {list(yaws)}: {e.args[0] if e.args else e}") from None
    renderer = ViewRenderer(world, None, 1.0)  # type: ignore[arg-type]  # only its to_model is used
    sim_feats, ids = [], _volumes(ds, volumes, limit)
    for vid in ids:
        try:
            if look is None:
                views, _ = ds.read_views(vid, idx)
                sim_feats.append(pooled_features(enc, renderer.to_model(np.asarray(views, dtype=np.float32))))
                continue
            bases = ds.read_materials(vid, idx)
        except KeyError as e:
            raise ValueError(f"volume {vid!r}: {e.args[0] if e.args else e}") from None
        sim_feats.append(pooled_features(enc, look_to_model(bases, look, float(ds.spec.pixel_mm), idx, world)))
    root = Path(real_root)
    if not root.is_dir():
        raise FileNotFoundError(f"real radiographs {root}: no such directory")
    if real_split == "all":
        real_split = None
    rs = RealCXRStream(root, image_size=world.image_size, split=real_split, seed=0, batch_size=32, shuffle=False)
    if real_split is not None:
        try:
            rs.keys()
        except ValueError as e:
            raise ValueError(f"{e}; or pass --real-split all to compare every image") from None
    real_feats, n_real = [], 0
    for b in rs:
        imgs = b["image"].to(world.device)
        if max_real is not None:
            imgs = imgs[: max(0, max_real - n_real)]
        if len(imgs):
            real_feats.append(pooled_features(enc, imgs))
            n_real += len(imgs)
        if max_real is not None and n_real >= max_real:
            break
    if not real_feats:
        raise ValueError(
            f"no readable real radiographs under {root}" + (f" in split {real_split!r}" if real_split else "")
        )
    sim, real = torch.cat(sim_feats), torch.cat(real_feats)
    return {
        **gap(sim, real),
        # each volume's own centre against the real centre: paired comparisons (same volumes, other DRRs)
        "per_volume": [{"volume_id": v, **gap(f, real)} for v, f in zip(ids, sim_feats)],
        "n_simulated": len(sim),
        "n_real": len(real),
        "dim": int(sim.shape[1]),
        "encoder": encoder,
        "yaws_deg": list(yaws),
        "volumes": len(ids),
        "split": split,
        "real_split": real_split,
        "real_skipped": dict(rs.skipped),
        "checkpoint": str(checkpoint),
        "look": None if look is None else look.model_dump(),
    }


def look_to_model(bases: np.ndarray, look: Any, pixel_mm: float, idx: np.ndarray, world: WorldModel) -> torch.Tensor:
    """(2, n, H, W) material bases -> (n, 1, S, S): ``look``'s radiographs (each view its own noise stream, named by
    its index in the ring), resized to the model's input as the training stream does with domain actions."""
    from xwin.pipeline.radiograph import radiograph
    from xwin.training.data.transforms import appearance_into

    imgs = radiograph(bases, look, pixel_mm=pixel_mm, view_indices=idx)
    S = world.image_size
    out = torch.empty((len(imgs), 1, S, S), dtype=torch.float32)
    appearance_into(imgs, "none", out)
    return out.to(world.device)
