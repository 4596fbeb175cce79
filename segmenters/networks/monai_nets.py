"""The U-Net family and V-Net, from MONAI, sized by one ``width``.

MONAI is imported when a network is built, not when this package is, so listing the architectures
costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def unet(in_channels: int, num_classes: int, width: int, dropout: float) -> nn.Module:
    """U-Net (Ronneberger et al., 2015) with MONAI's residual units; four strided downsamplings."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(width * 2**i for i in range(5)),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        dropout=dropout,
    )


def attention_unet(in_channels: int, num_classes: int, width: int, dropout: float) -> nn.Module:
    """Attention U-Net (Oktay et al., 2018): skip connections gated by the coarser level's features."""
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(width * 2**i for i in range(5)),
        strides=(2, 2, 2, 2),
        dropout=dropout,
    )


class _LastOutput(nn.Module):
    """Returns the final head of a network that returns a list of heads (deep supervision)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.net(x)
        return outputs[-1]


def unet_plus_plus(in_channels: int, num_classes: int, width: int, dropout: float) -> nn.Module:
    """UNet++ (Zhou et al., 2018): nested, densely connected skip pathways; MONAI's default features
    at width 32."""
    from monai.networks.nets import BasicUNetPlusPlus

    net = BasicUNetPlusPlus(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        features=(width, width, 2 * width, 4 * width, 8 * width, width),
        dropout=dropout,
    )
    return _LastOutput(net)


class VNet(nn.Module):
    """V-Net (Milletari et al., 2016) built from MONAI's V-Net blocks with a variable base width.

    MONAI's ``VNet`` fixes 16 channels at full resolution; this one has ``width // 2``, so the default
    width 32 is exactly MONAI's network (same layers, same parameters) while tests can build a tiny
    one. ``dropout`` replaces MONAI's 0.5 wherever MONAI puts dropout. The base width must be a
    multiple of ``in_channels`` (the input block adds its input, repeated, to its output).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        from monai.networks.nets.vnet import DownTransition, InputTransition, OutputTransition, UpTransition

        super().__init__()
        b = width // 2
        act = ("elu", {"inplace": True})
        self.in_tr = InputTransition(3, in_channels, b, act)
        self.down_tr32 = DownTransition(3, b, 1, act)
        self.down_tr64 = DownTransition(3, 2 * b, 2, act)
        self.down_tr128 = DownTransition(3, 4 * b, 3, act, dropout_prob=dropout)
        self.down_tr256 = DownTransition(3, 8 * b, 2, act, dropout_prob=dropout)
        self.up_tr256 = UpTransition(3, 16 * b, 16 * b, 2, act, dropout_prob=(dropout, dropout))
        self.up_tr128 = UpTransition(3, 16 * b, 8 * b, 2, act, dropout_prob=(dropout, dropout))
        self.up_tr64 = UpTransition(3, 8 * b, 4 * b, 1, act, dropout_prob=(None, dropout))
        self.up_tr32 = UpTransition(3, 4 * b, 2 * b, 1, act, dropout_prob=(None, dropout))
        self.out_tr = OutputTransition(3, 2 * b, num_classes, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out16 = self.in_tr(x)
        out32 = self.down_tr32(out16)
        out64 = self.down_tr64(out32)
        out128 = self.down_tr128(out64)
        out256 = self.down_tr256(out128)
        x = self.up_tr256(out256, out128)
        x = self.up_tr128(x, out64)
        x = self.up_tr64(x, out32)
        x = self.up_tr32(x, out16)
        return self.out_tr(x)
