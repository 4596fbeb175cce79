"""TotalSegmentator (the optional ``totalsegmentator`` extra) through its Python API.

A task's classes come from TotalSegmentator's own registry and are coded by the SNOMED CT mapping it
publishes with the package, so every segment of its SEG is coded. Its weights are downloaded by
TotalSegmentator's own command to the folder its configuration names (TOTALSEG_HOME_DIR); a worker
never downloads: absent weights are an error that says how to get them.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from segmenters.base import AlgorithmInfo, Concept, Structure, Volume
from segmenters.orientation import to_canonical
from segmenters.served.card import ModelCardError
from segmenters.served.runner import ARTIFICIAL_INTELLIGENCE
from segmenters.volume_files import nifti_affine

log = logging.getLogger(__name__)


def _api() -> Any:
    try:
        import totalsegmentator
    except ImportError as err:
        raise ImportError(
            "serving TotalSegmentator needs it installed: pip install 'segnode[totalsegmentator]'"
        ) from err
    return totalsegmentator


def published_codes() -> dict[str, Structure]:
    """TotalSegmentator's SNOMED CT mapping (its resources/totalsegmentator_snomed_mapping.csv),
    by class name, as structures with label 0 (a task gives the values)."""
    table = importlib.resources.files(_api()) / "resources" / "totalsegmentator_snomed_mapping.csv"
    found = {}
    for row in csv.DictReader(table.read_text().splitlines()):
        category = Concept(
            row["SegmentedPropertyCategoryCodeSequence.CodeValue"],
            row["SegmentedPropertyCategoryCodeSequence.CodeMeaning"],
            row["SegmentedPropertyCategoryCodeSequence.CodingSchemeDesignator"],
        )
        type_ = Concept(
            row["SegmentedPropertyTypeCodeSequence.CodeValue"],
            row["SegmentedPropertyTypeCodeSequence.CodeMeaning"],
            row["SegmentedPropertyTypeCodeSequence.CodingSchemeDesignator"],
        )
        modifier = row["SegmentedPropertyTypeModifierCodeSequence.CodeValue"]
        laterality = (
            Concept(
                modifier,
                row["SegmentedPropertyTypeModifierCodeSequence.CodeMeaning"],
                row["SegmentedPropertyTypeModifierCodeSequence.CodingSchemeDesignator"],
            )
            if modifier
            else None
        )
        rgb = (
            tuple(int(v) for v in row["DicomRGBColor"].split(","))
            if row["DicomRGBColor"]
            else (255, 255, 255)
        )
        name = row["Structure"]
        found[name] = Structure(0, name, category, type_, laterality, (rgb[0], rgb[1], rgb[2]))
    return found


def task_structures(task: str, roi_subset: Sequence[str] | None = None) -> tuple[Structure, ...]:
    """The coded structures ``task`` labels (only ``roi_subset`` when given); ModelCardError for an
    unknown or MR task, an unknown class, or a class the published mapping does not code."""
    from totalsegmentator import registry

    try:
        classes: dict[int, str] = registry.get_task_classes(task)
    except KeyError as err:
        raise ModelCardError(f"TotalSegmentator has no task {task!r}") from err
    if registry.task_modality(task) != "CT":
        raise ModelCardError(f"TotalSegmentator task {task!r} is for MR images; the node serves CT")
    if roi_subset:
        unknown = sorted(set(roi_subset) - set(classes.values()))
        if unknown:
            raise ModelCardError(f"TotalSegmentator task {task!r} has no class {', '.join(unknown)}")
        classes = {value: name for value, name in classes.items() if name in roi_subset}
    codes = published_codes()
    uncoded = [name for name in classes.values() if name not in codes]
    if uncoded:
        raise ModelCardError(
            f"TotalSegmentator task {task!r}: no published code for {', '.join(sorted(uncoded))}; "
            "choose a roi_subset without them"
        )
    return tuple(
        Structure(
            value, name, codes[name].category, codes[name].type, codes[name].laterality, codes[name].rgb
        )
        for value, name in sorted(classes.items())
    )


# The models TotalSegmentator runs first to crop a CT (to a roi_subset, or as a task's config asks):
# its 6 mm "total" model, the 3 mm one for a robust crop, its body model for the trunk or extremities.
CROP_MODEL, ROBUST_CROP_MODEL, BODY_CROP_MODEL = 298, 297, 300


def needed_weights(task: str, fast: bool = False, roi_subset: bool = False) -> list[int]:
    """The datasets TotalSegmentator loads for ``task`` (its crop model included), decided as its
    ``totalsegmentator()`` decides them, from its own task configuration."""
    from totalsegmentator.python_api import get_task_config

    try:
        config = get_task_config(task, fast=fast, quiet=True)
    except SystemExit as err:  # its way of saying a licensed task has no license here
        raise ModelCardError(
            f"TotalSegmentator task {task!r} needs a license: set it on the worker with "
            "`totalseg_set_license -l KEY` (free for non-commercial use: "
            "https://backend.totalsegmentator.com/license-academic/)"
        ) from err
    ids = config.get("task_id", [])
    ids = list(ids) if isinstance(ids, list) else [ids]
    crop, crop_model = config.get("crop"), config.get("crop_model")
    if crop is None and not roi_subset and not config.get("cascade"):
        return ids
    if crop_model is not None:
        return ids + needed_weights(crop_model)
    mr = task.endswith("_mr")
    if crop is not None and ("body_trunc" in crop or "body_extremities" in crop):
        return [*ids, BODY_CROP_MODEL]
    if config.get("robust_crop") or mr:
        return [*ids, 852 if mr else ROBUST_CROP_MODEL]
    return [*ids, CROP_MODEL]


def missing_weights(task: str, fast: bool = False, roi_subset: bool = False) -> tuple[Path, list[int]]:
    """The weights folder TotalSegmentator reads and the datasets it would download for ``task``,
    each looked for where TotalSegmentator looks."""
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    folder = Path(get_weights_dir())

    def present(task_id: int) -> bool:
        info = TASK_ID_WEIGHTS_CONFIGS.get(task_id, {})
        return (folder / info.get("rel_path", "") / info.get("foldername", f"Dataset{task_id}")).exists()

    return folder, [i for i in dict.fromkeys(needed_weights(task, fast, roi_subset)) if not present(i)]


def check_weights(task: str, fast: bool = False, roi_subset: bool = False) -> None:
    folder, missing = missing_weights(task, fast, roi_subset)
    if missing:
        crops = [i for i in missing if i in (CROP_MODEL, ROBUST_CROP_MODEL, BODY_CROP_MODEL, 852)]
        crop = f" ({', '.join(map(str, crops))}: the model that crops the CT first)" if crops else ""
        raise ModelCardError(
            f"TotalSegmentator's weights for task {task!r} are not in {folder} (datasets "
            f"{', '.join(map(str, missing))}{crop}): run `totalseg_download_weights -t {task}` "
            f"{'and `-t total_fast` ' if crop and task not in ('total', 'total_fast') else ''}"
            "on a machine with internet access and copy that "
            "folder here, or set TOTALSEG_HOME_DIR in the worker's environment to a folder that has them"
        )


def _no_usage_reports() -> None:
    """TotalSegmentator posts each run to its authors' server unless its config says not to: a
    node in a hospital network sends nothing out (and waits on no firewall for it). Its notice
    that it sends them is marked shown, so no worker log says it does."""
    from totalsegmentator.config import set_config_key, setup_totalseg

    try:
        config = setup_totalseg()
        if config.get("send_usage_stats", True):
            set_config_key("send_usage_stats", False)
        if not config.get("statistics_disclaimer_shown"):
            set_config_key("statistics_disclaimer_shown", True)
    except OSError as err:  # a read-only weights folder: said, and the job goes on
        log.warning("TotalSegmentator's usage reports could not be turned off (%s)", err.strerror or err)


class TotalSegmentatorSegmenter:
    """A TotalSegmentator task, its weights loaded by TotalSegmentator on each call."""

    def __init__(
        self, task: str, *, roi_subset: Sequence[str] | None = None, fast: bool = False, device: torch.device
    ) -> None:
        _api()
        self.task, self.roi_subset, self.fast = task, list(roi_subset) if roi_subset else None, fast
        self._structures = task_structures(task, roi_subset)
        check_weights(task, fast, bool(self.roi_subset))
        _no_usage_reports()
        self.device = "gpu" if device.type == "cuda" else "cpu"
        self.version = importlib.metadata.version("TotalSegmentator")

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(f"TotalSegmentator {self.task}", self.version, ARTIFICIAL_INTELLIGENCE)

    @property
    def structures(self) -> Sequence[Structure]:
        return self._structures

    def predict(self, volume: Volume) -> np.ndarray:
        from totalsegmentator.python_api import totalsegmentator

        canonical, restore = to_canonical(volume)
        # NIfTI indexes (column, row, slice); TotalSegmentator reorients it itself and answers on the
        # grid it was given.
        image = nib.Nifti1Image(
            canonical.hu.transpose(2, 1, 0).astype(np.int16), nifti_affine(canonical, (0, 0, 0))
        )
        result = totalsegmentator(
            image,
            None,
            task=self.task,
            roi_subset=self.roi_subset,
            fast=self.fast,
            ml=True,
            quiet=True,
            device=self.device,
        )
        labels = np.asarray(result.dataobj, dtype=np.uint8).transpose(2, 1, 0)
        return restore(np.ascontiguousarray(labels))
