"""SegNet (Badrinarayanan, Kendall and Cipolla, 2017), small.

An encoder of convolution stages, each ending in a 2 x 2 max pooling that records where each
maximum came from; the decoder mirrors it and upsamples with those indices (max unpooling), which
puts features back where they were found without learning an upsampling. The original has five
stages of VGG-16; here four, with (2, 2, 3, 3) convolutions, and dropout after the two deepest
stages on each side, where Bayesian SegNet puts it. Any input of at least 16 x 16 works: each
unpooling restores the size its pooling saw, odd ones included.
"""

from __future__ import annotations

import torch
from torch import nn

from segmenters.networks.layers import conv_bn_relu

_DEPTHS = (2, 2, 3, 3)


class SegNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for i, (c, depth) in enumerate(zip(channels, _DEPTHS, strict=True)):
            layers = [conv_bn_relu(previous if j == 0 else c, c) for j in range(depth)]
            self.encoders.append(nn.Sequential(*layers, *([nn.Dropout2d(dropout)] if i >= 2 else [])))
            previous = c
        self.decoders = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c, out = channels[i], channels[max(i - 1, 0)]
            layers = [conv_bn_relu(c, c if j < _DEPTHS[i] - 1 else out) for j in range(_DEPTHS[i])]
            self.decoders.append(nn.Sequential(*layers, *([nn.Dropout2d(dropout)] if i >= 2 else [])))
        self.classifier = nn.Conv2d(channels[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trail: list[tuple[torch.Tensor, list[int]]] = []
        for encoder in self.encoders:
            x = encoder(x)
            size = list(x.shape[-2:])
            x, indices = self.pool(x)
            trail.append((indices, size))
        for decoder, (indices, size) in zip(self.decoders, reversed(trail), strict=True):
            x = decoder(self.unpool(x, indices, output_size=size))
        return self.classifier(x)
