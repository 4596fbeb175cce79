"""The model card of a network served from another format (TorchScript, ONNX, a MONAI bundle).

Such a file holds no segnode metadata, so a small JSON card beside it says what the node must know:
the labels and what each is (so the SEG codes every segment), the intensity window and pixel spacing
the network was trained at, whether it sees slices or patches, and the array orientation it expects.
A label the card does not code is an error when the card is read, which `segnode config check` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from segmenters import anatomy
from segmenters.base import ANATOMICAL_STRUCTURE, Concept, Structure
from segmenters.orientation import CANONICAL_CODES

CARD_FILE = "model_card.json"  # the name `segnode train` and `segnode export` write beside a model
_AXIS_LETTERS = ("LR", "PA", "IS")


class ModelCardError(ValueError):
    """A model card that cannot serve: a missing field, an uncoded label, a bad orientation."""


@dataclass(frozen=True)
class ServedCard:
    """What the node needs to run a network it did not train and to describe its output."""

    name: str
    version: str
    structures: tuple[Structure, ...]
    window: tuple[float, float]  # HU mapped to [0, 1]
    # The voxel spacing the network expects, per array axis in ``orientation``; 0 keeps an axis as the
    # series has it (a 2D network trained at 1 mm pixels: 0, 1, 1); None keeps every axis.
    spacing_mm: tuple[float, float, float] | None = None
    context_slices: int = 0  # 2D: neighbours on each side as extra channels
    spatial_dims: int = 2  # 2: slices (N, C, H, W); 3: patches (N, 1, D, H, W)
    multiple: int = 16  # every spatial size of the input must be a multiple of this
    patch_size: tuple[int, int, int] | None = None  # 3D: the sliding window
    # The direction each array axis of the input grows towards, one letter each (R/L, A/P, S/I).
    # SPL is the DICOM orientation the node works in: slices foot to head, rows front to back,
    # columns right to left. A network trained on RAS-reoriented NIfTI arrays expects RAS.
    orientation: str = CANONICAL_CODES
    demo: bool = False

    @property
    def display_name(self) -> str:
        return f"{self.name} (demo model)" if self.demo else self.name


def card_to_json(card: ServedCard) -> str:
    structures = [
        {
            "label": s.label,
            "name": s.name,
            "type": {"value": s.type.value, "meaning": s.type.meaning, "scheme": s.type.scheme},
            **(
                {"laterality": {"value": s.laterality.value, "meaning": s.laterality.meaning}}
                if s.laterality
                else {}
            ),
            "rgb": list(s.rgb),
        }
        for s in card.structures
    ]
    data: dict[str, Any] = {
        "name": card.name,
        "version": card.version,
        "labels": structures,
        "window": list(card.window),
        "spacing_mm": list(card.spacing_mm) if card.spacing_mm else None,
        "context_slices": card.context_slices,
        "spatial_dims": card.spatial_dims,
        "multiple": card.multiple,
        "patch_size": list(card.patch_size) if card.patch_size else None,
        "orientation": card.orientation,
        "demo": card.demo,
    }
    return json.dumps(data, indent=2)


def read_card(path: Path) -> ServedCard:
    """The card at ``path``; every problem is one :class:`ModelCardError` that names the file."""
    return _read(path, _parse)


T = TypeVar("T")


def _read(path: Path, parse: Callable[[Any], T]) -> T:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ModelCardError(f"model card {path}: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise ModelCardError(f"model card {path} is not JSON: {err}") from err
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise ModelCardError(f"model card {path}: {detail}") from err


def read_labels(path: Path) -> tuple[Structure, ...]:
    """Only the ``labels`` of the card at ``path``: what a model that brings its own preprocessing
    (nnU-Net, a MONAI bundle) needs a card for."""
    return _read(path, _labels)


def read_bundle_labels(path: Path) -> tuple[tuple[Structure, ...], int, bool]:
    """A MONAI bundle's card: its labels, and what its config cannot say (2.5D context, demo)."""
    return _read(path, lambda data: (_labels(data), _context_slices(data), bool(data.get("demo", False))))


def _context_slices(data: dict[str, Any]) -> int:
    value = int(data.get("context_slices", 0))
    if value < 0:
        raise ValueError(f'"context_slices" is zero or more; got {value}')
    return value


def _labels(data: dict[str, Any]) -> tuple[Structure, ...]:
    if not isinstance(data, dict):
        raise ValueError("the card is a JSON object")
    labels = data["labels"]
    if not isinstance(labels, list) or not labels:
        raise ValueError('"labels" lists the structures: [{"label": 1, "anatomy": "heart"}, ...]')
    return tuple(_structure(entry) for entry in labels)


