"""``xwin train``, ``xwin probe`` and ``xwin prepare-cxr``: the X-WIN model from the command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from xwin.flows.cli.common import or_exit


def train(
    config: Path | None = typer.Option(None, "--config", help="YAML/JSON config file (training/config.py)"),
    preset: str | None = typer.Option(None, "--preset", help="tiny (CPU) or base (the paper)"),
    store: str | None = typer.Option(None, "--store", help="store URL holding the projection dataset"),
    cohort: str | None = typer.Option(None, "--cohort", help="cohort of the dataset (default: the only one)"),
    real: str | None = typer.Option(None, "--real", help="directory of real radiographs (or 'synthetic')"),
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
    from xwin.training.config import load_config
    from xwin.training.loop import Trainer, build_streams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ov = list(overrides)
    if store:
        ov.append(f"data.store={store}")
    if cohort:
        ov.append(f"data.cohort={cohort}")
    if real:
        ov.append(f"data.real={real}")
    if synthetic:
        ov.append("data.synthetic=true")
    if max_steps is not None:
        ov.append(f"max_steps={max_steps}")
    if out is not None:
        ov.append(f"out_dir={out}")
    if device:
        ov.append(f"device={device}")
    cfg = or_exit(load_config, config, preset, ov)
    sim, real_stream = or_exit(build_streams, cfg)
    trainer = Trainer(cfg, sim, real_stream, echo=echo)
    if resume:
        path = Path(cfg.out_dir) / "checkpoints" / "latest.pt" if resume == "auto" else Path(resume)
        if path.exists():
            trainer.load(path)
        elif resume != "auto":
            typer.echo(f"error: no checkpoint {path}", err=True)
            raise typer.Exit(2)
    summary = trainer.run()
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


def probe(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="training checkpoint (.pt)"),
    data: Path = typer.Option(..., "--data", help="labelled image folder: one subfolder per class"),
    test_frac: float = typer.Option(0.3, "--test-frac", help="held-out fraction per class"),
    seed: int = typer.Option(0, "--seed"),
    encoder: str = typer.Option("ema", "--encoder", help="ema (paper) or online"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Linear probe of a frozen encoder: AUROC per class on a held-out split."""
    from xwin.training.probe import run_probe

    rep = or_exit(run_probe, checkpoint, data, test_frac=test_frac, seed=seed, which=encoder)
    if as_json:
        typer.echo(json.dumps(rep))
        return
    typer.echo(f"linear probe ({rep['encoder']} encoder): {rep['n_train']} train / {rep['n_test']} test images")
    for c, a in rep["auroc"].items():
        typer.echo(f"  {c:<24s} AUROC {a:.4f}")
    typer.echo(f"  macro AUROC {rep['macro_auroc']:.4f}, accuracy {rep['accuracy']:.4f}")


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
