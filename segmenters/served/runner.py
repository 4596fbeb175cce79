"""One way to run a network on a series, whatever format it came in: the series is turned into the
orientation and pixel spacing its card names, the network runs a batch of slices (or a sliding
window) at a time, and the labels come back to the series' own grid, voxel for voxel."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from segmenters.base import AlgorithmInfo, Concept, Structure, Volume
from segmenters.networks.inference import predict_volume
from segmenters.orientation import to_codes
from segmenters.served.card import ServedCard

log = logging.getLogger(__name__)

ARTIFICIAL_INTELLIGENCE = Concept("123110", "Artificial Intelligence", "DCM")  # CID 7162


def choose_device(requested: str = "auto") -> torch.device:
    """CUDA when asked or available (CUDA_VISIBLE_DEVICES picks the card), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class ServedSegmenter:
    """A loaded network and its card behind the :class:`~segmenters.base.Segmenter` interface.

    Built once per worker process; ``amp`` applies on a GPU only (bfloat16 where the card has it).
    """

    def __init__(
        self,
        model: nn.Module,
        card: ServedCard,
        *,
        device: torch.device,
        amp: bool = True,
        batch_size: int = 8,
    ) -> None:
        self.model, self.card, self.device = model, card, device
        self.amp = amp and device.type == "cuda"
        self.batch_size = batch_size

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(
            name=self.card.display_name, version=self.card.version, family=ARTIFICIAL_INTELLIGENCE
        )

    @property
    def structures(self) -> Sequence[Structure]:
        return self.card.structures

    def predict(self, volume: Volume) -> np.ndarray:
        hu, spacing, back = to_codes(volume, self.card.orientation)
        return back(self._predict_oriented(hu, spacing))

    def _predict_oriented(self, hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        zoom = _zoom_factors(spacing, self.card.spacing_mm)
        if zoom is None:
            resampled = hu
        elif zoom[0] == 1.0:  # in-plane only, a slice at a time
            resampled = _resample_slices(hu, (zoom[1], zoom[2]), order=1)
        else:
            resampled = ndimage.zoom(hu.astype(np.float32), zoom, order=1)
        labels = predict_volume(
            self.model,
            resampled,
            window=self.card.window,
            context_slices=self.card.context_slices,
            batch_size=self.batch_size,
            device=self.device,
            amp=self.amp,
            patch_size=self.card.patch_size if self.card.spatial_dims == 3 else None,
            multiple=self.card.multiple,
        )
        if zoom is None:
            return labels
        if zoom[0] == 1.0:
            return _resample_labels(labels, hu.shape)
        return _fit_volume(labels, hu.shape)


def _zoom_factors(
    spacing: tuple[float, float, float], target_mm: tuple[float, float, float] | None
) -> tuple[float, float, float] | None:
    """Per-axis zoom from ``spacing`` to ``target_mm`` (0: keep the axis); None when every axis is
    within 2 %, and an axis within 2 % keeps its size."""
    if target_mm is None:
        return None
    zoom = [have / want if want > 0 else 1.0 for have, want in zip(spacing, target_mm, strict=True)]
    zoom = [1.0 if abs(z - 1) < 0.02 else z for z in zoom]
    return None if zoom == [1.0, 1.0, 1.0] else (zoom[0], zoom[1], zoom[2])


def _resample_slices(hu: np.ndarray, zoom: tuple[float, float], order: int) -> np.ndarray:
    """Resample in-plane, slice by slice, so memory stays one output volume plus one slice."""
    first = ndimage.zoom(hu[0].astype(np.float32), zoom, order=order)
    out = np.empty((hu.shape[0], *first.shape), dtype=np.float32)
    out[0] = first
    for k in range(1, hu.shape[0]):
        out[k] = ndimage.zoom(hu[k].astype(np.float32), zoom, order=order)
    return out


def _resample_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour back to the series grid, slice by slice."""
    out = np.empty(shape, dtype=np.uint8)
    zy, zx = shape[1] / labels.shape[1], shape[2] / labels.shape[2]
    for k in range(shape[0]):
        resized = ndimage.zoom(labels[k], (zy, zx), order=0)
        out[k] = resized[: shape[1], : shape[2]] if resized.shape == shape[1:] else _fit(resized, shape[1:])
    return out


def _fit_volume(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour back to the series grid in all three axes."""
    zoom = [want / have for want, have in zip(shape, labels.shape, strict=True)]
    resized = ndimage.zoom(labels, zoom, order=0)
    fitted = np.zeros(shape, dtype=np.uint8)
    common = tuple(slice(0, min(a, b)) for a, b in zip(shape, resized.shape, strict=True))
    fitted[common] = resized[common]
    return fitted


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    fitted = np.zeros(shape, dtype=image.dtype)
    h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    fitted[:h, :w] = image[:h, :w]
    return fitted
