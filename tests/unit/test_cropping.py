"""A segmenter cropped to the body: the box, the labels kept, the labels cleared, what the SEG says.

Phantoms with a wide field of view (600 mm, twice the thorax) have a lot of air and a CT couch
around the patient, which is where cropping pays and where a network's false positives lie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from segmenters.base import AlgorithmInfo, Concept, Segmenter, Structure, Volume
from segmenters.classical import body_mask
from segmenters.cropping import ALGORITHM_NAME_MAX, BodyCroppedSegmenter, crop_box, cropped_name
from segmenters.metrics import dice_iou
from segmenters.registry import create
from segmenters.synthetic import BODY, LEFT_LUNG, RIGHT_LUNG, THORAX_STRUCTURES, Phantom, make_phantom

MARGIN_MM = 40.0
SPACING = (8.0, 3.0, 3.0)


class Threshold:
    """A segmenter with no context at all: every voxel above -500 HU is body. It labels the couch
    too, and its labels inside a crop are exactly those of the whole volume."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo("threshold", "2.1", Concept("123104", "Morphological Operations", "DCM"))

    @property
    def structures(self) -> Sequence[Structure]:
        return THORAX_STRUCTURES[:1]

    def predict(self, volume: Volume) -> np.ndarray:
        self.seen.append(volume.hu.shape)
        return (volume.hu > -500).astype(np.uint8) * np.uint8(BODY)


@pytest.fixture(scope="module")
def wide() -> Phantom:
    """A thorax in a 600 mm field: the patient fills about a quarter of it."""
    return make_phantom(shape=(32, 200, 200), spacing=SPACING, seed=4242)


@pytest.fixture(scope="module")
def demo() -> Segmenter:
    return create("demo-thorax-unet")


def couch(phantom: Phantom) -> np.ndarray:
    """Voxels denser than air outside the patient: the couch's shell."""
    return np.asarray((phantom.labels == 0) & (phantom.hu > -500))


def test_crop_box_is_the_body_and_its_margin_not_the_air_or_couch(wide: Phantom) -> None:
    body = body_mask(wide.volume())
    np.testing.assert_array_equal(body, wide.labels > 0)  # the outline, without the couch
    box = crop_box(body, SPACING, MARGIN_MM)
    assert box is not None
    patient = np.nonzero(wide.labels)
    for axis, (cut, step) in enumerate(zip(box, SPACING, strict=True)):
        grow = int(np.ceil(MARGIN_MM / step))
        assert cut.start == max(int(patient[axis].min()) - grow, 0)
        assert cut.stop == min(int(patient[axis].max()) + 1 + grow, wide.hu.shape[axis])
    size = np.prod([cut.stop - cut.start for cut in box])
    assert size < 0.4 * wide.hu.size  # in-plane 100 x 142 of 200 x 200; all 32 slices
    # The couch lies just under the back, within the margin: the box holds part of it.
    inside = np.zeros(wide.hu.shape, bool)
    inside[box] = True
    assert (couch(wide) & inside).any() and (couch(wide) & ~inside).any()


def test_crop_box_rounds_the_margin_up_and_stays_in_the_array() -> None:
    mask = np.zeros((10, 20, 30), bool)
    mask[5, 3, 20:25] = True
    assert crop_box(mask, (2.0, 1.0, 0.7), 2.5) == (slice(3, 8), slice(0, 7), slice(16, 29))
    assert crop_box(mask, (2.0, 1.0, 0.7), 0.0) == (slice(5, 6), slice(3, 4), slice(20, 25))
    assert crop_box(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0), 5.0) is None
    with pytest.raises(ValueError, match="negative"):
        crop_box(mask, (1.0, 1.0, 1.0), -1.0)


def test_labels_inside_the_body_are_the_segmenters_and_outside_are_cleared(wide: Phantom) -> None:
    inner = Threshold()
    volume = wide.volume()
    bare = inner.predict(volume)
    labels = BodyCroppedSegmenter(inner, MARGIN_MM).predict(volume)
    body = wide.labels > 0
    assert labels.shape == volume.hu.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[body], bare[body])
    assert not labels[~body].any()
    assert bare[couch(wide)].all()  # the bare segmenter labels the couch; cropped, it does not
    assert inner.seen[-1] == (32, 100, 142)  # it ran on the box only


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_demo_network_cropped_agrees_with_it_inside_the_body(demo: Segmenter) -> None:
    # The field the demo network was trained on (384 mm), so the bare network is at its best here.
    # A network sees where its image ends, so the agreement is close, not exact (0.99 measured).
    phantom = make_phantom(shape=(32, 128, 128), spacing=SPACING, seed=4242)
    bare = demo.predict(phantom.volume())
    labels = BodyCroppedSegmenter(demo, MARGIN_MM).predict(phantom.volume())
    body = phantom.labels > 0
    assert np.mean(labels[body] == bare[body]) > 0.98
    assert not labels[~body].any()


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_demo_network_labels_in_the_air_are_removed(wide: Phantom, demo: Segmenter) -> None:
    # On a field wider than it was trained on the bare demo network labels air as lung.
    volume = wide.volume()
    body = wide.labels > 0
    bare = demo.predict(volume)
    assert np.count_nonzero(bare[~body]) > 1000
    labels = BodyCroppedSegmenter(demo, MARGIN_MM).predict(volume)
    assert not labels[~body].any()
    for lung in (RIGHT_LUNG, LEFT_LUNG):
        dice, _ = dice_iou(labels == lung, wide.labels == lung)
        assert dice > 0.95, (lung, dice)


def test_a_volume_without_a_body_gives_an_empty_map_without_running_the_segmenter() -> None:
    inner = Threshold()
    air = Volume(np.full((6, 40, 40), -1000, np.int16), (5.0, 2.0, 2.0))
    labels = BodyCroppedSegmenter(inner).predict(air)
    assert labels.shape == (6, 40, 40) and not labels.any()
    assert inner.seen == []


def test_the_seg_names_the_combination_with_the_networks_version_and_structures(demo: Segmenter) -> None:
    cropped = BodyCroppedSegmenter(demo)
    assert isinstance(cropped, Segmenter)
    assert cropped.algorithm == AlgorithmInfo(
        "segnode-demo-thorax-unet (demo model) (body-cropped)",
        demo.algorithm.version,
        demo.algorithm.family,
        demo.algorithm.kind,
    )
    assert list(cropped.structures) == list(demo.structures)


def test_a_long_name_is_shortened_to_fit_the_seg_but_keeps_the_suffix() -> None:
    name = cropped_name("x" * 60)
    assert len(name) == ALGORITHM_NAME_MAX and name.endswith(" (body-cropped)")
    assert cropped_name("net") == "net (body-cropped)"
    with pytest.raises(ValueError, match="negative"):
        BodyCroppedSegmenter(Threshold(), -5.0)
