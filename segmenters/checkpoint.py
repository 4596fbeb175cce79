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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from segmenters.base import Concept, Structure
from segmenters.networks import ARCHITECTURES, build_network
from segmenters.served.card import ServedCard
from segmenters.served.runner import ServedSegmenter, choose_device

log = logging.getLogger(__name__)

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

    def served(self) -> ServedCard:
        """What serving this network needs to know (the same card for its TorchScript or ONNX export)."""
        spec = ARCHITECTURES[self.architecture]
        return ServedCard(
            name=self.name,
            version=self.version,
            structures=self.structures,
            window=self.window,
            spacing_mm=None
            if self.pixel_spacing_mm is None
            else (0.0, self.pixel_spacing_mm, self.pixel_spacing_mm),
            context_slices=self.context_slices,
            spatial_dims=spec.spatial_dims,
            multiple=spec.multiple,
            patch_size=(self.patch_size or (64, 128, 128)) if spec.spatial_dims == 3 else None,
            demo=self.demo,
        )


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


class NetworkSegmenter(ServedSegmenter):
    """A checkpoint ``segnode train`` wrote, served: loaded once (a worker keeps it for every job)
    and run like any served network (``segmenters.served.runner``), its card saying how."""

    def __init__(
        self, path: Path, *, device: str = "auto", amp: bool = True, batch_size: int = 8, threads: int = 0
    ) -> None:
        chosen = choose_device(device)
        if chosen.type == "cpu" and threads:
            torch.set_num_threads(threads)
        model, self.model_card = load_checkpoint(path, chosen)
        super().__init__(model, self.model_card.served(), device=chosen, amp=amp, batch_size=batch_size)
        log.info("loaded %s (%s) on %s", self.card.display_name, self.model_card.architecture, chosen)
