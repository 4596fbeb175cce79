"""nnU-Net v2 trained-model folders (the optional ``nnunet`` extra), run by nnunetv2's own predictor.

nnU-Net preprocesses by its plans (resampling to its spacing, its normalisation) and undoes them on
the way out, so the node hands it the series as an array with its spacing and gets labels on the
same grid. What nnU-Net cannot know is the orientation its training images had (it never reorients):
SPL, the DICOM order, unless the model's card says otherwise. Labels are named in the folder's
dataset.json and coded by the anatomy table, or by a ``model_card.json`` in the folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmenters.base import AlgorithmInfo, Structure, Volume
from segmenters.orientation import CANONICAL_CODES, to_codes
from segmenters.served.card import CARD_FILE, ModelCardError, check_orientation, structures_from_names
from segmenters.served.runner import ARTIFICIAL_INTELLIGENCE

log = logging.getLogger(__name__)


def nnunet_labels(folder: Path, card: Path | None = None) -> tuple[tuple[Structure, ...], str]:
    """The coded structures and the input orientation of the model in ``folder``; ModelCardError
    if a label has no code or the folder is not an nnU-Net v2 trained model."""
    dataset_file = folder / "dataset.json"
    if not (folder / "plans.json").is_file() or not dataset_file.is_file():
        raise ModelCardError(
            f"nnU-Net model {folder}: no plans.json and dataset.json; is it a trained-model folder?"
        )
    labels: dict[str, Any] = json.loads(dataset_file.read_text()).get("labels", {})
    names = {}
    for name, value in labels.items():
        if name == "ignore":  # nnU-Net's label for unannotated voxels: never in its output
            continue
        if isinstance(value, list):
            raise ModelCardError(
                f"nnU-Net model {folder}: label {name!r} is a region; region-based models are not served"
            )
        if int(value) != 0:
            names[int(value)] = name
    card = card if card is not None else folder / CARD_FILE
    orientation = CANONICAL_CODES
    if card.is_file():
        orientation = check_orientation(str(json.loads(card.read_text()).get("orientation", CANONICAL_CODES)))
    structures = structures_from_names(names, f"nnU-Net model {folder}", card)
    uncoded = sorted(set(names) - {s.label for s in structures})
    if uncoded:  # found now, not in the first SEG the model's output cannot describe
        raise ModelCardError(
            f"nnU-Net model {folder}: {card.name} codes no label {', '.join(map(str, uncoded))} "
            f"({', '.join(names[v] for v in uncoded)}), which its dataset.json lists"
        )
    return structures, orientation


def _trained_folds(folder: Path, checkpoint_name: str) -> list[int | str]:
    """Every fold of ``folder`` that holds ``checkpoint_name`` (fold_all included)."""
    found: list[int | str] = []
    for fold in sorted(folder.glob("fold_*")):
        if (fold / checkpoint_name).is_file():
            name = fold.name.removeprefix("fold_")
            found.append(int(name) if name.isdigit() else name)
    if not found:
        raise ModelCardError(f"nnU-Net model {folder}: no fold_* folder holds {checkpoint_name}")
    return found


def check_folds(folder: Path, folds: Sequence[int | str] | None, checkpoint_name: str) -> None:
    """Raise ModelCardError unless every fold asked for (or, with none, some fold) is trained."""
    trained = _trained_folds(folder, checkpoint_name)
    missing = [fold for fold in folds or () if fold not in trained]
    if missing:
        raise ModelCardError(
            f"nnU-Net model {folder}: fold(s) {', '.join(map(str, missing))} hold no {checkpoint_name}; "
            f"trained: {', '.join(map(str, trained))}"
        )


class NnUNetSegmenter:
    """An nnU-Net v2 model loaded once (every fold asked for; nnU-Net averages them)."""

    def __init__(
        self,
        folder: Path,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint_name: str = "checkpoint_final.pth",
        card: Path | None = None,
        device: torch.device,
    ) -> None:
        try:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        except ImportError as err:
            raise ImportError(
                "serving an nnU-Net model needs nnunetv2: pip install 'segnode[nnunet]'"
            ) from err
        self._structures, self.orientation = nnunet_labels(folder, card)
        self.predictor = nnUNetPredictor(
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        folds = list(folds) if folds else _trained_folds(folder, checkpoint_name)
        self.predictor.initialize_from_trained_model_folder(
            str(folder), use_folds=tuple(folds), checkpoint_name=checkpoint_name
        )
        # nnU-Net names a model folder TRAINER__PLANS__CONFIGURATION inside its dataset's folder.
        trainer_plans, _, configuration = folder.name.rpartition("__")
        self.name = f"nnU-Net {folder.parent.name} {configuration}"[:64]  # DICOM LO: 64 characters
        self.version = (trainer_plans or "1")[:64]
        log.info("loaded %s (folds %s) on %s", self.name, ", ".join(map(str, folds)), device)

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(name=self.name, version=self.version, family=ARTIFICIAL_INTELLIGENCE)

    @property
    def structures(self) -> Sequence[Structure]:
        return self._structures

    def predict(self, volume: Volume) -> np.ndarray:
        hu, spacing, back = to_codes(volume, self.orientation)
        labels = self.predictor.predict_single_npy_array(
            hu[None].astype(np.float32), {"spacing": list(spacing)}, None, None, False
        )
        return back(np.asarray(labels, dtype=np.uint8))
