"""Trained networks as segmenters: a checkpoint file plus the model card that travels inside it.

A checkpoint is one ``torch.save`` file holding plain data only (loaded with ``weights_only=True``):
the network's weights and its model card — architecture, the labels with their SNOMED CT codes, the
in-plane spacing and intensity window it was trained with (and a 3D network's patch size), a
training data summary, validation metrics and, once scored, test metrics. The card is what the
DICOM-SEG says about the algorithm, so a SEG always names the exact model that made it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from segmenters.base import AlgorithmInfo, Concept, Structure, Volume
from segmenters.networks import ARCHITECTURES, build_network
from segmenters.networks.inference import predict_volume
from segmenters.orientation import to_canonical

log = logging.getLogger(__name__)

ARTIFICIAL_INTELLIGENCE = Concept("123110", "Artificial Intelligence", "DCM")  # CID 7162
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """Everything a user and the DICOM-SEG need to know about a trained network."""

    name: str
    version: str
    architecture: str
    width: int
    context_slices: int  # 2.5D: neighbours on each side given as extra channels
    structures: tuple[Structure, ...]
    pixel_spacing_mm: float | None  # in-plane spacing the network was trained at; None: native grid
    window: tuple[float, float]  # HU mapped to [0, 1]
    demo: bool = False
    training_data: str = ""
    validation_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)  # on the held-out test cases, if scored
    # 3D: the sliding window, the patch size it was trained on (slices, rows, columns); None for 2D
    # networks and for 3D cards written before the field existed.
    patch_size: tuple[int, int, int] | None = None

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def num_classes(self) -> int:
        return max(s.label for s in self.structures) + 1

    @property
    def display_name(self) -> str:
        """The name users see: a demo model says so everywhere."""
        return f"{self.name} (demo model)" if self.demo else self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        structures = tuple(
            Structure(
                label=s["label"],
                name=s["name"],
                category=Concept(**s["category"]),
                type=Concept(**s["type"]),
                laterality=Concept(**s["laterality"]) if s.get("laterality") else None,
                rgb=tuple(s["rgb"]),
            )
            for s in data["structures"]
        )
        patch = data.get("patch_size")
        return cls(
            **{
                **data,
                "structures": structures,
                "window": tuple(data["window"]),
                "patch_size": tuple(patch) if patch is not None else None,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def save_checkpoint(path: Path, model: torch.nn.Module, card: ModelCard) -> None:
    """Write weights and card atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.part")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT_VERSION, "card": card.to_json(), "state_dict": state}, temp)
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """The network (in eval mode, on ``device``) and its card; plain data only, no pickled code."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a segnode checkpoint of format {FORMAT_VERSION}")
    card = ModelCard.from_dict(json.loads(payload["card"]))
    if card.architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown architecture {card.architecture!r}")
    model = build_network(card.architecture, card.in_channels, card.num_classes, width=card.width)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), card


def choose_device(requested: str = "auto") -> torch.device:
    """CUDA when asked or available (CUDA_VISIBLE_DEVICES picks the card), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class NetworkSegmenter:
    """A trained network behind the :class:`~segmenters.base.Segmenter` interface.

    Loaded once (a worker keeps it for every job). Inference resamples each slice to the card's
    pixel spacing, runs the network in batches of slices (sliding windows for 3D) and resamples the
    labels back to the series grid, so the label map matches the source frames one to one.
    """

    def __init__(
        self, path: Path, *, device: str = "auto", amp: bool = True, batch_size: int = 8, threads: int = 0
    ) -> None:
        self.device = choose_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.model, self.card = load_checkpoint(path, self.device)
        self.amp = amp and self.device.type == "cuda"
        self.batch_size = batch_size
        log.info("loaded %s (%s) on %s", self.card.display_name, self.card.architecture, self.device)

    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo(
            name=self.card.display_name, version=self.card.version, family=ARTIFICIAL_INTELLIGENCE
        )

    @property
    def structures(self) -> Sequence[Structure]:
        return self.card.structures

    def predict(self, volume: Volume) -> np.ndarray:
        # The network sees every series as it was trained: supine, head first, axial.
        canonical, restore = to_canonical(volume)
        return restore(self._predict_canonical(canonical))

    def _predict_canonical(self, volume: Volume) -> np.ndarray:
        spec = ARCHITECTURES[self.card.architecture]
        zoom = _zoom_factors(volume, self.card.pixel_spacing_mm)
        hu = volume.hu if zoom is None else _resample_slices(volume.hu, zoom, order=1)
        labels = predict_volume(
            self.model,
            hu,
            window=self.card.window,
            context_slices=self.card.context_slices,
            batch_size=self.batch_size,
            device=self.device,
            amp=self.amp,
            patch_size=(self.card.patch_size or (64, 128, 128)) if spec.spatial_dims == 3 else None,
            multiple=spec.multiple,
        )
        if zoom is None:
            return labels
        return _resample_labels(labels, volume.hu.shape)


def _zoom_factors(volume: Volume, target_mm: float | None) -> tuple[float, float] | None:
    if target_mm is None:
        return None
    zy, zx = volume.spacing[1] / target_mm, volume.spacing[2] / target_mm
    return None if abs(zy - 1) < 0.02 and abs(zx - 1) < 0.02 else (zy, zx)


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


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    fitted = np.zeros(shape, dtype=image.dtype)
    h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    fitted[:h, :w] = image[:h, :w]
    return fitted
