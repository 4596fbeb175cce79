"""A checkpoint ``segnode train`` made, exported for other runtimes: TorchScript, ONNX, or a MONAI
bundle, each with the model card that serving it needs (``model_card.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from segmenters.checkpoint import ModelCard, load_checkpoint
from segmenters.networks import ARCHITECTURES, TrainsOnInstances
from segmenters.served.card import CARD_FILE, card_to_json

FORMATS = ("torchscript", "onnx", "monai_bundle")
_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def export(checkpoint: Path, fmt: str, out: Path) -> Path:
    """Write ``checkpoint``'s network in format ``fmt`` into the folder ``out``; returns the model's
    path (the bundle folder for a bundle)."""
    if fmt not in FORMATS:
        raise ValueError(f"no export format {fmt!r}; formats: {', '.join(FORMATS)}")
    model, card = load_checkpoint(checkpoint)
    if isinstance(model, TrainsOnInstances):
        raise ValueError(
            f"{card.architecture} is a detector with Python post-processing: serve its checkpoint"
        )
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "monai_bundle":
        return _bundle(checkpoint, model, card, out)
    example = _example_input(card)
    path = out / _FILES[fmt]
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, example), str(path))
    else:
        _onnx(model, example, path, card)
    (out / CARD_FILE).write_text(card_to_json(card.served()))
    return path


def _example_input(card: ModelCard) -> torch.Tensor:
    if card.patch_size is not None:
        return torch.zeros(1, 1, *card.patch_size)
    return torch.zeros(1, card.in_channels, 64, 64)


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, card: ModelCard) -> None:
    """torch's exporter (torch.export based); slices of any size the architecture takes, any batch."""
    multiple = ARCHITECTURES[card.architecture].multiple
    shape: dict[int, object] = {0: torch.export.Dim("batch")}
    if example.ndim == 4:
        shape |= {2: multiple * torch.export.Dim("rows"), 3: multiple * torch.export.Dim("columns")}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=(shape,),
        dynamo=True,
        external_data=False,  # one file with its weights, as the card beside it expects (under 2 GB)
        verbose=False,
    )


def _bundle(checkpoint: Path, model: torch.nn.Module, card: ModelCard, out: Path) -> Path:
    """A bundle whose network_def rebuilds the architecture through segnode's own constructor."""
    served = card.served()
    (out / "configs").mkdir(exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "models" / "model.pt")
    transforms: list[dict[str, object]] = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": served.orientation},
    ]
    if served.spacing_mm is not None:  # 0 keeps an axis, as MONAI's Spacingd does for values <= 0
        pixdim = list(served.spacing_mm)
        transforms.append({"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"})
    transforms.append(
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": card.window[0],
            "a_max": card.window[1],
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    )
    inference: dict[str, object] = {
        "imports": ["$import segmenters.networks"],
        "network_def": {
            "_target_": "segmenters.networks.build_network",
            "name": card.architecture,
            "in_channels": card.in_channels,
            "num_classes": card.num_classes,
            "width": card.width,
        },
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
    }
    if served.patch_size is not None:
        inference["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": list(served.patch_size)}
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    metadata = {
        "name": card.name,
        "version": card.version,
        "description": f"{card.display_name}, exported by segnode from {checkpoint.name}",
        "network_data_format": {
            "outputs": {
                "pred": {
                    "channel_def": {"0": "background", **{str(s.label): s.name for s in card.structures}}
                }
            }
        },
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (out / CARD_FILE).write_text(card_to_json(served))  # the structures' codes and colours
    return out
