"""``xwin train-decoder`` and ``xwin eval recon3d|domain-gap``: the 3-D loop from the model's own predictions
(X-WIN §4.4, Table 5) and the domain gap of its features (Table 4). docs/reconstruction.md, docs/training.md."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from xwin.flows import stop
from xwin.flows.cli.common import (
    HELP_OPTIONS,
    XwinCommand,
    XwinGroup,
    check_output,
    check_split,
    cli_errors,
    fail,
    load_look,
    or_exit,
    problem_line,
    resolve_dataset,
    resolve_volumes,
)

eval_app = typer.Typer(
    add_completion=False,
    cls=XwinGroup,
    context_settings=HELP_OPTIONS,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="evaluate a trained world model (recon3d, domain-gap)",
)

DatasetOpt = typer.Option(..., "--store", help="store URL, or the dataset: <store url>#<cohort>[/<spec hash>]")
CohortOpt = typer.Option(None, "--cohort", help="cohort of the dataset (default: the store's only one)")
SpecHashOpt = typer.Option(None, "--spec-hash", help="spec hash (or a unique prefix) when the cohort has several")
_ERRORS = (ValueError, FileNotFoundError, LookupError, RuntimeError)


def _ids(text: str | None) -> list[str] | None:
    if text is None:
        return None
    ids = [v.strip() for v in text.split(",") if v.strip()]
    if not ids:
        fail(f"--volumes {text!r}: no volume id")
    return ids


def _file(path: Path, option: str) -> Path:
    if not path.is_file():
        fail(f"{option} {path}: no such file")
    return path


def train_decoder_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="`xwin train` checkpoint (frozen f_theta, g_v)"),
    store: str = DatasetOpt,
    cohort: str | None = CohortOpt,
    spec_hash: str | None = SpecHashOpt,
    split: str | None = typer.Option(
        None, "--split", help="split of the stored views to train on (default: train if assigned, else all)"
    ),
    preset: str = typer.Option("base", "--preset", help="tiny (CPU) or base (codebook 1024 x 256)"),
    out: Path = typer.Option(..., "--out", help="run directory (log.jsonl, checkpoints/decoder_latest.pt)"),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="steps (default: the preset's)"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    overrides: list[str] = typer.Option([], "--set", help="decoder config override key=value (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary"),
    echo: bool = typer.Option(False, "--echo", help="also print each log line to stderr"),
    resume: str | None = typer.Option(
        None, "--resume", help="decoder checkpoint to continue, or 'auto' = OUT/checkpoints/decoder_latest.pt"
    ),
) -> None:
    """Train the VQ-GAN decoder head on a frozen world model: latent views -> projection images."""
    from pydantic import ValidationError

    from xwin.training.decoder import decoder_config, default_split, train_decoder

    _file(checkpoint, "--checkpoint")
    check_output(out, folder=True)
    st, ds, url = resolve_dataset(store, cohort, spec_hash)
    values = {"device": device} if device else {}
    try:
        cfg = decoder_config(preset, list(overrides), values)
    except ValidationError as e:
        fail(*(problem_line(f"decoder config (preset {preset})", err) for err in e.errors(include_url=False)))
    except ValueError as e:  # unknown preset, a malformed --set
        fail(str(e))
    split = split if split is not None else or_exit(default_split, url, "train")
    check_split(st, ds, split)  # a split that is missing or holds no ring: one line naming what exists
    resume_path: Path | None = None
    if resume is not None:  # 'auto' without a checkpoint starts afresh; a path that is not there is an error
        resume_path = out / "checkpoints" / "decoder_latest.pt" if resume == "auto" else Path(resume)
        if not resume_path.is_file():
            if resume != "auto":
                fail(f"--resume {resume}: no such file")
            resume_path = None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with stop.handle_signals():  # Ctrl-C / SIGTERM: the step in progress ends, the decoder is saved, exit 130/143
        s = or_exit(
            train_decoder,
            checkpoint,
            url,
            cfg,
            out,
            split=split,
            max_steps=max_steps,
            echo=echo,
            should_stop=stop.requested,
            resume=resume_path,
            errors=_ERRORS,
        )
    if s.get("stopped"):
        typer.echo(
            f"cancelled: stopped at step {s['steps']}; the decoder so far is in {s['checkpoint']} "
            "(run it again with --resume auto to continue)",
            err=True,
        )
    if as_json:
        typer.echo(json.dumps(s, default=float))
        if s.get("stopped"):
            raise typer.Exit(stop.exit_code())
        return
    ev = s["eval"]
    typer.echo(
        f"decoder trained to step {s['steps']}: L1 {ev['before']['rec_l1']:.4f} -> {ev['after']['rec_l1']:.4f} "
        f"(units of {s['value_scale']:.3g} mu*mm), codebook usage {100 * s['codebook_usage']:.1f}%, "
        f"checkpoint {s['checkpoint']}"
    )
    if s.get("stopped"):
        raise typer.Exit(stop.exit_code())


def recon3d_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="`xwin train` checkpoint"),
    decoder: Path = typer.Option(..., "--decoder", help="`xwin train-decoder` checkpoint"),
    store: str = DatasetOpt,
    cohort: str | None = CohortOpt,
    spec_hash: str | None = SpecHashOpt,
    split: str | None = typer.Option(None, "--split", help="split to evaluate (default: test if assigned)"),
    volumes: str | None = typer.Option(
        None, "--volumes", help="volume ids or unique prefixes, comma separated (default: the split)"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many volumes"),
    backend: str = typer.Option("auto", "--backend", help="FDK backend: auto | numba | rtk | astra"),
    out: Path | None = typer.Option(None, "--out", help="recon3d.json + <volume>_slices.png (default: beside DEC)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="print the rows and means as JSON"),
) -> None:
    """From the frontal view alone: predicted views over +-90 deg, decoded, FDK; PSNR/SSIM vs stored views and CT."""
    from xwin.training.eval3d import MEAN_KEYS, eval_split, run_recon3d

    _file(checkpoint, "--checkpoint")
    _file(decoder, "--decoder")
    out_dir = out if out is not None else decoder.parent / "recon3d"
    check_output(out_dir, folder=True)
    st, ds, url = resolve_dataset(store, cohort, spec_hash)
    ids = resolve_volumes(ds, _ids(volumes) or []) if volumes is not None else None
    split = or_exit(eval_split, url, split, ids)
    if ids is None:
        check_split(st, ds, split)
    s = or_exit(
        run_recon3d,
        checkpoint,
        decoder,
        url,
        split=split,
        volumes=ids,
        limit=limit,
        backend=backend,
        out_dir=out_dir,
        device=device,
        errors=_ERRORS,
    )
    if as_json:
        typer.echo(json.dumps(s, default=float))
        return
    for r in s["volumes"]:
        typer.echo(
            f"{r['volume_id']}: projections {r['projection_psnr_db']:.2f} dB / {r['projection_ssim']:.3f}, CT "
            f"{r['volume_psnr_db']:.2f} dB / {r['volume_ssim']:.3f} (oracle {r['oracle_volume_psnr_db']:.2f} dB, "
            f"autoencode {r['autoencode_volume_psnr_db']:.2f} dB), codebook usage {100 * r['codebook_usage']:.1f}%"
        )
    m = s["means"]
    typer.echo("mean: " + ", ".join(f"{k} {m[k]:.4g}" for k in MEAN_KEYS) + f" ({s['out_dir']})")


def domain_gap_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="`xwin train` checkpoint"),
    store: str = DatasetOpt,
    cohort: str | None = CohortOpt,
    spec_hash: str | None = SpecHashOpt,
    real: Path = typer.Option(..., "--real", help="directory of real radiographs (or a MIMIC-CXR-JPG root)"),
    split: str | None = typer.Option(None, "--split", help="split of the DRRs (default: test if assigned)"),
    real_split: str = typer.Option(
        "test", "--real-split", help="real images of this split's subjects (default: held-out test; all: every one)"
    ),
    volumes: str | None = typer.Option(
        None, "--volumes", help="volume ids or unique prefixes, comma separated (default: the split)"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many volumes"),
    yaws: str | None = typer.Option(None, "--yaws", help="DRR yaws in degrees (default: the training contexts)"),
    max_real: int | None = typer.Option(None, "--max-real", min=1, help="at most this many real images"),
    encoder: str = typer.Option("ema", "--encoder", help="ema (the probe's) or online"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    look: Path | None = typer.Option(
        None, "--look", help="look file (YAML/JSON): DRRs made from the rings' material bases (docs/appearance.md)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Cosine similarity and L2 distance between the feature centres of held-out DRRs and held-out real
    radiographs (the test split of both, unless --split / --volumes / --real-split say otherwise). With --look,
    the DRRs are that look's radiographs of the rings' material bases."""
    from xwin.training.eval3d import eval_split, run_domain_gap

    _file(checkpoint, "--checkpoint")
    lk = load_look(look) if look is not None else None
    st, ds, url = resolve_dataset(store, cohort, spec_hash)
    if lk is not None and not ds.spec.materials:
        fail(f"--look: the dataset {url} has no material bases (render it with a spec with materials: true)")
    ids = resolve_volumes(ds, _ids(volumes) or []) if volumes is not None else None
    split = or_exit(eval_split, url, split, ids)
    if ids is None:
        check_split(st, ds, split)
    yaw_list = None
    if yaws is not None:
        try:
            yaw_list = tuple(float(y) for y in yaws.split(",") if y.strip())
        except ValueError:
            fail(f"--yaws {yaws!r}: not a comma-separated list of degrees")
        if not yaw_list:
            fail(f"--yaws {yaws!r}: no yaw")
    s = or_exit(
        run_domain_gap,
        checkpoint,
        url,
        real,
        split=split,
        real_split=real_split,
        volumes=ids,
        limit=limit,
        yaws=yaw_list,
        max_real=max_real,
        encoder=encoder,
        device=device,
        look=lk,
        errors=_ERRORS,
    )
    if as_json:
        typer.echo(json.dumps(s, default=float))
        return
    drrs = "DRRs" if lk is None else f"radiographs ({lk.kvp:g} kVp, {lk.output})"
    typer.echo(
        f"domain gap ({s['encoder']} encoder, {s['n_simulated']} {drrs} vs {s['n_real']} real): cosine "
        f"{s['cosine_similarity']:.4f}, L2 {s['l2_distance']:.4f}"
    )


eval_app.command("recon3d", cls=XwinCommand)(cli_errors(recon3d_cmd))
eval_app.command("domain-gap", cls=XwinCommand)(cli_errors(domain_gap_cmd))
