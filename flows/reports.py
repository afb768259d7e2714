"""What a person looks at after a run: preview montages, ring contact sheets, run summaries (markdown + JSON).

Reports live *beside* the store, never among its objects (the store layout belongs to ``storage``):
``<store URL>-reports/`` holds ``previews/<cohort>/<spec_hash>/<volume_id>.png``, ``runs/<run id>.{json,md}`` and
``rejected/<cohort>.jsonl`` (the landing scan's ledger of inputs already rejected). A store that is a whole bucket
(``s3://bucket``) has nothing beside it in its bucket, so its reports go under it, in ``s3://bucket/reports/``
(a name the store's layout never uses), never into another bucket. Local paths and ``s3://`` URLs both work
(fsspec; the S3 endpoint comes from XWIN_S3_ENDPOINT / AWS_ENDPOINT_URL like the store's).
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xwin.pipeline.render.appearance import minmax, neglog_window
from xwin.schemas.ingest import RunSummary
from xwin.storage import s3_options


# ---- locations -----------------------------------------------------------------------------------------------
def reports_url(store_url: str) -> str:
    """``<store>-reports`` beside the store: ``data/example`` -> ``data/example-reports``, ``s3://b/x`` ->
    ``s3://b/x-reports``; a store that is a whole bucket keeps its reports inside it: ``s3://b`` ->
    ``s3://b/reports``."""
    u = str(store_url).rstrip("/")
    if "://" not in u:
        u = str(Path(u).expanduser().resolve())
    scheme, _, path = u.partition("://")
    if scheme in ("s3", "gs", "gcs", "az", "abfs") and "/" not in path:  # a bare bucket: no "beside" in it
        return f"{u}/reports"
    return u + "-reports"


def preview_url(reports: str, cohort: str, spec_hash: str, volume_id: str) -> str:
    return f"{reports}/previews/{cohort}/{spec_hash}/{volume_id}.png"


def _fs_open(url: str, mode: str):
    if "://" not in url or url.startswith("file://"):
        p = Path(url.removeprefix("file://"))
        if "w" in mode or "a" in mode:
            p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, mode)
    import fsspec

    opts = s3_options() if url.startswith("s3://") else {}
    return fsspec.open(url, mode, **opts).open()


def write_bytes(url: str, data: bytes) -> str:
    with _fs_open(url, "wb") as f:
        f.write(data)
    return url


def read_text(url: str) -> str | None:
    data = read_bytes(url)
    return None if data is None else data.decode()


def read_bytes(url: str) -> bytes | None:
    try:
        with _fs_open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def link(url: str) -> str:
    """A clickable link for a report location (file:// for local paths)."""
    return url if "://" in url else Path(url).resolve().as_uri()


