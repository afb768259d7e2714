"""``xwin train``, ``xwin probe`` and ``xwin prepare-cxr``: the X-WIN model from the command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from xwin.flows import stop
from xwin.flows.cli.common import (
    check_output,
    check_split,
    dataset_options,
    fail,
    or_exit,
    problem_line,
    read_mapping,
    resolve_dataset,
)

if TYPE_CHECKING:
    from xwin.training.config import TrainConfig


def train(
    config: Path | None = typer.Option(None, "--config", help="YAML/JSON config file (training/config.py)"),
    preset: str | None = typer.Option(None, "--preset", help="tiny (CPU) or base (the paper)"),
    store: str | None = typer.Option(
        None, "--store", help="store URL, or the dataset: <store url>#<cohort>[/<spec hash>]"
    ),
    cohort: str | None = typer.Option(None, "--cohort", help="cohort of the dataset (default: the only one)"),
    spec_hash: str | None = typer.Option(
        None, "--spec-hash", help="spec hash (or a unique prefix) when the cohort has several"
    ),
    real: str | None = typer.Option(None, "--real", help="directory of real radiographs (or 'synthetic')"),
    split: str | None = typer.Option(None, "--split", help="subject-level split to train on (xwin splits)"),
    synthetic: bool = typer.Option(False, "--synthetic", help="train on procedural phantoms (no store)"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="stop after this many steps"),
    out: Path | None = typer.Option(None, "--out", help="run directory (log.jsonl, checkpoints/)"),
    resume: str | None = typer.Option(None, "--resume", help="checkpoint path, or 'auto' = out/checkpoints/latest.pt"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    overrides: list[str] = typer.Option([], "--set", help="config override key.sub=value (repeatable)"),
    as_json: bool = typer.Option(
        False, "--json", help="print one JSON summary (every loss at the first and last step)"
    ),
    echo: bool = typer.Option(False, "--echo", help="also print each log line to stderr"),
) -> None:
    """Train the X-WIN world model (CPU, one GPU, or torchrun/DDP)."""
    # the options' values are taken as given (``--cohort 2024`` is the cohort "2024"); only --set is parsed as YAML
    if store is not None:  # the one way every command names a dataset (flows/cli/common.py)
        store, cohort, spec_hash = dataset_options(store, cohort, spec_hash)
    given: dict[str, tuple[str, Any]] = {
        "data.store": ("--store", store),
        "data.cohort": ("--cohort", cohort),
        "data.spec_hash": ("--spec-hash", spec_hash),
        "data.split": ("--split", split),
        "data.real": ("--real", real),
        "data.synthetic": ("--synthetic", True if synthetic else None),
        "max_steps": ("--max-steps", max_steps),
        "out_dir": ("--out", None if out is None else str(out)),
        "device": ("--device", device),
    }
    cfg = _config(config, preset, list(overrides), {k: v for k, v in given.items() if v[1] is not None})
    if cfg.out_dir:
        check_output(Path(cfg.out_dir), folder=True, option="out_dir" if out is None else "--out")
    real_dir = cfg.data.real if cfg.data.real != "synthetic" and not cfg.data.synthetic else None
    if real_dir and not Path(real_dir).expanduser().is_dir():
        fail(f"{'--real' if real else 'data.real'} {cfg.data.real}: no such folder of radiographs")
    if str(cfg.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"device {cfg.device}: this machine has no CUDA GPU that torch can use: train with --device cpu")
    from xwin.training.loop import Trainer, build_streams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if cfg.data.store and not cfg.data.synthetic:
        # a store that does not exist is an error, never a new empty one; no dataset, or several: one line naming them
        st, ds, _ = resolve_dataset(cfg.data.store, cfg.data.cohort, cfg.data.spec_hash)
        for option, sp in (
            ("--split", cfg.data.split),
            ("data.val_split", cfg.data.val_split if cfg.val_every else None),
        ):
            check_split(st, ds, sp, option)
    sim, real_stream = or_exit(build_streams, cfg)
    from xwin.training.loop import build_val_streams

    val = or_exit(build_val_streams, cfg) if cfg.val_every > 0 else None
    from xwin.training.loop import DataShardError

    # under torchrun: a stream with fewer batches an epoch than ranks is one line (rank 0) and exit 2, before training
    trainer = or_exit(Trainer, cfg, sim, real_stream, echo=echo, val=val, errors=(DataShardError,))
    if resume:
        path = Path(cfg.out_dir) / "checkpoints" / "latest.pt" if resume == "auto" else Path(resume)
        if path.exists():
            trainer.load(path)
        elif resume != "auto":
            typer.echo(f"error: no checkpoint {path}", err=True)
            raise typer.Exit(2)
    with stop.handle_signals():  # Ctrl-C / SIGTERM: the step in progress ends, a checkpoint is saved, exit 130/143
        summary = trainer.run(should_stop=stop.requested)
        ckpt = trainer.save()
    trainer.close()
    if not trainer.is_main:  # under torchrun only rank 0 reports
        return
    summary.update(out_dir=str(trainer.out_dir), checkpoint=str(ckpt), preset=cfg.preset, world_size=trainer.world)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        last = summary["last"] or {}
        typer.echo(
            f"trained to step {summary['steps']}: total {last.get('total', float('nan')):.4f}, checkpoint {ckpt}"
        )
    if summary.get("stopped"):
        typer.echo(
            f"cancelled: stopped at step {summary['steps']}; run it again with --resume auto to continue", err=True
        )
        raise typer.Exit(stop.exit_code())


def _config(path: Path | None, preset: str | None, sets: list[str], given: dict[str, tuple[str, Any]]) -> TrainConfig:
    """The training config of the file, preset, --set overrides and options; a bad one ends the command with one
    line per problem naming where the value came from (the file, ``--set key=value``, the option or the preset)."""
    from pydantic import ValidationError

    from xwin.training.config import build_config, parse_override

    file_d = read_mapping(path, "config") if path is not None else {}
    for item in sets:
        try:
            parse_override(item)
        except ValueError as e:
            fail(f"--set {item}: {e}")
        except Exception as e:  # noqa: BLE001 - a YAML error of the value: one line, never a traceback
            fail(f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]})")
    values: dict = {}
    for key, (_, v) in given.items():
        cur = values
        *head, last = key.split(".")
        for part in head:
            cur = cur.setdefault(part, {})
        cur[last] = v
    try:
        return build_config(file_d, preset, sets, values)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        fail(*(problem_line(_source(err["loc"], path, file_d, sets, given, preset), err) for err in errs))
    except ValueError as e:  # unknown preset
        fail(str(e))


def _source(
    loc: tuple, path: Path | None, file_d: dict, sets: list[str], given: dict[str, tuple[str, Any]], preset: str | None
) -> str:
    """Where the value at ``loc`` came from: an option, the last --set of it, the config file, or the preset (a
    problem of the whole config is the file's, else the preset's)."""
    key = ".".join(str(p) for p in loc)

    def covers(k: str) -> bool:
        return bool(key) and (key == k or key.startswith(k + "."))

    for k, (opt, _) in given.items():
        if covers(k):
            return opt
    for item in reversed(sets):
        if covers(item.split("=", 1)[0].strip()):
            return f"--set {item}"
    cur: Any = file_d
    for part in loc:
        if isinstance(cur, dict) and str(part) in cur:
            cur = cur[str(part)]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        else:
            break
    else:  # every part of loc is in the file (or loc is empty: the whole config)
        if path is not None:
            return str(path)
    return f"preset {preset or file_d.get('preset') or 'base'}"


def _numbers(text: str | None, kind: type, option: str) -> tuple:
    if text is None:
        return ()
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{option} {text!r}: not a comma-separated list of {'integers' if kind is int else 'numbers'}")


def probe(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="training checkpoint (.pt)"),
    data: Path | None = typer.Option(
        None, "--data", help="labelled image folder (one subfolder per class); with --labels: the image root"
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV: path, subject, one 1/0/empty column per label (multi-label protocol)"
    ),
    shots: str | None = typer.Option(None, "--shots", help="with --labels: k-shot rows, e.g. 4,8,16 (per class)"),
    fractions: str | None = typer.Option(
        None, "--fractions", help="with --labels: label-fraction rows, e.g. 0.01,0.1,1 (of the training subjects)"
    ),
    seeds: int = typer.Option(5, "--seeds", min=1, help="with --labels: draws per k-shot / fraction row"),
    test_frac: float = typer.Option(0.3, "--test-frac", help="held-out fraction (per class, or of the subjects)"),
    seed: int = typer.Option(0, "--seed", help="seed of the train/test draw"),
    encoder: str = typer.Option("ema", "--encoder", help="ema (paper) or online"),
    group_by: str = typer.Option(
        "none", "--group-by", help="keep groups whole: dir (patient folders) | REGEX on the path | none"
    ),
    split: str | None = typer.Option(
        None, "--split", help="only the subjects of this split (needs --group-by dir or REGEX)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Linear probe of a frozen encoder: AUROC per class on a held-out split (whole groups with --group-by), or
    with --labels the paper's multi-label protocol (per-label AUROC, k-shot and label fractions, by subject)."""
    if labels is not None:
        if split is not None or group_by != "none":
            fail("--labels groups images by the CSV's subject column: --group-by and --split are for --data folders")
        return _probe_labels(checkpoint, labels, data, shots, fractions, seeds, test_frac, seed, encoder, as_json)
    if data is None:
        fail("give --data DIR (one subfolder per class) or --labels CSV")
    from xwin.training.probe import run_probe

    rep = or_exit(
        run_probe, checkpoint, data, test_frac=test_frac, seed=seed, which=encoder, group_by=group_by, split=split
    )
    if as_json:
        typer.echo(json.dumps(rep))
        return
    typer.echo(f"linear probe ({rep['encoder']} encoder): {rep['n_train']} train / {rep['n_test']} test images")
    for c, a in rep["auroc"].items():
        typer.echo(f"  {c:<24s} AUROC {a:.4f}")
    typer.echo(f"  macro AUROC {rep['macro_auroc']:.4f}, accuracy {rep['accuracy']:.4f}")


