"""FCN (Long, Shelhamer and Darrell, 2015), small and with batch normalisation.

A convolutional encoder, then a coarse class-score map brought back to the input resolution by
transposed convolutions that are summed with score maps of shallower stages (the skip fusion of
FCN-8s). The original has five poolings and fuses strides 32 -> 16 -> 8; here the encoder pools four
times, like the other 2D networks of this package, so the fusion runs 16 -> 8 -> 4 and a last
transposed convolution goes from stride 4 to 1. The classifier layers of the original (fc6, fc7)
become convolutions with dropout. Input sides must be multiples of 16.
"""

from __future__ import annotations

import torch
from torch import nn

from segmenters.networks.layers import conv_bn_relu


def _upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A learnable ``factor`` x upsampling, started as bilinear interpolation as in the FCN paper."""
    kernel = 2 * factor
    up = nn.ConvTranspose2d(channels, channels, kernel, stride=factor, padding=factor // 2, bias=False)
    centre = (kernel - 1) / 2
    ramp = 1 - (torch.arange(kernel, dtype=torch.float32) - centre).abs() / factor
    with torch.no_grad():
        up.weight.zero_()
        for c in range(channels):
            up.weight[c, c] = ramp[:, None] * ramp[None, :]
    return up


class FCN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.stages.append(nn.Sequential(conv_bn_relu(previous, c), conv_bn_relu(c, c), nn.MaxPool2d(2)))
            previous = c
        self.classifier = nn.Sequential(  # fc6 and fc7 of the original, as convolutions
            conv_bn_relu(channels[3], 16 * width, kernel_size=3),
            nn.Dropout2d(dropout),
            conv_bn_relu(16 * width, 16 * width, kernel_size=1),
            nn.Dropout2d(dropout),
        )
        self.score16 = nn.Conv2d(16 * width, num_classes, 1)
        self.score8 = nn.Conv2d(channels[2], num_classes, 1)
        self.score4 = nn.Conv2d(channels[1], num_classes, 1)
        self.up16 = _upsampler(num_classes, 2)
        self.up8 = _upsampler(num_classes, 2)
        self.up4 = _upsampler(num_classes, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)  # strides 2, 4, 8, 16
        score = self.up16(self.score16(self.classifier(features[3]))) + self.score8(features[2])
        score = self.up8(score) + self.score4(features[1])
        return self.up4(score)