def _parse(data: dict[str, Any]) -> ServedCard:
    structures = _labels(data)
    values = [s.label for s in structures]
    if len(set(values)) != len(values):
        raise ValueError(f"a label value is given twice: {sorted(values)}")
    window = tuple(float(v) for v in data["window"])
    if len(window) != 2 or window[1] <= window[0]:
        raise ValueError(f'"window" is [low, high] in HU with high > low; got {data["window"]}')
    spatial_dims = int(data.get("spatial_dims", 2))
    if spatial_dims not in (2, 3):
        raise ValueError(f'"spatial_dims" is 2 (slices) or 3 (patches); got {spatial_dims}')
    patch = data.get("patch_size")
    if spatial_dims == 3 and (patch is None or len(patch) != 3):
        raise ValueError('a 3D network needs "patch_size": [slices, rows, columns]')
    pixel = data.get("pixel_spacing_mm")
    voxel = data.get("spacing_mm")
    if voxel is not None and pixel is not None:
        raise ValueError('give "pixel_spacing_mm" (in-plane only) or "spacing_mm" (every axis), not both')
    if pixel is not None:
        voxel = [0.0, pixel, pixel]
    if voxel is not None and (len(voxel) != 3 or min(float(v) for v in voxel) < 0):
        raise ValueError(f'"spacing_mm" is three spacings, one per array axis (0 keeps one); got {voxel}')
    if int(data.get("multiple", 16)) < 1:
        raise ValueError(f'"multiple" is a positive integer; got {data["multiple"]}')
    return ServedCard(
        name=str(data["name"]),
        version=str(data.get("version", "1")),
        structures=structures,
        window=(window[0], window[1]),
        spacing_mm=(float(voxel[0]), float(voxel[1]), float(voxel[2])) if voxel is not None else None,
        context_slices=_context_slices(data),
        spatial_dims=spatial_dims,
        multiple=int(data.get("multiple", 16)),
        patch_size=(int(patch[0]), int(patch[1]), int(patch[2])) if patch else None,
        orientation=check_orientation(str(data.get("orientation", CANONICAL_CODES))),
        demo=bool(data.get("demo", False)),
    )


def _structure(entry: dict[str, Any]) -> Structure:
    """A label coded by the anatomy table (``"anatomy": "heart"``) or by its own code (``"type"``)."""
    label = int(entry["label"])
    if not 1 <= label <= 255:
        raise ValueError(f"label values run from 1 to 255 (0 is the background); got {label}")
    key = entry.get("anatomy")
    if key is not None:
        if key not in anatomy.keys():
            raise ValueError(
                f"label {label}: no structure {key!r} in the anatomy table "
                f"(known: {', '.join(anatomy.keys())}); give its code instead: "
                '"type": {"value": "<SNOMED CT code>", "meaning": "<name>"}'
            )
        found = anatomy.structure(label, key)
        return Structure(
            label, entry.get("name", found.name), found.category, found.type, found.laterality, found.rgb
        )
    if "type" not in entry:
        raise ValueError(
            f'label {label} ({entry.get("name", "unnamed")}) has no code: give "anatomy" (one of '
            f'{", ".join(anatomy.keys())}) or "type": {{"value": "<SNOMED CT code>", "meaning": "<name>"}}'
        )
    type_ = Concept(**entry["type"])
    laterality = Concept(**entry["laterality"]) if entry.get("laterality") else None
    rgb = tuple(int(v) for v in entry.get("rgb", (255, 255, 255)))
    if len(rgb) != 3:
        raise ValueError(f"label {label}: rgb is three values; got {entry['rgb']}")
    return Structure(
        label, str(entry.get("name", type_.meaning)), ANATOMICAL_STRUCTURE, type_, laterality, rgb
    )


def check_orientation(codes: str) -> str:
    """``codes`` upper-cased if it names one direction per patient axis (such as SPL or RAS)."""
    codes = codes.upper()
    axes = sorted(next((i for i, pair in enumerate(_AXIS_LETTERS) if c in pair), -1) for c in codes)
    if len(codes) != 3 or axes != [0, 1, 2]:
        raise ValueError(
            f"orientation {codes!r} must give each array axis' direction, one of R/L, A/P and S/I each "
            "(SPL: the node's own, slices foot to head, rows front to back, columns right to left)"
        )
    return codes


def structures_from_names(names: dict[int, str], where: str, card: Path | None) -> tuple[Structure, ...]:
    """The coded structures of a model that names its labels (value -> name) but gives no codes:
    the ``labels`` of ``card`` when there is one, else each name looked up in the anatomy table
    (``Left lung``, ``left_lung`` and a SEG's ``Trachea and bronchi`` alike). ``where`` names the
    model in errors."""
    if card is not None and card.is_file():
        return read_labels(card)
    structures = []
    for value, name in sorted(names.items()):
        key = anatomy.key_for(name)
        if key is None:
            raise ModelCardError(
                f"{where}: label {value} {name!r} has no code in the anatomy table; give the codes in a "
                f'{CARD_FILE} ({{"labels": [{{"label": {value}, "type": {{"value": "<SNOMED CT code>", '
                '"meaning": "<name>"}}]})'
            )
        structures.append(anatomy.structure(value, key))
    return tuple(structures)