def _probe_labels(
    checkpoint: Path,
    labels: Path,
    root: Path | None,
    shots: str | None,
    fractions: str | None,
    seeds: int,
    test_frac: float,
    seed: int,
    encoder: str,
    as_json: bool,
) -> None:
    from xwin.training.probe import run_probe_protocol

    k = _numbers(shots, int, "--shots")
    f = _numbers(fractions, float, "--fractions") or (1.0,)
    if any(v < 1 for v in k):
        fail(f"--shots {shots!r}: every k must be >= 1")
    if any(not 0 < v <= 1 for v in f):
        fail(f"--fractions {fractions!r}: every fraction must be in (0, 1]")
    rep = or_exit(
        run_probe_protocol, checkpoint, labels, root=root, shots=k, fractions=f, seeds=seeds, test_frac=test_frac,
        seed=seed, which=encoder,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rep))
        return
    names = rep["labels"]
    typer.echo(
        f"linear probe ({rep['encoder']} encoder), {len(names)} labels: {rep['n_train']} train images of "
        f"{rep['subjects']['train']} subjects / {rep['n_test']} test images of {rep['subjects']['test']} subjects"
    )
    rows = [("all", rep["all"])] + [(f"{x} of subjects", r) for x, r in rep["fractions"].items() if x != "1"]
    rows += [(f"{x}-shot", r) for x, r in rep["shots"].items()]
    typer.echo(f"  {'row':<18s} {'mean AUROC':>16s}  " + "  ".join(f"{c[:14]:>14s}" for c in names))
    for name, r in rows:
        m = r["mean_auroc"]
        cells = "  ".join(f"{r['auroc'][c]['mean']:>7.3f}+-{r['auroc'][c]['sd']:<5.3f}" for c in names)
        typer.echo(f"  {name:<18s} {m['mean']:>8.3f}+-{m['sd']:<6.3f}  {cells}")


