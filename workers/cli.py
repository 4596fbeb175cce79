"""``segnode worker``: a worker process alone (production: one per GPU, Redis, PostgreSQL);
``segnode segment``: the worker's pipeline on one series folder, offline; and ``segnode evaluate``:
segmenters scored on reference cases, built as a worker builds them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

import click

from node.core.commands import settings_of
from node.core.config import Output
from node.core.queue import QUEUES
from node.db.engine import SchemaOutOfDateError
from segmenters.data_options import DATA_OPTION, EVAL_SEED, SHAPE_OPTION, load_data
from segmenters.datasets import DATA_HELP, is_ct_image

log = logging.getLogger(__name__)


def _model_fault(what: str, err: Exception) -> click.ClickException:
    """A fault the model or its files raised (a card that does not fit its network, a file torch
    cannot read, a device this machine lacks) as one line; ``segnode -v`` logs the traceback."""
    log.debug("%s", what, exc_info=err)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # TorchScript's errors quote the scripted code first and say what went wrong last.
    last = lines[-1] if lines else ""
    kind = type(err).__name__
    return click.ClickException(f"{what}: {last if last.startswith(kind + ':') else f'{kind}: {last}'}")


OUTPUTS: tuple[str, ...] = get_args(Output)


@click.command("worker")
@click.option("--name", default="segnode@%h", show_default=True, help="Celery node name of this worker.")
@click.option(
    "--queues",
    default=",".join(QUEUES),
    show_default=True,
    help="The kinds of work it takes: segment-gpu (networks), segment-cpu (the rest), deliver.",
)
@click.pass_context
def worker_command(ctx: click.Context, name: str, queues: str) -> None:
    """Run a worker alone (production: one per GPU, Redis broker, PostgreSQL database)."""
    from workers.celery_app import run_worker  # Celery and torch load only when a worker runs

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - set(QUEUES))
    if unknown or not wanted:
        raise click.BadParameter(f"{', '.join(unknown) or 'none'}: the queues are {', '.join(QUEUES)}")
    try:
        run_worker(settings_of(ctx), name, wanted)
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
    except Exception as err:  # whatever the model's own code raises, said in one line
        raise _model_fault(f"segmenter {name} could not be loaded", err) from err
    # A folder as archives export a study: the CT images, whatever else (RTSTRUCT, SEG) lies beside.
    paths = sorted(p for p in series_folder.rglob("*") if p.is_file() and is_ct_image(p))
    if not paths:
        raise click.ClickException(f"no CT images in {series_folder}")
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
    except Exception as err:  # whatever the model's own code raises, said in one line
        raise _model_fault(f"segmenter {name} failed on the series", err) from err
    timing = ", ".join(f"{step} {seconds:.2f} s" for step, seconds in result.seconds.items())
    click.echo(f"{result.segments} segment(s) ({timing}): {', '.join(wanted)} and labels.nii.gz in {out}")


@click.command(
    "evaluate",
    help="Score segmenters on reference cases and print a table comparing them side by side; "
    "per-case rows go to --out (CSV: segmenter, case, structure, dice, iou, hd95_mm, msd_mm). "
    "SEGMENTERS are names a worker knows (classical, demo-thorax-unet, any the configuration "
    "declares: a crop_to_body entry, an nnU-Net folder, a TotalSegmentator task ...) or model paths "
    "(a segnode checkpoint, a .ts or .onnx file with its card, a MONAI bundle or nnU-Net folder). "
    "Structures are matched by name and scored over the whole volume, so false positives anywhere "
    "count; --reference-slices-only limits a structure to the slices its reference covers (the AAPM "
    "2017 protocol: --reference-slices-only Esophagus --reference-slices-only 'Spinal cord').\n\n"
    + DATA_HELP,
)
@click.argument("segmenters", nargs=-1, required=True)
@DATA_OPTION
@click.option("--out", "out_csv", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--device", default="auto", show_default=True, help="for model paths (configured ones say theirs)"
)
@click.option(
    "--reference-slices-only",
    "reference_slices_only",
    multiple=True,
    metavar="STRUCTURE",
    help="Score this structure (by name) only on the slices its reference covers; repeatable.",
)
@click.option(
    "--roi-names",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML: ROI_NAME: [other spellings] adds spellings to the built-in ROI table, or a structure.",
)
@click.option(
    "--exclude",
    "exclude",
    multiple=True,
    metavar="ROI:STRUCTURE[,STRUCTURE]",
    help="Score STRUCTUREs without the voxels of ROI, in reference and prediction alike (a tumour "
    "from the lungs: --exclude GTV-1:Lung_L,Lung_R); repeatable.",
)
@SHAPE_OPTION
@click.pass_context
def evaluate_command(
    ctx: click.Context,
    segmenters: tuple[str, ...],
    data: str,
    out_csv: Path,
    device: str,
    reference_slices_only: tuple[str, ...],
    roi_names: Path | None,
    exclude: tuple[str, ...],
    synthetic_shape: str,
) -> None:
    from segmenters import datasets, evaluation, registry
    from segmenters.base import Segmenter
    from workers.segmenter_factory import build_segmenter

    settings = settings_of(ctx)
    exclusions: dict[str, list[str]] = {}
    for item in exclude:
        roi, _, targets = item.partition(":")
        if not roi or not targets:
            raise click.BadParameter(
                f"expected ROI:STRUCTURE[,STRUCTURE]; got {item!r}", param_hint="--exclude"
            )
        exclusions.setdefault(roi, []).extend(t.strip() for t in targets.split(",") if t.strip())
    try:
        table = datasets.load_roi_table(roi_names)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--roi-names") from err
    known = set(settings.segmenters) | set(registry.available())

    def load(spec: str) -> Segmenter:
        if spec in known and not Path(spec).exists():
            return build_segmenter(spec, settings)
        if not Path(spec).exists():
            raise FileNotFoundError(
                f"{spec} is neither a segmenter a worker knows ({', '.join(sorted(known))}) nor a file"
            )
        return evaluation.load_segmenter(spec, device)

    cases = load_data(data, EVAL_SEED, synthetic_shape, table, exclusions)
    try:
        rows = evaluation.evaluate(
            list(segmenters),
            cases,
            out_csv,
            reference_slices_only=reference_slices_only,
            load=load,
            progress=lambda line: click.echo(line, err=True),
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise click.ClickException(str(err)) from err
    except Exception as err:  # whatever a model's own code raises, said in one line
        raise _model_fault("a segmenter could not be loaded or run", err) from err
    click.echo(evaluation.comparison_table(rows))
    click.echo(f"{len(rows)} rows written to {out_csv}")
