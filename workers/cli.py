"""``segnode worker``: a worker process alone (production: one per GPU, Redis, PostgreSQL); and
``segnode segment``: the worker's pipeline on one series folder, offline."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from node.core.commands import settings_of
from node.core.config import Output
from node.db.engine import SchemaOutOfDateError

OUTPUTS: tuple[str, ...] = get_args(Output)


@click.command("worker")
@click.option("--name", default="segnode@%h", show_default=True, help="Celery node name of this worker.")
@click.pass_context
def worker_command(ctx: click.Context, name: str) -> None:
    """Run a worker alone (production: one per GPU, Redis broker, PostgreSQL database)."""
    from workers.celery_app import run_worker  # Celery and torch load only when a worker runs

    try:
        run_worker(settings_of(ctx), name)
    except SchemaOutOfDateError as err:
        raise click.ClickException(str(err)) from err


@click.command("segment")
@click.argument("series_folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--segmenter", "name", default="classical", show_default=True, help="Installed or configured.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--outputs",
    default="seg",
    show_default=True,
    help="Comma-separated, as a rule's: seg, rtstruct, sr, overlay.",
)
@click.pass_context
def segment_command(ctx: click.Context, series_folder: Path, name: str, out: Path, outputs: str) -> None:
    """Run a segmenter on the CT series in SERIES_FOLDER offline, as a worker would: the results
    in OUT (seg.dcm, ...) and the label map as OUT/labels.nii.gz, to check a model before a rule
    routes series to it."""
    from segmenters.registry import UnknownSegmenterError
    from workers.errors import ProcessingFailedError, SeriesRejectedError
    from workers.pipeline import segment_series
    from workers.segmenter_factory import build_segmenter
    from workers.tasks import TRANSFER_SYNTAXES

    settings = settings_of(ctx)
    wanted = [o.strip() for o in outputs.split(",") if o.strip()]
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown or not wanted:
        raise click.BadParameter(
            f"expected some of {', '.join(OUTPUTS)}; got {outputs!r}", param_hint="--outputs"
        )
    try:
        segmenter = build_segmenter(name, settings)
    except (UnknownSegmenterError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
    paths = sorted(p for p in series_folder.rglob("*") if p.is_file())
    try:
        result = segment_series(
            paths,
            segmenter,
            out,
            transfer_syntax=TRANSFER_SYNTAXES[settings.worker.seg_transfer_syntax],
            outputs=wanted,
            fast_overlap=settings.worker.seg_fast_overlap,
            label_nifti=out / "labels.nii.gz",
        )
    except (SeriesRejectedError, ProcessingFailedError) as err:
        raise click.ClickException(str(err)) from err
    timing = ", ".join(f"{step} {seconds:.2f} s" for step, seconds in result.seconds.items())
    click.echo(f"{result.segments} segment(s) ({timing}): {', '.join(wanted)} and labels.nii.gz in {out}")
