"""docs/benchmarks.md is generated from the committed benchmark results: every figure in its ``<!-- bench:NAME -->``
regions must equal what ``bench/report.py`` computes from ``bench/results/*.json`` (written by the bench scripts
through ``bench/record.py``). Fast: reads files, runs no benchmark."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest
from bench_modules import load_bench

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DOC = REPO / "docs" / "benchmarks.md"


report = load_bench("report")
record = load_bench("record")


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return report.load_all()


def test_every_region_equals_what_the_results_generate(results):
    diff = report.differences(DOC.read_text(), results)
    assert not diff, "docs/benchmarks.md is not what bench/report.py makes of bench/results/ (run it):\n" + "\n".join(
        diff
    )


def test_every_generator_has_exactly_one_region():
    names = [m["name"] for m in report.REGION.finditer(DOC.read_text())]
    assert sorted(names) == sorted(report.REGIONS), "regions in the doc vs generators in bench/report.py"
    for n in report.REGIONS:
        assert DOC.read_text().count(f"<!-- bench:{n} -->") == 1


def test_a_typed_number_is_caught(results):
    """Change one digit of one figure inside a region: the check names that region."""
    doc = DOC.read_text()
    body = report.regions(doc)["store"]
    m = re.search(r"\d\.\d\d", body)
    assert m is not None
    digit = m[0][-1]
    forged = body[: m.end() - 1] + str((int(digit) + 1) % 10) + body[m.end() :]
    diff = report.differences(doc.replace(body, forged), results)
    assert len(diff) == 1 and "'store'" in diff[0]


def test_figures_follow_the_raw_samples(results):
    """The tables come from the raw samples, not from a summary written beside them: slowing every commit of the
    newest store result down 2x halves its like-for-like ratio in the generated text."""
    r = dict(report.latest(results, "store"))
    doc = DOC.read_text()
    before = report.REGIONS["store"](results)
    slow = json.loads(json.dumps(r))
    for c in slow["samples"]["codecs"]:
        c["write_s"]["commit"] = [2 * t for t in c["write_s"]["commit"]]
    after = report.REGIONS["store"]([x for x in results if x is not r] + [slow])
    assert before != after and before in doc

    def ratio(text: str) -> float:
        m = re.search(r"writes the ring at \*\*([\d.]+)×\*\*", text)
        assert m is not None
        return float(m[1])

    assert ratio(after) == pytest.approx(ratio(before) / 2, abs=0.011)


def test_result_files_are_complete(results):
    assert results, "no result file in bench/results/"
    scripts = {p.name for p in BENCH.glob("bench_*.py")}
    for r in results:
        where = r["_file"]
        assert r["schema"] == 1 and r["bench"] and r["script"].removeprefix("bench/") in scripts, where
        stem = f"{r['bench']}{'-' + r['tag'] if r['tag'] else ''}-{r['date']}"
        assert r["_file"] == f"{stem}.json" or re.fullmatch(re.escape(stem) + r"-\d+\.json", r["_file"]), where
        assert re.fullmatch(r"[0-9a-f]{40}", r["git"]["commit"]) and isinstance(r["git"]["dirty"], bool), where
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", r["date"]) and r["started_at"].startswith(r["date"]), where
        m = r["machine"]
        assert isinstance(m["cores"], int) and m["cores"] > 0 and m["cpu"] and isinstance(m["gpus"], list), where
        for k in ("load_before", "load_after"):
            assert len(r[k]) == 3 and all(isinstance(x, float | int) and x >= 0 for x in r[k]), (where, k)
        assert r["versions"].get("numpy") and r["versions"].get("xwin"), where
        assert r["samples"], where


def test_region_results_hold_raw_samples(results):
    """Every figure the regions use has its repeats in the file, not only a median."""
    ingest = report.latest(results, "ingest")["samples"]
    assert len(ingest["simpleitk_s"]) == len(ingest["ours_load_s"]) == len(ingest["ours_without_qc_s"]) > 1
    store = report.latest(results, "store")["samples"]
    for c in store["codecs"]:
        assert all(len(v) > 1 for v in c["write_s"].values()) and len(c["read9_s"]) > 1
    recon = report.latest(results, "reconstruct")["samples"]
    assert all(len(v) >= 1 for v in recon["seconds"].values()) and "rtk" in recon["warmup_s"]
    cons = report.latest(results, "consumer")["samples"]["measures"]
    assert all(m["seconds"] > 0 for per in cons.values() for ms in per.values() for m in ms)


def test_every_bench_script_records_its_results():
    for p in sorted(BENCH.glob("bench_*.py")):
        src = p.read_text()
        assert "record.start(" in src and ".save(" in src, f"{p.name} writes no result file (bench/record.py)"


# numbers with a unit of measurement, outside the generated regions: typed figures. Goals ("≥ 0.8×", "≤ 20 s") and
# the GPU subsection (figures of bench/gpu_check.py, which has no result file here yet) are not checked.
FIGURE = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?)\s?(ms|s|×(?!\s*\d)|samples/s|views/s|images/s|MB/s|GB|dB|%(?! MFU))(?![\w/²])"
)


def typed_figures(doc: str) -> list[str]:
    text = report.REGION.sub("", doc)
    text = re.sub(r"### GPU rendering.*?(?=\n## )", "", text, flags=re.S)
    found = []
    for m in FIGURE.finditer(text):
        if any(c in text[max(0, m.start() - 3) : m.start()] for c in "≥≤<>"):
            continue
        found.append(text[max(0, m.start() - 30) : m.end() + 10].replace("\n", " "))
    return found


def test_no_typed_figures_outside_the_regions():
    assert typed_figures(DOC.read_text()) == []


def test_the_figure_scan_finds_typed_figures():
    assert len(typed_figures("A ring renders in ~26 s, 2.15× RTK, read 1.89 ms; 40% MFU, goal ≥ 0.8×.\n")) == 3


def test_record_writes_a_complete_result(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/bench_x.py", "--repeats", "2"])
    args = argparse.Namespace(repeats=2, tag="t1", results_dir=str(tmp_path), no_record=False)
    run = record.start("x", args, extra=1)
    p1 = run.save(samples={"s": [0.1, 0.2]}, summary={"m": 0.15})
    p2 = record.start("x", args).save(samples={"s": [0.3]})
    assert p1.name.startswith("x-t1-") and p2.name == p1.name.replace(".json", "-2.json")
    doc = json.loads(p1.read_text())
    assert doc["params"] == {"repeats": 2, "extra": 1} and doc["samples"] == {"s": [0.1, 0.2]}
    assert doc["argv"] == ["--repeats", "2"] and doc["machine"]["cores"] >= 1 and len(doc["load_after"]) == 3
    assert '"s": [0.1, 0.2]' in p1.read_text()  # raw samples on one line
    args.no_record = True
    assert record.start("x", args).save(samples={"s": [1.0]}) is None
