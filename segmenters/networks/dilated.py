"""DeepLabV3 and PSPNet, on one small dilated residual backbone.

Both keep a dense feature map at stride 8: the backbone (ResNet-18-like: a stem and four stages of
two residual blocks) strides three times, and its last two stages dilate their convolutions (2,
then 4) instead of striding further, so their receptive field keeps growing. The heads then gather
context at several scales:

- DeepLabV3 (Chen et al., 2017): atrous spatial pyramid pooling (ASPP), parallel 3 x 3 convolutions
  dilated 12, 24 and 36 (the paper's rates at output stride 8), a 1 x 1 branch and image pooling.
- PSPNet (Zhao et al., 2017): the pyramid pooling module, averages over 1, 2 x 2, 3 x 3 and 6 x 6 bins
  brought back to the map's size and concatenated with it.

Logits are upsampled bilinearly from stride 8 to the input size, so input sides must be multiples of 8.
The pooled branches have no batch norm: a 1 x 1 map of a batch of one cannot be batch-normalised in
training (torchvision's ASPP fails there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmenters.networks.layers import conv_bn_relu


class _Residual(nn.Module):
    """A basic residual block (two 3 x 3 convolutions) that may stride or dilate."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, out_channels, stride=stride, dilation=dilation),
            nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def dilated_backbone(in_channels: int, width: int) -> nn.Sequential:
    """Features of ``16 * width`` channels at stride 8."""
    w = width
    return nn.Sequential(
        conv_bn_relu(in_channels, w, stride=2),
        conv_bn_relu(w, w),
        _Residual(w, 2 * w, stride=2),
        _Residual(2 * w, 2 * w),
        _Residual(2 * w, 4 * w, stride=2),
        _Residual(4 * w, 4 * w),
        _Residual(4 * w, 8 * w, dilation=2),
        _Residual(8 * w, 8 * w, dilation=2),
        _Residual(8 * w, 16 * w, dilation=4),
        _Residual(16 * w, 16 * w, dilation=4),
    )


class ASPP(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, kernel_size=1)]
            + [conv_bn_relu(in_channels, out_channels, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            conv_bn_relu((len(rates) + 2) * out_channels, out_channels, kernel_size=1), nn.Dropout2d(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class PyramidPooling(nn.Module):
    def __init__(self, in_channels: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, in_channels // len(bins), 1),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return torch.cat([x, *pooled], dim=1)


class _Stride8Segmenter(nn.Module):
    """Backbone, context head, 1 x 1 classifier, and bilinear upsampling back to the input."""

    def __init__(self, backbone: nn.Module, head: nn.Module, head_channels: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.head(self.backbone(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3(_Stride8Segmenter):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        head = nn.Sequential(
            ASPP(16 * width, 8 * width, (12, 24, 36), dropout), conv_bn_relu(8 * width, 8 * width)
        )
        super().__init__(dilated_backbone(in_channels, width), head, 8 * width, num_classes)


class PSPNet(_Stride8Segmenter):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        head = nn.Sequential(
            PyramidPooling(16 * width, (1, 2, 3, 6)),
            conv_bn_relu(32 * width, 8 * width),
            nn.Dropout2d(dropout),
        )
        super().__init__(dilated_backbone(in_channels, width), head, 8 * width, num_classes)
