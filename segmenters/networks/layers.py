"""Small pieces the hand-written networks share, and the helpers every caller of a network needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(
    in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """A 2D convolution (no bias: batch norm follows), batch norm and ReLU; "same" padding."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """The number of parameters (weights and biases; batch-norm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def pad_to_multiple(x: torch.Tensor, m: int, *, value: float = 0.0) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial dimensions of ``x`` (every one after batch and channel) up to multiples of ``m``.

    Padding goes at the end of each dimension (bottom, right, last slice), so the first voxel keeps its
    index. Returns the padded tensor and the index that crops a network's output back to the input's
    size: ``model(padded)[crop]``. ``value`` fills the padding; 0 is air once CT numbers are windowed to
    [0, 1], which is what a network sees outside the patient anyway.
    """
    if m < 1:
        raise ValueError(f"the multiple must be a positive integer; got {m}")
    sizes = x.shape[2:]
    extra = [-s % m for s in sizes]
    crop = (slice(None), slice(None), *(slice(0, s) for s in sizes))
    if not any(extra):
        return x, crop
    # F.pad lists (before, after) pairs from the last dimension backwards.
    pads: list[int] = []
    for e in reversed(extra):
        pads += [0, e]
    return F.pad(x, pads, value=value), crop
