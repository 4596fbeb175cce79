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


# The model TotalSegmentator runs first to crop a CT to the classes asked for (roi_subset): its
# 6 mm "total" model, unless the task names a crop model of its own.
CROP_MODEL = 298


def missing_weights(task: str, fast: bool = False, roi_subset: bool = False) -> tuple[Path, list[int]]:
    """The weights folder TotalSegmentator reads and the datasets it would download for ``task``
    (and, with a ``roi_subset``, its crop model): each looked for where TotalSegmentator does."""
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    def ids_of(name: str) -> list[int]:
        config = TASK_CONFIGS.get(name, {})
        if "sub_modes" in config:
            config = config["sub_modes"]["fast" if fast else "default"]
        ids = config.get("task_id", [])
        return ids if isinstance(ids, list) else [ids]

    ids = ids_of(task)
    if roi_subset:
        crop = TASK_CONFIGS.get(task, {}).get("crop_model")
        ids += [CROP_MODEL] if crop is None else ids_of(crop)
    folder = Path(get_weights_dir())

    def present(task_id: int) -> bool:
        info = TASK_ID_WEIGHTS_CONFIGS.get(task_id, {})
        return (folder / info.get("rel_path", "") / info.get("foldername", f"Dataset{task_id}")).exists()

    return folder, [i for i in dict.fromkeys(ids) if not present(i)]


def check_weights(task: str, fast: bool = False, roi_subset: bool = False) -> None:
    folder, missing = missing_weights(task, fast, roi_subset)
    if missing:
        crop = f" ({CROP_MODEL}: the model that crops to the roi_subset)" if CROP_MODEL in missing else ""
        raise ModelCardError(
            f"TotalSegmentator's weights for task {task!r} are not in {folder} (datasets "
            f"{', '.join(map(str, missing))}{crop}): run `totalseg_download_weights -t {task}` "
            f"{'and `-t total_fast` ' if crop and task not in ('total', 'total_fast') else ''}"
            "on a machine with internet access and copy that "
            "folder here, or set TOTALSEG_HOME_DIR in the worker's environment to a folder that has them"
        )


def _no_usage_reports() -> None:
    """TotalSegmentator posts each run to its authors' server unless its config says not to: a
    node in a hospital network sends nothing out (and waits on no firewall for it)."""
    from totalsegmentator.config import set_config_key, setup_totalseg

    try:
        if setup_totalseg().get("send_usage_stats", True):
            set_config_key("send_usage_stats", False)
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
