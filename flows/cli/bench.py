"""``xwin bench ...``: benchmark commands, each a thin wrapper over a benchmark function of the package (imported
inside the command so ``xwin --help`` stays fast)."""

from __future__ import annotations

import json
import sys
import tempfile

import typer

from xwin.flows.cli.common import HELP_OPTIONS, XwinCommand, XwinGroup, resolve_dataset

bench_app = typer.Typer(
    add_completion=False,
    cls=XwinGroup,
    context_settings=HELP_OPTIONS,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Benchmarks (figures in docs/benchmarks.md)",
)


@bench_app.command("consumer", cls=XwinCommand)
def consumer(
    store: str | None = typer.Option(
        None,
        help="store URL, or the dataset: <store url>#<cohort>[/<spec hash>] (default: a temporary store)",
    ),
    cohort: str | None = typer.Option(None, help="cohort of the dataset (default: the store's only one)"),
    spec_hash: str | None = typer.Option(
        None, "--spec-hash", help="spec hash (or a unique prefix) when the cohort has several"
    ),
    workers: int = typer.Option(2, help="worker count reported at the top level of the JSON"),
    worker_counts: str = typer.Option("0,2,4", help="worker counts to measure"),
    samples: int = typer.Option(96, help="samples timed per configuration (after the first batch)"),
    batch_size: int = typer.Option(12, help="samples per batch"),
    image_size: int | None = typer.Option(None, help="model resolution S (default: the detector size)"),
    appearance: str = typer.Option("minmax", help="minmax | neglog | none"),
    dtype: str = typer.Option("float32", help="output image dtype: float32 (default) | float16 | bfloat16"),
    volumes: int = typer.Option(8, help="volumes in the generated store (no --store)"),
    size: int = typer.Option(512, help="detector size of the generated store (no --store)"),
    fresh: bool = typer.Option(
        True, "--fresh/--no-fresh", help="also time the stream allocating every batch afresh (no buffer reuse)"
    ),
    repeats: int = typer.Option(1, help="rounds over all configurations (rows report medians)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Samples/s and MB/s of the X-WIN stream vs a WebDataset tar of the same views (goal ratio >= 1.5)."""
    from xwin.training.data.bench import make_bench_store, run_bench
    from xwin.training.data.readers import StoreSource

    tmp = None
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="xwin-bench-")
        typer.echo(f"rendering {volumes} bench volumes ({size}² views) into {tmp.name}", err=True)
        src = make_bench_store(f"{tmp.name}/store", n_volumes=volumes, size=size)
    else:  # the one way every command names a dataset (flows/cli/common.py)
        url = resolve_dataset(store, cohort, spec_hash)[2]
        src = StoreSource.parse(url)
    counts = tuple(int(x) for x in worker_counts.split(",") if x.strip())
    try:
        res = run_bench(
            src,
            workers=counts,
            samples=samples,
            batch_size=batch_size,
            image_size=image_size,
            appearance=appearance,
            main_workers=workers,
            dtype=dtype,
            fresh_buffers=fresh,
            repeats=repeats,
            wds_dir=f"{tmp.name}/wds" if tmp is not None else None,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    typer.echo(
        f"dataset {res['dataset']}: {res['volumes']} volumes, views {res['view_shape']} {res['store_dtype']}, "
        f"S={res['image_size']}, batch {res['batch_size']}, {res['cpu_count']} CPUs"
    )
    typer.echo(
        f"{'workers':>7} {'samples/s':>10} {'MB/s':>8} {'wds samples/s':>14} {'wds MB/s':>9} {'ratio':>6}"
        f" {'fresh-buffer samples/s':>23} {'ratio':>6}"
    )
    for r in res["rows"]:
        fr = r["samples_per_s_fresh_buffers"]
        typer.echo(
            f"{r['workers']:>7} {r['samples_per_s']:>10.1f} {r['mb_per_s']:>8.1f} "
            f"{r['baseline_samples_per_s']:>14.1f} {r['baseline_mb_per_s']:>9.1f} {r['ratio']:>6.2f}"
            + (f" {fr:>23.1f} {r['ratio_fresh_buffers']:>6.2f}" if fr is not None else "")
        )
    typer.echo(
        f"ViT-B/16 @512² on one H100 consumes ~{res['gpu_need_samples_per_s']:.0f} samples/s; "
        f"best here {res['keeps_up_ratio']:.2f}x that"
    )


def consumer_main() -> None:
    """Entry for ``bench/bench_consumer.py``: the same command without the ``xwin bench`` prefix."""
    typer.main.get_command(bench_app)(["consumer", *sys.argv[1:]])
