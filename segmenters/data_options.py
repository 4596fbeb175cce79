"""The ``--data`` options that ``segnode train`` and ``segnode evaluate`` share, kept apart from the
commands so that the worker's command line loads without torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

from segmenters import datasets

EVAL_SEED = 10_000  # synthetic evaluation phantoms start here, far from the training seeds


class LazyChoice(click.Choice[str]):
    """A choice whose values come from a module that loads torch: read only when the command
    runs or shows its own help, so that ``segnode --help`` lists the commands without it."""

    def __init__(self, values: Callable[[], Sequence[str]]) -> None:
        self._values = values
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._values())

    @choices.setter
    def choices(self, values: Sequence[str]) -> None:
        self._values = lambda: values


def parse_shape(text: str, option: str | None = None) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(
            f"expected SLICESxROWSxCOLUMNS such as 32x128x128; got {text!r}", param_hint=option
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


def load_data(
    data: str,
    seed: int,
    synthetic_shape: str,
    roi_table: datasets.RoiTable | None = None,
    exclusions: dict[str, list[str]] | None = None,
) -> list[datasets.Case]:
    """The cases of ``--data``, a bad spec reported as that option's error."""
    try:
        return datasets.load_cases(
            data,
            default_seed=seed,
            synthetic_shape=parse_shape(synthetic_shape),
            roi_table=roi_table,
            exclusions=exclusions,
        )
    except (ValueError, FileNotFoundError) as error:
        raise click.BadParameter(str(error), param_hint="--data") from error


DATA_OPTION = click.option(
    "--data", required=True, help="synthetic:N[@SEED] | nifti:FOLDER | dicom-rtstruct:FOLDER"
)
SHAPE_OPTION = click.option(
    "--synthetic-shape", default="32x128x128", show_default=True, help="phantom grid for synthetic:N"
)
