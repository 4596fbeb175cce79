"""Whole-volume inference with a trained network, in bounded memory.

A CT series can have more than a thousand 512 x 512 slices: their logits alone would be gigabytes.
``predict_volume`` therefore never holds more than one batch (2D) or one slab (3D) of logits: CT
numbers are windowed and moved to the device a batch at a time, and each batch's argmax is written
into a preallocated uint8 label map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segmenters.networks.layers import pad_to_multiple


def predict_volume(
    model: nn.Module,
    hu: np.ndarray,
    *,
    window: tuple[float, float] = (-1000.0, 1000.0),
    context_slices: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: bool = False,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    slab_slices: int | None = None,
    multiple: int = 16,
) -> np.ndarray:
    """The label map (uint8, ``hu.shape``) that ``model`` predicts for a volume of CT numbers.

    ``hu`` is indexed (slice, row, column). CT numbers are clipped to ``window`` and scaled to [0, 1],
    the input the networks are trained on. The model is moved to ``device`` and put in eval mode for
    the call (its training flag is restored after).

    2D models (``patch_size`` None) see ``batch_size`` slices per forward pass; with
    ``context_slices`` = k each slice comes with its k neighbours on either side as channels (2.5D,
    2k + 1 channels; edge slices repeat). Slices are padded to multiples of ``multiple`` (16 suits
    every 2D network here) with air, and the padding is cropped from the logits.

    3D models (``patch_size`` = (D, H, W), each a multiple of ``multiple``) run through MONAI's
    sliding-window inference with Gaussian blending, ``batch_size`` windows per forward pass, slab by
    slab along the slices: ``slab_slices`` (by default four patch depths) at a time plus half a patch
    depth of context on either side, so memory grows with the slab, not with the series.

    ``amp`` runs the network under autocast: bfloat16 on a GPU that has it (else float16), bfloat16
    on a CPU (faster only on CPUs with bfloat16 instructions).
    """
    if hu.ndim != 3:
        raise ValueError(f"a volume is 3D (slices, rows, columns); got shape {hu.shape}")
    if window[1] <= window[0]:
        raise ValueError(f"the window's upper bound must exceed its lower bound; got {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if context_slices < 0:
        raise ValueError(f"context_slices must be zero or positive; got {context_slices}")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    out = np.empty(hu.shape, dtype=np.uint8)
    try:
        with torch.inference_mode(), _autocast(device, amp):
            if patch_size is None:
                _predict_slices(model, hu, out, window, context_slices, batch_size, device, multiple)
            else:
                if context_slices:
                    raise ValueError("context_slices is for 2D models; a 3D model sees its own context")
                patch = tuple(int(s) for s in patch_size)
                if len(patch) != 3 or any(s < 1 or s % multiple for s in patch):
                    raise ValueError(
                        f"patch_size must be three positive multiples of {multiple}; got {patch_size}"
                    )
                slab = slab_slices if slab_slices is not None else 4 * patch[0]
                if slab < 1:
                    raise ValueError(f"slab_slices must be positive; got {slab_slices}")
                _predict_slabs(model, hu, out, window, patch, batch_size, overlap, slab, device)
    finally:
        model.train(was_training)
    return out


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[object]:
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _windowed(hu: np.ndarray, window: tuple[float, float], device: torch.device) -> torch.Tensor:
    """CT numbers (any numpy dtype torch reads) as float32 in [0, 1] on ``device``; scaled there, so
    only the raw, often 16-bit, values cross to a GPU."""
    low, high = window
    x = torch.from_numpy(np.ascontiguousarray(hu)).to(device, non_blocking=True).float()
    return x.sub_(low).div_(high - low).clamp_(0.0, 1.0)


def _labels(logits: torch.Tensor) -> np.ndarray:
    if logits.shape[1] > 256:
        raise ValueError(f"a uint8 label map holds at most 256 classes; the model gives {logits.shape[1]}")
    return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


def _predict_slices(
    model: nn.Module,
    hu: np.ndarray,
    out: np.ndarray,
    window: tuple[float, float],
    context: int,
    batch_size: int,
    device: torch.device,
    multiple: int,
) -> None:
    n = hu.shape[0]
    offsets = np.arange(-context, context + 1)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        # (batch, 2k + 1) slice indices: each slice with its neighbours, repeated at the ends.
        indices = np.clip(np.arange(start, stop)[:, None] + offsets, 0, n - 1)
        x, crop = pad_to_multiple(_windowed(hu[indices], window, device), multiple)
        out[start:stop] = _labels(model(x)[crop])


def _predict_slabs(
    model: nn.Module,
    hu: np.ndarray,
    out: np.ndarray,
    window: tuple[float, float],
    patch: tuple[int, ...],
    batch_size: int,
    overlap: float,
    slab: int,
    device: torch.device,
) -> None:
    from monai.inferers import sliding_window_inference

    n = hu.shape[0]
    halo = patch[0] // 2
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        low, high = max(start - halo, 0), min(stop + halo, n)
        x = _windowed(hu[low:high], window, device)[None, None]
        logits = sliding_window_inference(
            x, roi_size=patch, sw_batch_size=batch_size, predictor=model, overlap=overlap, mode="gaussian"
        )
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"a 3D model must return one tensor of logits; got {type(logits).__name__}")
        out[start:stop] = _labels(logits[:, :, start - low : stop - low])[0]
