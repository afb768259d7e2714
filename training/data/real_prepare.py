"""One pass over a real-CXR source that writes a copy at the model resolution, so training decodes small images.

Why: the trainer's default step takes 96 real radiographs next to 12 DRR samples, so one H100 consumes real images
8 times faster than DRR samples (``xwin.training.data.bench.vit_b16_need``). Decoding MIMIC-CXR-JPG originals
(~2500 x 3000) cannot keep up on a few cores even at reduced JPEG scale; a 512² copy can (docs/benchmarks.md,
Real radiographs).

``prepare_real_cxr(src, dst, size)`` reads every image of ``src`` exactly as ``RealCXRStream`` does (same file list,
MIMIC view filter, DICOM LUTs, MONOCHROME1 inversion, centre square crop, antialiased resize, min-max) and writes it
under the same relative path in ``dst``: 8-bit JPEG (quality 95, the MIMIC-CXR-JPG depth) or 16-bit PNG (lossless
for 12/16-bit sources). A MIMIC root's metadata CSV is copied, so ``dst`` is read with the same layout. Images the
stream would skip are skipped with their reason in ``dst/prepare-report.json``; outputs already present are kept
(rerun-safe); each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .real_cxr import BadImage, RealCXRStream, read_radiograph, to_tensor

FORMATS = {"jpeg": ".jpg", "png": ".png"}
REPORT = "prepare-report.json"


def output_key(key: str, fmt: str) -> str:
    """The relative path a source image gets in the prepared copy (same path, the format's suffix)."""
    return str(Path(key).with_suffix(FORMATS[fmt]))


def _prepare_one(src: str, dst: str, size: int, min_size: int, fmt: str) -> str | None:
    """Write one image; returns the skip reason, or None when written."""
    try:
        img = to_tensor(read_radiograph(src, min_side=max(size, min_size)), size, min_size)[0].numpy()
    except BadImage as e:
        return f"{e.reason}: {e.detail}"
    from PIL import Image

    kw: dict[str, Any]
    if fmt == "jpeg":
        pil = Image.fromarray(np.round(img * 255.0).astype(np.uint8))
        kw = {"format": "JPEG", "quality": 95}
    else:
        pil = Image.fromarray(np.round(img * 65535.0).astype(np.uint16))
        kw = {"format": "PNG"}
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    pil.save(tmp, **kw)
    os.replace(tmp, out)
    return None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_chunk(
    jobs: list[tuple[str, str, str]], size: int, min_size: int, fmt: str
) -> list[tuple[str, str | None]]:
    return [(key, _prepare_one(s, d, size, min_size, fmt)) for key, s, d in jobs]


def prepare_real_cxr(
    src: str | Path,
    dst: str | Path,
    *,
    size: int = 512,
    fmt: str = "jpeg",
    workers: int = 2,
    views: Sequence[str] = ("AP", "PA"),
    min_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """Prepare ``src`` (a directory of radiographs or a MIMIC-CXR-JPG root) into ``dst`` at ``size``². Returns the
    report (also written to ``dst/prepare-report.json``): counts of written / kept / skipped and each skip's reason."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {sorted(FORMATS)}")
    src, dst = Path(src), Path(dst)
    stream = RealCXRStream(src, image_size=size, views=views, min_size=min_size)
    keys = stream.keys()
    if stream.mimic_csv is not None:
        if fmt != "jpeg":
            raise ValueError("a MIMIC-CXR-JPG root names its images .jpg in its CSV: prepare it with fmt='jpeg'")
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stream.mimic_csv, dst / stream.mimic_csv.name)
    jobs, kept = [], 0
    for key in keys:
        out = dst / output_key(key, fmt)
        if out.exists() and not overwrite:
            kept += 1
            continue
        jobs.append((key, str(src / key), str(out)))
    results: list[tuple[str, str | None]] = []
    if workers > 1 and len(jobs) > 1:
        n = max(1, min(64, len(jobs) // (4 * workers)))
        chunks = [jobs[i : i + n] for i in range(0, len(jobs), n)]
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        # the workers leave Ctrl-C to this process; interrupted here, the chunks not started are dropped (each
        # image is written under a temporary name and renamed, so a rerun finds only whole images)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_sigint)
        try:
            for part in pool.map(partial(_prepare_chunk, size=size, min_size=min_size, fmt=fmt), chunks):
                results += part
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        results = _prepare_chunk(jobs, size, min_size, fmt)
    skipped = {k: why for k, why in results if why is not None}
    report = {
        "source": str(src),
        "size": size,
        "format": fmt,
        "images": len(keys),
        "written": sum(1 for _, why in results if why is None),
        "kept": kept,
        "skipped": len(skipped),
        "skip_reasons": dict(Counter(why.split(":", 1)[0] for why in skipped.values())),
        "skips": dict(sorted(skipped.items())),
    }
    dst.mkdir(parents=True, exist_ok=True)
    (dst / REPORT).write_text(json.dumps(report, indent=1))
    return report
