"""Validation report: ``metrics.json`` + ``slices.png`` (axial / coronal / sagittal through the grid centre;
reference | reconstruction | difference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial (k), coronal (j), sagittal (i) centre slices of an (i, j, k) volume on a RAS-ordered grid.

    Display: axial = rows run from +j (anterior) at the top, columns with +i to the right; coronal and sagittal
    = +k (superior) at the top, columns +i resp. +j to the right. (Index directions, whatever the grid's affine.)
    """
    nx, ny, nz = vol.shape
    ax = vol[:, :, nz // 2]  # (i, j)
    co = vol[:, ny // 2, :]  # (i, k)
    sa = vol[nx // 2, :, :]  # (j, k)
    return [np.flipud(ax.T), np.flipud(co.T), np.flipud(sa.T)]


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    reference: Float[np.ndarray, "nx ny nz"],
    reconstruction: Float[np.ndarray, "nx ny nz"],
    mask: Bool[np.ndarray, "nx ny nz"] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> dict:
    """Write ``metrics.json`` and ``slices.png`` under ``out_dir``; returns {"json": path, "png": path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "metrics.json"
    jpath.write_text(json.dumps(metrics, indent=1, default=float))
    ref_s, rec_s = _slices(reference), _slices(reconstruction)
    diff_s = [b - a for a, b in zip(ref_s, rec_s)]
    lo = float(np.percentile(reference, 1)) if mask is None else float(reference[mask].min())
    hi = float(np.percentile(reference, 99.9)) if mask is None else float(reference[mask].max())
    dmax = max(1e-9, 0.1 * (hi - lo))
    sp = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
    aspects = [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]]
    fig, axes = plt.subplots(3, 3, figsize=(12, 11))
    names = ["axial", "coronal", "sagittal"]
    for r in range(3):
        for c, (img, kw) in enumerate(
            [
                (ref_s[r], {"cmap": "gray", "vmin": lo, "vmax": hi}),
                (rec_s[r], {"cmap": "gray", "vmin": lo, "vmax": hi}),
                (diff_s[r], {"cmap": "coolwarm", "vmin": -dmax, "vmax": dmax}),
            ]
        ):
            im = axes[r, c].imshow(img, aspect=aspects[r], interpolation="nearest", **kw)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 2 or r == 0:
                fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.02)
        axes[r, 0].set_ylabel(names[r])
    axes[0, 0].set_title("reference mu [1/mm]")
    axes[0, 1].set_title(f"FDK ({metrics.get('backend', '?')})")
    axes[0, 2].set_title("reconstruction - reference")
    fig.suptitle(
        f"{metrics.get('volume_id', '')}  PSNR {metrics.get('psnr_db', float('nan')):.2f} dB  "
        f"SSIM {metrics.get('ssim', float('nan')):.3f}"
    )
    fig.tight_layout()
    ppath = out / "slices.png"
    fig.savefig(ppath, dpi=80)
    plt.close(fig)
    return {"json": str(jpath), "png": str(ppath)}
