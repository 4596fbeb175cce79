"""segnode evaluate's scoring: every structure over the whole volume, so labels far from the
reference count; a slice-range restriction only for the structures the user names."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segmenters import anatomy
from segmenters.base import AlgorithmInfo, Structure, Volume
from segmenters.datasets import Case
from segmenters.evaluation import score
from segmenters.served.runner import ARTIFICIAL_INTELLIGENCE

LUNG = anatomy.structure(1, "right_lung")


class FixedSegmenter:
    """A segmenter whose answer is given: the reference plus labels on slices it does not cover."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo("fixed", "1", ARTIFICIAL_INTELLIGENCE)

    @property
    def structures(self) -> Sequence[Structure]:
        return [LUNG]

    def predict(self, volume: Volume) -> np.ndarray:
        assert volume.hu.shape == self.labels.shape
        return self.labels


def _case() -> Case:
    labels = np.zeros((30, 32, 32), dtype=np.uint8)
    labels[10:20, 8:24, 8:24] = 1  # the reference covers slices 10..19
    hu = np.where(labels > 0, -800, 40).astype(np.int16)
    return Case("c", hu, labels, (2.0, 1.0, 1.0), {1: "Right lung"}, {1: (10, 20)})


def test_false_positives_far_outside_the_references_slices_are_penalised() -> None:
    case = _case()
    predicted = case.labels.copy()
    predicted[0:10, 8:24, 8:24] = 1  # as much again, on slices the reference never reaches
    segmenter = FixedSegmenter(predicted)

    (whole,) = score(segmenter, case, "fixed")
    assert whole.structure == "Right lung"
    assert abs(whole.dice - 2 / 3) < 1e-6  # 2 x 2,560 / (5,120 + 2,560)
    assert whole.hd95_mm > 10.0  # the extra block lies up to 20 mm from the reference

    (restricted,) = score(segmenter, case, "fixed", reference_slices_only=["RIGHT LUNG"])
    assert restricted.dice == 1.0 and restricted.hd95_mm == 0.0


def test_a_perfect_prediction_scores_one_either_way() -> None:
    case = _case()
    segmenter = FixedSegmenter(case.labels.copy())
    for restrict in ([], ["Right lung"]):
        (row,) = score(segmenter, case, "fixed", reference_slices_only=restrict)
        assert (row.dice, row.iou, row.hd95_mm) == (1.0, 1.0, 0.0)
