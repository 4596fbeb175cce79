"""``segnode train`` and ``segnode export``: the command-line face of training and of handing a
trained network to other runtimes (``segnode evaluate`` is the workers' command: it scores configured
segmenters too).

``train_command`` and ``export_command`` are plain click commands that node/cli.py mounts on the
``segnode`` group; ``cli`` groups them for ``python -m segmenters.cli``. Logging is configured by
whoever starts the process, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from segmenters import datasets
from segmenters.data_options import DATA_OPTION, SHAPE_OPTION, LazyChoice, load_data, parse_shape
from segmenters.datasets import DATA_HELP


def _architectures() -> list[str]:
    from segmenters.networks import ARCHITECTURES

    return sorted(ARCHITECTURES)


def _losses() -> tuple[str, ...]:
    from segmenters.training import LOSSES

    return LOSSES


def _formats() -> tuple[str, ...]:
    from segmenters.served.export import FORMATS

    return FORMATS


@click.command(
    "train",
    help="Train a segmentation network: a 2D/2.5D one on slices, or the 3D V-Net (--arch vnet) on "
    "patches of --patch voxels (the model card records the size; inference slides windows of it).\n\n"
    "The cases are split by patient into training, validation and test (70/15/15 %, by --seed; "
    "split.json in --out lists them). Writes model.pt, model_card.json, history.csv, loss.png and "
    "dice_miou.png to --out; then scores the best epoch's model on the test cases as "
    "`segnode evaluate` does, prints the table, writes test_metrics.csv and records the summary in "
    "the model card (test_metrics).\n\n" + DATA_HELP,
)
@DATA_OPTION
@click.option(
    "--arch",
    default="unet",
    show_default=True,
    type=LazyChoice(_architectures),
    help="an architecture of segmenters.networks (vnet is 3D)",
)
@click.option("--width", default=16, show_default=True, type=int)
@click.option(
    "--epochs", default=30, show_default=True, type=int, help="at most; early stopping may end sooner"
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--loss", default="ce", show_default=True, type=LazyChoice(_losses))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--demo", is_flag=True, help="mark the model as a demo model (always so for synthetic data)")
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=int,
    help="slices (2D) or patches (3D) per step; on a CPU a 3D network wants fewer, such as 2",
)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--patience", default=10, show_default=True, type=int)
@click.option(
    "--context",
    default=1,
    show_default=True,
    type=int,
    help="2.5D neighbours on each side (2D networks; a 3D one sees them in its patch)",
)
@click.option(
    "--patch",
    default="32x96x96",
    show_default=True,
    help="3D networks: training patch and sliding window, SLICESxROWSxCOLUMNS, multiples of 16",
)
@click.option(
    "--pixel-spacing", default=1.0, show_default=True, type=float, help="in-plane mm to resample to"
)
@click.option(
    "--crop",
    default=384,
    show_default=True,
    type=int,
    help="square crop/pad size in pixels (3D: the patches are cut from it)",
)
@click.option("--flip-lr", is_flag=True, help="add left-right flips (labels of paired organs swapped)")
@click.option("--no-augment", is_flag=True)
@click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch's default)")
@click.option("--device", default="auto", show_default=True)
@SHAPE_OPTION
@click.option("--quiet", is_flag=True, help="no progress bars")
def train_command(
    data: str,
    arch: str,
    width: int,
    epochs: int,
    out_dir: Path,
    loss: str,
    seed: int,
    demo: bool,
    batch_size: int,
    lr: float,
    patience: int,
    context: int,
    patch: str,
    pixel_spacing: float,
    crop: int,
    flip_lr: bool,
    no_augment: bool,
    threads: int,
    device: str,
    synthetic_shape: str,
    quiet: bool,
) -> None:
    import torch

    from segmenters import evaluation, synthetic, training

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        config = training.TrainConfig(
            architecture=arch,
            width=width,
            max_epochs=epochs,
            loss=loss,
            seed=seed,
            demo=demo or data.startswith("synthetic:"),
            batch_size=batch_size,
            learning_rate=lr,
            patience=patience,
            context_slices=context,
            patch_size=parse_shape(patch, "--patch"),
            pixel_spacing_mm=pixel_spacing,
            crop_size=crop,
            flip_lr=flip_lr,
            augment=not no_augment,
            device=device,
            data_description=data,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    cases = load_data(data, seed, synthetic_shape)
    if len(cases) < 3:
        raise click.BadParameter("need at least 3 cases (training, validation, test)", param_hint="--data")
    train_ids, val_ids, test_ids = datasets.split_cases([c.case_id for c in cases], seed)
    found = datasets.by_id(cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "split.json").write_text(
        json.dumps({"train": train_ids, "val": val_ids, "test": test_ids}, indent=2)
    )
    present = {name.lower() for c in cases for name in c.label_names.values()}
    structures = [s for s in synthetic.THORAX_STRUCTURES if s.name.lower() in present]
    result = training.train(
        [found[i] for i in train_ids],
        [found[i] for i in val_ids],
        structures,
        config,
        out_dir,
        progress=not quiet,
    )
    best = result.history[result.best_epoch - 1]
    click.echo(
        f"best epoch {result.best_epoch}: val loss {best.val_loss:.4f}, Dice {best.val_dice:.3f}, "
        f"mIoU {best.val_miou:.3f}{' (stopped early)' if result.stopped_early else ''}; "
        f"wrote {result.checkpoint}"
    )
    if not test_ids:  # split_cases leaves none only below 3 cases, which are refused above
        click.echo("no test cases in the split: the model is not scored on unseen cases")
        return
    rows = training.score_test(result.checkpoint, [found[i] for i in test_ids], device=device)
    if not rows:
        click.echo("the test cases' references name none of the model's structures: nothing to score")
        return
    scores = evaluation.summary(rows)
    click.echo(evaluation.comparison_table(rows))
    click.echo(
        f"test ({len(test_ids)} cases): Dice {scores['dice']:.3f}, mIoU {scores['miou']:.3f}, "
        f"HD95 {scores['hd95_mm']:.2f} mm; rows in {out_dir / 'test_metrics.csv'}"
    )


@click.command(
    "export",
    help="Export a checkpoint `segnode train` made as TorchScript, ONNX (needs the onnx extra) or a "
    "MONAI bundle, with the model_card.json that serving it needs, into the folder OUT. A rule "
    "serves the export by declaring it: segmenters: {NAME: {torchscript: OUT/model.ts}} (onnx: "
    "OUT/model.onnx; monai_bundle: OUT).",
)
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", required=True, type=LazyChoice(_formats))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
def export_command(checkpoint: Path, fmt: str, out: Path) -> None:
    from segmenters.served.export import export

    try:
        written = export(checkpoint, fmt, out)
    except (ValueError, ImportError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {written}")


@click.group()
def cli() -> None:
    """Training and evaluation of segnode's segmenters."""


cli.add_command(train_command)
cli.add_command(export_command)

if __name__ == "__main__":
    cli()
