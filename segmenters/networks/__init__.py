"""The network architectures the CT-segmentation literature compares, behind one constructor.

``build_network`` returns an untrained module mapping images (2D slices, or 3D patches for the
V-Net) to class logits at the input's resolution; ``width`` scales every layer, so tests build tiny
models. MONAI's networks where it has them, torchvision's Mask R-CNN (trained by its own losses:
``TrainsOnInstances``), the others written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from segmenters.networks.dilated import DeepLabV3, PSPNet
from segmenters.networks.fcn import FCN
from segmenters.networks.layers import count_parameters, pad_to_multiple
from segmenters.networks.mask_rcnn import MaskRCNNSegmenter
from segmenters.networks.monai_nets import VNet, attention_unet, unet, unet_plus_plus
from segmenters.networks.segnet import SegNet

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "TrainsOnInstances",
    "UnknownArchitectureError",
    "build_network",
    "count_parameters",
    "pad_to_multiple",
]

Builder = Callable[[int, int, int, float], nn.Module]  # (in_channels, num_classes, width, dropout)


@dataclass(frozen=True)
class ArchSpec:
    """What a caller needs to know about an architecture before building it."""

    name: str
    spatial_dims: int  # 2: slices (N, C, H, W); 3: patches (N, C, D, H, W)
    multiple: int  # every spatial size of the input must be a multiple of this
    source: str  # "segnode" (written here), "monai" or "torchvision"
    reference: str  # the paper that defines it
    builder: Builder


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("fcn", 2, 16, "segnode", "Long et al., CVPR 2015", FCN),
        ArchSpec("unet", 2, 16, "monai", "Ronneberger et al., MICCAI 2015", unet),
        ArchSpec("unetpp", 2, 16, "monai", "Zhou et al., DLMIA 2018", unet_plus_plus),
        ArchSpec("attention_unet", 2, 16, "monai", "Oktay et al., MIDL 2018", attention_unet),
        ArchSpec("vnet", 3, 16, "monai", "Milletari et al., 3DV 2016", VNet),
        # SegNet's unpooling restores any recorded size; 16 keeps every pooled map even.
        ArchSpec("segnet", 2, 16, "segnode", "Badrinarayanan et al., TPAMI 2017", SegNet),
        ArchSpec("deeplabv3", 2, 8, "segnode", "Chen et al., arXiv:1706.05587", DeepLabV3),
        ArchSpec("pspnet", 2, 8, "segnode", "Zhao et al., CVPR 2017", PSPNet),
        ArchSpec("mask_rcnn", 2, 1, "torchvision", "He et al., ICCV 2017", MaskRCNNSegmenter),
    )
}


@runtime_checkable
class TrainsOnInstances(Protocol):
    """A network trained by its own losses from the label maps (a detector), not from its logits."""

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class UnknownArchitectureError(LookupError):
    """``build_network`` was asked for a name that is not in ``ARCHITECTURES``."""


def build_network(
    name: str, in_channels: int, num_classes: int, *, width: int = 32, dropout: float = 0.1
) -> nn.Module:
    """An untrained network ``name`` (a key of ``ARCHITECTURES``) that outputs logits.

    ``num_classes`` counts the background. ``width`` is the channel count at full resolution (even,
    at least 4); ``dropout`` the probability of every dropout layer (in [0, 1)).
    """
    spec = ARCHITECTURES.get(name)
    if spec is None:
        raise UnknownArchitectureError(f"no architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if in_channels < 1:
        raise ValueError(f"a network needs at least one input channel; got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background, so it is at least 2; got {num_classes}")
    if width < 4 or width % 2:
        raise ValueError(f"width must be even and at least 4; got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout is a probability in [0, 1); got {dropout}")
    if name == "vnet" and (width // 2) % in_channels:
        raise ValueError(
            f"V-Net's base width (half of width: {width // 2}) must be a multiple of in_channels; "
            f"got {in_channels}"
        )
    return spec.builder(in_channels, num_classes, width, dropout)
