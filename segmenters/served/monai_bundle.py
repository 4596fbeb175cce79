"""MONAI bundles: a folder with ``configs/inference.json`` (or .yaml), ``configs/metadata.json`` and
``models/model.pt``, read through MONAI's own ConfigParser.

The network is the bundle's ``network_def`` with its weights. Its input is what the bundle's
preprocessing makes: the orientation of ``Orientationd``, the spacing of ``Spacingd``, the window of
``ScaleIntensityRanged``, the window size of a ``SlidingWindowInferer``. Those transforms are
reproduced by the node's own runner (one loader for every kind); a bundle whose preprocessing does
something else is refused by name rather than run with the wrong input. Labels come from the
metadata's ``channel_def``, coded through the anatomy table, or from a ``model_card.json`` in the
bundle (which also gives a 2.5D network's neighbour slices, something a bundle cannot say).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from segmenters.base import Structure
from segmenters.orientation import CANONICAL_CODES
from segmenters.served.card import (
    CARD_FILE,
    ModelCardError,
    ServedCard,
    check_orientation,
    read_bundle_labels,
    structures_from_names,
)

# Transforms that only load the file or change its type: nothing for the node to reproduce.
_NEUTRAL = {
    "LoadImaged",
    "LoadImage",
    "EnsureChannelFirstd",
    "EnsureChannelFirst",
    "EnsureTyped",
    "EnsureType",
    "CastToTyped",
    "CastToType",
    "ToTensord",
    "ToTensor",
}


def _config_file(folder: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        path = folder / "configs" / name
        if path.is_file():
            return path
    raise ModelCardError(f"MONAI bundle {folder}: no configs/inference.json (or .yaml)")


def _parser(folder: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(_config_file(folder)))
    metadata = folder / "configs" / "metadata.json"
    if metadata.is_file():
        parser.read_meta(str(metadata))
    parser["bundle_root"] = str(folder)
    return parser


def read_bundle_card(folder: Path, name: str) -> ServedCard:
    """The card of the bundle at ``folder``, from its inference config and metadata (labels from a
    ``model_card.json`` in the folder when it has one)."""
    if not folder.is_dir():
        raise ModelCardError(f"MONAI bundle {folder} is not a folder")
    parser = _parser(folder)
    network = parser.get("network_def")
    if not isinstance(network, dict):
        raise ModelCardError(f"MONAI bundle {folder}: its inference config has no network_def")
    window, orientation, spacing = _preprocessing(parser, folder)
    patch = None
    inferer = parser.get("inferer")
    if isinstance(inferer, dict) and "roi_size" in inferer:
        patch = tuple(int(v) for v in _parsed(parser, "inferer#roi_size", inferer["roi_size"]))
    # A network that slides a 3D window is 3D; network_def may say so itself (MONAI's nets do).
    declared = network.get("spatial_dims")
    spatial_dims = (
        int(_parsed(parser, "network_def#spatial_dims", declared)) if declared else 2 + (patch is not None)
    )
    if spatial_dims == 3 and (patch is None or len(patch) != 3):
        raise ModelCardError(
            f"MONAI bundle {folder}: a 3D network needs a SlidingWindowInferer with roi_size"
        )
    card_path = folder / CARD_FILE
    # A card in the bundle codes the labels and says what MONAI's config cannot: 2.5D context, and
    # that a model is a demo (said in every SEG it makes).
    if card_path.is_file():
        structures, context_slices, demo = read_bundle_labels(card_path)
    else:
        structures, context_slices, demo = _channel_structures(parser, folder), 0, False
    return ServedCard(
        name=str(parser.get("_meta_#name", name)),
        version=str(parser.get("_meta_#version", "1")),
        demo=demo,
        structures=structures,
        window=window,
        spacing_mm=spacing,
        context_slices=context_slices,
        spatial_dims=spatial_dims,
        multiple=16,
        patch_size=(patch[0], patch[1], patch[2]) if spatial_dims == 3 and patch else None,
        orientation=orientation,
    )


def load_bundle_network(folder: Path, device: torch.device) -> nn.Module:
    """The bundle's ``network_def`` with the weights of ``models/model.pt``, on ``device``."""
    parser = _parser(folder)
    network: nn.Module = parser.get_parsed_content("network_def")
    weights = folder / "models" / "model.pt"
    if not weights.is_file():
        raise ModelCardError(f"MONAI bundle {folder}: no models/model.pt")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return network.to(device).eval()


def _parsed(parser: Any, key: str, raw: Any) -> Any:
    """A config value, with MONAI's references (``@x``, ``$expr``) resolved when it has them."""
    if isinstance(raw, str) and raw[:1] in "@$%":
        return parser.get_parsed_content(key)
    return raw


def _preprocessing(
    parser: Any, folder: Path
) -> tuple[tuple[float, float], str, tuple[float, float, float] | None]:
    transforms = parser.get("preprocessing#transforms")
    if not isinstance(transforms, list):
        raise ModelCardError(f"MONAI bundle {folder}: no preprocessing transforms in its inference config")
    window: tuple[float, float] | None = None
    orientation = CANONICAL_CODES
    spacing: tuple[float, float, float] | None = None
    for i, transform in enumerate(transforms):
        target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]

        def value(field: str, t: dict[str, Any] = transform, i: int = i) -> Any:
            return _parsed(parser, f"preprocessing#transforms#{i}#{field}", t[field])

        if target in _NEUTRAL:
            continue
        if target in ("Orientationd", "Orientation"):
            orientation = check_orientation(str(value("axcodes")))
        elif target in ("Spacingd", "Spacing"):
            pixdim = [max(float(v), 0.0) for v in value("pixdim")]  # MONAI: <= 0 keeps the axis
            if len(pixdim) != 3:
                raise ModelCardError(f"MONAI bundle {folder}: Spacingd pixdim must give three spacings")
            spacing = (pixdim[0], pixdim[1], pixdim[2])
        elif target in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            if (
                float(value("b_min")) != 0.0
                or float(value("b_max")) != 1.0
                or not transform.get("clip", False)
            ):
                raise ModelCardError(
                    f"MONAI bundle {folder}: ScaleIntensityRanged must map to [0, 1] with clip true"
                )
            window = (float(value("a_min")), float(value("a_max")))
        else:
            raise ModelCardError(
                f"MONAI bundle {folder}: preprocessing transform {target} is not one the node reproduces "
                "(it reproduces Orientationd, Spacingd and ScaleIntensityRanged)"
            )
    if window is None:
        raise ModelCardError(f"MONAI bundle {folder}: no ScaleIntensityRanged gives the intensity window")
    return window, orientation, spacing


def _channel_structures(parser: Any, folder: Path) -> tuple[Structure, ...]:
    channels = parser.get("_meta_#network_data_format#outputs#pred#channel_def")
    if not isinstance(channels, dict):
        raise ModelCardError(
            f"MONAI bundle {folder}: its metadata has no outputs.pred.channel_def naming the labels; "
            f'put a {CARD_FILE} with "labels" in the bundle'
        )
    names = {int(value): str(name) for value, name in channels.items() if int(value) != 0}
    return structures_from_names(names, f"MONAI bundle {folder}", None)
