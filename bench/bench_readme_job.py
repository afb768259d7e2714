"""The README's main job, timed as a user runs it: ``xwin backfill --cohort example --store <fresh dir>``.

Ingest of the bundled CT -> render of its 120-view 512² ring (CPU backend) -> commit -> deep verify -> preview ->
FDK validation, as one command in a new process (process start to exit, so the imports count), then the same command
again on the same store (everything skipped). ``--prefect`` adds the same pair with ``--prefect`` and no server
(an ephemeral Prefect API in the process, fresh ``PREFECT_HOME``). Every wall time, and the PSNR/SSIM and FDK seconds
the command prints, go to bench/results/readme-job-<date>.json (bench/record.py).

    .venv/bin/python bench/bench_readme_job.py [--repeats 1] [--prefect]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record  # bench/record.py (the script's folder is on sys.path)

XWIN = str(Path(sys.executable).parent / "xwin")
VALIDATION = re.compile(r"PSNR ([\d.]+) dB SSIM ([\d.]+) \((\w+) FDK, ([\d.]+) s\)")


def run(store: Path, env: dict[str, str], extra: list[str]) -> dict:
    cmd = [XWIN, "backfill", "--cohort", "example", "--store", str(store), *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    m = VALIDATION.search(r.stdout + r.stderr)
    out: dict = {"wall_s": wall}
    if m:
        out.update(psnr_db=float(m[1]), ssim=float(m[2]), fdk_backend=m[3], fdk_s=float(m[4]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="fresh-store runs (each followed by its rerun)")
    ap.add_argument("--prefect", action="store_true", help="also time the job with --prefect (ephemeral API)")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("readme-job", args)
    modes = [("serverless", [])] + ([("prefect", ["--prefect"])] if args.prefect else [])
    samples: dict[str, dict[str, list]] = {m: {"first": [], "rerun": []} for m, _ in modes}
    with tempfile.TemporaryDirectory(prefix="xwin-readme-job-") as tmp:
        for k in range(max(1, args.repeats)):
            for mode, extra in modes:  # interleaved: a slow spell of the shared machine hits every mode
                env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
                if mode == "prefect":
                    env["PREFECT_HOME"] = str(Path(tmp) / f"prefect-home-{k}")
                store = Path(tmp) / f"store-{mode}-{k}"
                first = run(store, env, extra)
                again = run(store, env, extra)
                samples[mode]["first"].append(first)
                samples[mode]["rerun"].append(again)
                print(f"{mode}: first run {first}, rerun {again}", flush=True)
    rec.save(samples=samples, command="xwin backfill --cohort example --store <fresh dir>")


if __name__ == "__main__":
    main()