def prepare_cxr(
    src: Path = typer.Argument(..., help="directory of radiographs, or a MIMIC-CXR-JPG root"),
    dst: Path = typer.Argument(..., help="where the prepared copy goes (same relative paths)"),
    size: int = typer.Option(512, "--size", help="model resolution S (square)"),
    fmt: str = typer.Option("jpeg", "--format", help="jpeg (8-bit, quality 95) | png (16-bit, lossless)"),
    workers: int = typer.Option(2, "--workers", help="processes"),
    views: str = typer.Option("AP,PA", "--views", help="MIMIC ViewPosition filter"),
    overwrite: bool = typer.Option(False, "--overwrite", help="rewrite images already prepared"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Write real radiographs at the model resolution once, so training decodes small images (RealCXRStream)."""
    from xwin.training.data.real_prepare import REPORT, prepare_real_cxr

    rep = or_exit(
        prepare_real_cxr,
        src,
        dst,
        size=size,
        fmt=fmt,
        workers=workers,
        overwrite=overwrite,
        views=tuple(v.strip() for v in views.split(",") if v.strip()),
    )
    if as_json:
        typer.echo(json.dumps(rep))
        return
    typer.echo(
        f"{rep['images']} images: {rep['written']} written, {rep['kept']} already there, "
        f"{rep['skipped']} skipped {rep['skip_reasons']} (report: {dst / REPORT})"
    )
