"""An NLST download as the NBIA Data Retriever writes it, backfilled as docs/nlst.md tells a user to.

The download is made from the bundled chest CT (512 x 512 x 133, one DICOM file per slice, Explicit VR Little
Endian), in the Data Retriever's "descriptive directory name" layout with its ``metadata.csv``:

    <download>/manifest-<id>/metadata.csv
    <download>/manifest-<id>/NLST/<Subject ID>/<MM-DD-YYYY>-NA-NLST-LSS-<n>/<N>.000000-<description>-<n>/<slice>.dcm

Subject 100012, exam T0 (1999): a scout, a soft-kernel (GE STANDARD) and a sharp-kernel (GE LUNG) axial series
of one scan: one volume (the soft series, chosen by the ranking of docs/ingest.md). Exam T1 (2000): the soft series
only, with a slice missing: rejected ``missing_slices``. Subject 100013: a row whose folder was not downloaded:
rejected ``not_found``. A row of another modality (an SR): left out without being read.

Then ``xwin backfill --cohort nlst --manifest <moved csv> --manifest-root <download>/manifest-<id> --store <fresh>
--backend joseph --json`` in a new process (the X-WIN spec: 120 views of 512 x 512), and the same command again
(everything skipped). Recorded: the wall time of both, the run report's stage seconds, the bytes and files of each
series folder, the bytes of the stored volume and ring, and the outcome of every planned study.

    .venv/bin/python bench/bench_nlst.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import record  # bench/record.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
XWIN = str(Path(sys.executable).parent / "xwin")
HEADER = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID", "Study UID",
    "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
    "SOP Class UID", "Number of Images", "File Size", "File Location", "Download Timestamp",
]  # fmt: skip


def du(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def row(folder: Path, base: Path, subject: str, study_uid: str, date: str, desc: str, modality: str = "CT") -> dict:
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    first = pydicom.dcmread(files[0], stop_before_pixels=True) if files else None
    size = du(folder)[0] if folder.is_dir() else 0
    return {
        "Series UID": str(first.SeriesInstanceUID) if first else pydicom.uid.generate_uid(),
        "Collection": "NLST",
        "3rd Party Analysis": "NO",
        "Data Description URI": "",
        "Subject ID": subject,
        "Study UID": study_uid,
        "Study Description": "NLST-LSS",
        "Study Date": date,
        "Series Description": desc,
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "Modality": modality,
        "SOP Class Name": "CT Image Storage" if modality == "CT" else "Comprehensive SR Storage",
        "SOP Class UID": "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.88.33",
        "Number of Images": str(len(files)),
        "File Size": f"{size / 1e6:.2f} MB",
        "File Location": "./" + folder.relative_to(base).as_posix(),
        "Download Timestamp": "2026-12-05T06:00:00.000",
    }


def make_download(root: Path) -> tuple[Path, dict[str, Path]]:
    """The download folder (the one holding metadata.csv) and its series folders by role."""
    from dicom_fixtures import write_ct_series, write_localizer

    from xwin.pipeline.example import example_ct_path

    img = nib.as_closest_canonical(nib.load(str(example_ct_path())))
    hu = np.rint(np.asarray(img.dataobj, dtype=np.float64)).astype(np.int32)
    base = root / "manifest-1764900000000"
    t0 = base / "NLST/100012/01-02-1999-NA-NLST-LSS-31415"
    t1 = base / "NLST/100012/01-02-2000-NA-NLST-LSS-92653"
    s0, s1 = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    d = {
        "t0 scout": t0 / "1.000000-0OPASCOUT-10001",
        "t0 soft": t0 / "2.000000-1OPAGEHSQXSTANDARD35025120-10002",
        "t0 sharp": t0 / "3.000000-1OPAGEHSQXLUNG35025120-10003",
        "t1 soft (slice missing)": t1 / "2.000000-1OPAGEHSQXSTANDARD35025120-20002",
        "not downloaded": base / "NLST/100013/01-02-1999-NA-NLST-LSS-58979/2.000000-1OPAGEHSQXSTANDARD-30002",
    }
    write_localizer(d["t0 scout"], study_uid=s0, patient_id="100012")
    common = {"patient_id": "100012", "description": "1,OPA,GE,HSQX,STANDARD,350,2.5,120,40"}
    write_ct_series(d["t0 soft"], hu, img.affine, study_uid=s0, kernel="STANDARD", series_number=2, **common)
    common["description"] = "1,OPA,GE,HSQX,LUNG,350,2.5,120,40"
    write_ct_series(d["t0 sharp"], hu, img.affine, study_uid=s0, kernel="LUNG", series_number=3, **common)
    common["description"] = "1,OPA,GE,HSQX,STANDARD,350,2.5,120,40"
    gap = write_ct_series(
        d["t1 soft (slice missing)"], hu, img.affine, study_uid=s1, kernel="STANDARD", study_date="20000102", **common
    )
    gap_sorted = sorted(gap, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    gap_sorted[60].unlink()  # a slice lost in transfer
    rows = [
        row(d["t0 scout"], base, "100012", s0, "01-02-1999", "0,OPA,GE,HSQX,SCOUT"),
        row(d["t0 soft"], base, "100012", s0, "01-02-1999", "1,OPA,GE,HSQX,STANDARD,350,2.5,120,40"),
        row(d["t0 sharp"], base, "100012", s0, "01-02-1999", "1,OPA,GE,HSQX,LUNG,350,2.5,120,40"),
        row(t0 / "4.000000-Dose report-10004", base, "100012", s0, "01-02-1999", "Dose report", modality="SR"),
        row(d["t1 soft (slice missing)"], base, "100012", s1, "01-02-2000", "1,OPA,GE,HSQX,STANDARD,350,2.5,120,40"),
        row(d["not downloaded"], base, "100013", "1.2.840.99.13", "01-02-1999", "1,OPA,GE,HSQX,STANDARD"),
    ]
    with open(base / "metadata.csv", "w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        w.writerows(rows)
    return base, d


def backfill(args: list[str]) -> tuple[float, dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    t = time.perf_counter()
    r = subprocess.run([XWIN, "backfill", *args], capture_output=True, text=True, env=env, timeout=3600, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"xwin backfill failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return wall, json.loads(r.stdout), r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="joseph", help="render backend (default joseph: the CPU one)")
    record.add_args(ap)
    args = ap.parse_args()
    rec = record.start("nlst", args)
    with tempfile.TemporaryDirectory(prefix="xwin-nlst-") as tmp:
        t = time.perf_counter()
        base, folders = make_download(Path(tmp) / "download")
        make_s = time.perf_counter() - t
        # the csv moved away from the download: --manifest-root says where its File Location paths start
        csv_path = Path(tmp) / "nlst-metadata.csv"
        csv_path.write_bytes((base / "metadata.csv").read_bytes())
        store = Path(tmp) / "store"
        argv = ["--cohort", "nlst", "--manifest", str(csv_path), "--manifest-root", str(base), "--store", str(store)]
        argv += ["--backend", args.backend, "--verify", "deep", "--json"]
        first_s, summary, stages = backfill(argv)
        rerun_s, again, _ = backfill(argv)
        report = json.loads(next((Path(f"{store}-reports") / "runs").glob("*.json")).read_text())
        series = {k: dict(zip(("bytes", "files"), du(p))) for k, p in folders.items() if p.is_dir()}
        (done,) = summary["done"]
        vid = done["volume_id"]
        from xwin.storage import open_store

        ds = open_store(str(store)).find_dataset("nlst")
        volume_bytes = du(store / "volumes" / vid)[0]
        ring_bytes = du(store / "datasets" / "nlst" / ds.spec_hash / "rings" / vid)[0]
        rec_vol = open_store(str(store)).volume_record(vid)
    samples = {
        "first_run_s": [first_s],
        "rerun_s": [rerun_s],
        "stage_seconds": report["stage_seconds"],
        "make_download_s": make_s,
        "series": series,
        "volume_bytes": volume_bytes,
        "ring_bytes": ring_bytes,
        "volume_shape": list(rec_vol.shape),
        "chosen": [c.model_dump() for c in rec_vol.series_choices],
        "qc_flags": done.get("qc_flags", []),
        "rejected": [{"input": r["input"].split("#")[-1], "reason": r["reason"]} for r in summary["rejected"]],
        "counts": {k: len(summary[k]) for k in ("done", "skipped", "rejected", "failed")},
        "rerun_counts": {k: len(again[k]) for k in ("done", "skipped", "rejected", "failed")},
        "stage_lines": stages.splitlines(),
    }
    print(json.dumps({k: samples[k] for k in ("first_run_s", "rerun_s", "stage_seconds", "counts", "rejected")}))
    rec.save(samples=samples, command="xwin backfill --cohort nlst --manifest CSV --manifest-root DIR --store <fresh>")


if __name__ == "__main__":
    main()
