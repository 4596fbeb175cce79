"""A segmenter run on the patient only: the classical body outline crops the volume first.

A scanner's field of view often holds far more air, couch and blankets than patient: a 500 mm
reconstruction of a slim patient, an arm-raised chest. A network spends its time there and, having
never been taught what a couch is, now and then labels part of one. :class:`BodyCroppedSegmenter`
wraps any segmenter (a trained network, as a rule): it finds the body with the classical
segmenter's outline (:func:`segmenters.classical.body_mask`, thresholds and morphology, a fraction
of a second per 100 slices), runs the wrapped segmenter on the body's bounding box plus a margin
only, and puts its labels back into a full-size map with everything outside the body set to
background.

Outside the *body*, not merely outside the box: the couch and blankets lie right under the back,
inside any useful margin, and they are where the false positives are. Every structure a
segmenter labels is anatomy, so inside the skin; the outline is the one the classical segmenter's
"Body" label uses, on the full-resolution CT numbers.

The margin is there for the network's sake: it should see the skin with air around it, as in
training, not an image cut at the skin. A network is not blind to where its image ends (padding,
receptive field), so inside the body the cropped prediction is close to the bare one, not equal.
Measured with the demo U-Net on two 32 x 128 x 128 phantoms (the 384 mm field it was trained on),
the share of body voxels labelled alike was 0.82-0.99 with margins of 0-30 mm and 0.99 from 40 mm,
hence the default. On wider fields (600 mm at 200 x 200, 500 mm at 512 x 512) the bare demo
network labels 10^5 voxels of air as lung; cropped, none, and its lung Dice rises from 0.48-0.86
to 0.97-0.99.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from segmenters.base import AlgorithmInfo, Segmenter, Structure, Volume
from segmenters.classical import body_mask

log = logging.getLogger(__name__)

DEFAULT_MARGIN_MM = 40.0  # see the module's note on the margin
NAME_SUFFIX = " (body-cropped)"
ALGORITHM_NAME_MAX = 64  # Algorithm Name is LO: at most 64 characters


def crop_box(body: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...] | None:
    """The bounding box of ``body`` grown by ``margin_mm`` along each axis (whole voxels, rounded
    up, kept inside the array), or None when ``body`` is empty."""
    if margin_mm < 0:
        raise ValueError(f"the margin must not be negative; got {margin_mm} mm")
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(body.any(axis=others))
        if present.size == 0:
            return None
        grow = math.ceil(margin_mm / spacing[axis])
        box.append(slice(max(int(present[0]) - grow, 0), min(int(present[-1]) + 1 + grow, body.shape[axis])))
    return tuple(box)


def cropped_name(name: str) -> str:
    """``name`` with the crop made visible, within the 64 characters a SEG's Algorithm Name holds:
    a long name is shortened, never the suffix."""
    room = ALGORITHM_NAME_MAX - len(NAME_SUFFIX)
    return (name if len(name) <= room else name[:room].rstrip()) + NAME_SUFFIX


class BodyCroppedSegmenter:
    """``inner`` run on the body's bounding box only, labels kept inside the body only.

    The SEG still says what made the labels: the inner segmenter's version, algorithm family and
    structures (its model card's labels and codes) pass through unchanged, and the name gains
    " (body-cropped)", so a reader sees the combination and the output UIDs (derived from the
    name) differ from those of the bare network on the same series.
    """

    def __init__(self, inner: Segmenter, margin_mm: float = DEFAULT_MARGIN_MM) -> None:
        if margin_mm < 0:
            raise ValueError(f"the margin must not be negative; got {margin_mm} mm")
        self.inner = inner
        self.margin_mm = margin_mm

    @property
    def algorithm(self) -> AlgorithmInfo:
        inner = self.inner.algorithm
        return AlgorithmInfo(
            name=cropped_name(inner.name), version=inner.version, family=inner.family, kind=inner.kind
        )

    @property
    def structures(self) -> Sequence[Structure]:
        return self.inner.structures

    def predict(self, volume: Volume) -> np.ndarray:
        body = body_mask(volume)
        out = np.zeros(volume.hu.shape, dtype=np.uint8)
        box = crop_box(body, volume.spacing, self.margin_mm)
        if box is None:
            log.info("no body in the volume; %s not run", self.inner.algorithm.name)
            return out
        # A view, not a copy: the box of a long series can be most of it, in float32.
        cropped = Volume(volume.hu[box], volume.spacing, volume.axes_lps)
        log.debug(
            "cropped to the body: %s of %s voxels (%.0f%%)",
            "x".join(map(str, cropped.hu.shape)),
            "x".join(map(str, volume.hu.shape)),
            100.0 * cropped.hu.size / volume.hu.size,
        )
        labels = self.inner.predict(cropped)
        if labels.shape != cropped.hu.shape:
            raise ValueError(
                f"{self.inner.algorithm.name} returned a label map of shape {labels.shape} "
                f"for a volume of shape {cropped.hu.shape}"
            )
        out[box] = np.where(body[box], labels, np.uint8(0))
        return out