# ---- pixels --------------------------------------------------------------------------------------------------
def display(img: np.ndarray) -> np.ndarray:
    """(H, W) line integrals -> (H, W) uint8 radiograph look (dense = bright): ``appearance.neglog_window`` (per-image
    percentile window) stretched to the full 8-bit range."""
    w = neglog_window(np.asarray(img, dtype=np.float32))
    return np.clip(minmax(w, eps=1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _tile(img: np.ndarray, size: int, label: str | None) -> Image.Image:
    """(H, W) float -> square-ish PIL tile whose longer side is ``size``, with an optional label."""
    im = Image.fromarray(display(img), mode="L")
    h, w = img.shape
    s = size / max(h, w)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    if label:
        d = ImageDraw.Draw(im)
        d.rectangle([0, 0, 7 * len(label) + 4, 13], fill=0)
        d.text((2, 1), label, fill=255)
    return im


def pick_views(yaws: Sequence[float], want: Iterable[float] = (0.0, 90.0, 180.0, 270.0)) -> list[int]:
    """Indices of the views nearest to each wanted yaw (deg, circular), without repeats, in order."""
    y = np.asarray(yaws, dtype=np.float64)
    out: list[int] = []
    for t in want:
        d = np.abs(((y - t + 180.0) % 360.0) - 180.0)
        k = int(np.argmin(d))
        if k not in out:
            out.append(k)
    return out


def montage(views: np.ndarray, yaws: Sequence[float], indices: Sequence[int], size: int = 256) -> Image.Image:
    """One row of ``indices`` views (V, H, W) at ``size`` px, labelled with their yaw."""
    tiles = [_tile(views[i], size, f"yaw {yaws[i]:g}") for i in indices]
    W = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    H = max(t.height for t in tiles)
    out = Image.new("L", (W, H), 32)
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 4
    return out


# the preview sheet of a run summary: what the Prefect UI shows inline, bounded whatever the cohort's size
SHEET_SERIES = 12  # series shown at most (evenly chosen by volume id)
SHEET_WIDTH = 1024  # pixels, at most
SHEET_BYTES = 200_000  # encoded (JPEG) bytes, at most; base64 in the markdown adds a third


def pick_evenly(ids: Iterable[str], k: int) -> list[str]:
    """At most ``k`` of ``ids`` (sorted), evenly spaced from the first to the last: the same ones for the same set."""
    s = sorted(ids)
    if len(s) <= k:
        return s
    if k <= 1:
        return s[:k]
    return [s[round(i * (len(s) - 1) / (k - 1))] for i in range(k)]


def preview_sheet(
    images: Sequence[tuple[str, Image.Image]], width: int = SHEET_WIDTH, max_bytes: int = SHEET_BYTES
) -> bytes | None:
    """One JPEG of the series' preview montages, each labelled with its volume id (12 characters): one column up to
    3 series, else two; at most ``width`` pixels wide and ``max_bytes`` bytes (quality, then size, are lowered until
    it fits). None when nothing is given or no encoding fits."""
    if not images:
        return None
    cols = 1 if len(images) <= 3 else 2
    rows = -(-len(images) // cols)
    pad, head = 4, 14
    for scale, quality in ((1.0, 85), (1.0, 65), (0.75, 65), (0.5, 60), (0.35, 50), (0.25, 40)):
        tw = max(16, int((width - pad * (cols + 1)) / cols * scale))
        tiles = []
        for vid, im in images:
            g = im.convert("L")
            h = max(1, round(g.height * tw / g.width))
            tiles.append((vid, g.resize((tw, h), Image.Resampling.LANCZOS)))
        th = max(t.height for _, t in tiles)
        out = Image.new("L", (pad + cols * (tw + pad), pad + rows * (head + th + pad)), 24)
        d = ImageDraw.Draw(out)
        for i, (vid, t) in enumerate(tiles):
            r, c = divmod(i, cols)
            x, y = pad + c * (tw + pad), pad + r * (head + th + pad)
            d.text((x, y + 1), vid[:12], fill=255)
            out.paste(t, (x, y + head))
        b = io.BytesIO()
        out.save(b, format="JPEG", quality=quality, optimize=True)
        if b.tell() <= max_bytes:
            return b.getvalue()
    return None


def sheet_of(previews: dict[str, str], k: int = SHEET_SERIES, **kw) -> tuple[str | None, list[str]]:
    """(data: URL of the preview sheet of ``k`` evenly chosen series, their ids) from the run's preview PNGs
    (volume id -> URL); previews that cannot be read are left out. (None, []) without any."""
    shown: list[tuple[str, Image.Image]] = []
    for vid in pick_evenly(previews, k):
        data = read_bytes(previews[vid])
        if data is not None:
            shown.append((vid, Image.open(io.BytesIO(data))))
    jpeg = preview_sheet(shown, **kw)
    if jpeg is None:
        return None, []
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(), [v for v, _ in shown]


def png_bytes(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG", optimize=True)
    return b.getvalue()


def contact_sheet(
    views: np.ndarray, yaws: Sequence[float], title: str = "", big: int = 512, thumb: int = 96, cols: int = 12
) -> Image.Image:
    """The frontal (yaw 0) and lateral (yaw 90) views large on top, then every view of the ring as a thumbnail.

    views: (V, H, W) line integrals; yaws: (V,) degrees.
    """
    V = views.shape[0]
    top_idx = pick_views(yaws, (0.0, 90.0))
    top = [_tile(views[i], big, f"yaw {yaws[i]:g}") for i in top_idx]
    cols = max(1, min(cols, V))
    rows = -(-V // cols)
    th = [_tile(views[i], thumb, f"{yaws[i]:g}") for i in range(V)]
    tw, tht = max(t.width for t in th), max(t.height for t in th)
    pad = 4
    head = 18 if title else 0
    W = max(sum(t.width for t in top) + pad * (len(top) + 1), cols * (tw + pad) + pad)
    H = head + max(t.height for t in top) + 2 * pad + rows * (tht + pad) + pad
    out = Image.new("L", (W, H), 24)
    d = ImageDraw.Draw(out)
    if title:
        d.text((pad, 3), title, fill=255)
    x = pad
    for t in top:
        out.paste(t, (x, head + pad))
        x += t.width + pad
    y0 = head + max(t.height for t in top) + 2 * pad
    for i, t in enumerate(th):
        r, c = divmod(i, cols)
        out.paste(t, (pad + c * (tw + pad), y0 + r * (tht + pad)))
    return out


# ---- summaries -----------------------------------------------------------------------------------------------
def counts_by_reason(summary: RunSummary) -> dict[str, int]:
    return dict(sorted(Counter(r.reason.value for r in summary.rejected).items()))


def qc_flag_counts(summary: RunSummary) -> dict[str, int]:
    """Series this run made (done) that each quality check flagged: check name -> count (docs/ingest.md)."""
    return dict(sorted(Counter(f for e in summary.done for f in e.qc_flags).items()))


def qc_flagged(summary: RunSummary) -> list:
    """The done entries that a quality check flagged (``RunEntry.qc_flags``), in run order."""
    return [e for e in summary.done if e.qc_flags]


def summary_markdown(
    summary: RunSummary,
    *,
    cohort: str,
    spec_hash: str,
    store: str,
    previews: dict[str, str],
    verify: str | None = None,
    wall_s: float | None = None,
    title: str = "xwin backfill",
    sheet: str | None = None,
    shown: Sequence[str] | None = None,
) -> str:
    """Markdown run summary: counts (done / skipped / rejected by reason / failed / cancelled), rejections,
    failures, what a stop cancelled, previews.

    ``sheet``: the image of the previews (a data: URL, :func:`sheet_of`) of the series ``shown``, which are then the
    only ones linked one by one (the rest: their folder), so the summary stays small for any cohort."""
    c = summary.counts()
    failed = summary.failed
    lines = [
        f"# {title}: cohort `{cohort}`",
        "",
        f"store `{store}`, spec `{spec_hash}`" + (f", {wall_s:.1f} s" if wall_s is not None else ""),
        "",
        "| outcome | series |",
        "| --- | ---: |",
        f"| done | {c['done']} |",
    ]
    for check, n in qc_flag_counts(summary).items():
        lines.append(f"| done, flagged by QC: {check} | {n} |")
    lines.append(f"| skipped (already done) | {c['skipped']} |")
    for reason, n in counts_by_reason(summary).items():
        lines.append(f"| rejected: {reason} | {n} |")
    if failed:
        lines.append(f"| failed (after retries; a rerun retries them) | {len(failed)} |")
    stopped = sum(1 for x in summary.cancelled if x.started)
    if summary.cancelled:
        lines.append(f"| cancelled, not started (the run was stopped) | {len(summary.cancelled) - stopped} |")
        lines.append(f"| cancelled, stopped part-way (nothing of it committed) | {stopped} |")
    if verify:
        lines += ["", f"verify: {verify}"]
    flagged = qc_flagged(summary)
    if flagged:
        lines += [
            "",
            "## Flagged by quality checks",
            "",
            "Stored and rendered; `xwin card` shows each check's value and rule, `--qc reject:CHECK` rejects them.",
            "",
            "| input | volume | checks |",
            "| --- | --- | --- |",
        ]
        for e in flagged:
            lines.append(f"| `{e.input}` | `{e.volume_id}` | {', '.join(e.qc_flags)} |")
    if summary.rejected:
        lines += ["", "## Rejected", "", "| input | reason | detail |", "| --- | --- | --- |"]
        for r in summary.rejected:
            lines.append(f"| `{r.input}` | {r.reason.value} | {r.detail.replace('|', '/')} |")
    if failed:
        lines += ["", "## Failed", "", "| input | stage | error | can pass |", "| --- | --- | --- | --- |"]
        for f in failed:
            passes = "yes" if f.retryable else "no: fix the cause"
            lines.append(f"| `{f.input}` | {f.stage} | {f.error.replace('|', '/')} | {passes} |")
    if summary.cancelled:
        lines += ["", "## Cancelled (run the same command again to continue)", "", "| input | stage | state |"]
        lines.append("| --- | --- | --- |")
        for x in summary.cancelled:
            lines.append(f"| `{x.input}` | {x.stage} | {'stopped part-way' if x.started else 'not started'} |")
    if previews:
        lines += ["", "## Previews", ""]
        listed = sorted(previews) if shown is None else list(shown)
        if sheet:
            what = f"{len(listed)} of {len(previews)} series" if len(listed) < len(previews) else "every series"
            lines += [f"![previews: {what}]({sheet})", ""]
        lines += [f"- [{vid}]({link(previews[vid])})" for vid in listed]
        if len(listed) < len(previews):
            folder = previews[listed[0]].rsplit("/", 1)[0] if listed else ""
            lines.append(f"- and {len(previews) - len(listed)} more in `{folder}`")
    return "\n".join(lines) + "\n"


def write_run_report(
    reports: str, run_id: str, summary: RunSummary, markdown: str, extra: dict | None = None
) -> tuple[str, str]:
    """Write ``runs/<run_id>.json`` (the RunSummary + extra) and ``runs/<run_id>.md``; returns both URLs."""
    j = f"{reports}/runs/{run_id}.json"
    m = f"{reports}/runs/{run_id}.md"
    payload = {"summary": json.loads(summary.model_dump_json()), **(extra or {})}
    write_bytes(j, json.dumps(payload, indent=1).encode())
    write_bytes(m, markdown.encode())
    return j, m
