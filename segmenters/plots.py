"""Line plots as PNG files from numpy, zlib and struct alone.

Training writes its learning curves as pictures a user can open anywhere; matplotlib is not a
dependency of segnode, and a plot of a few lines needs none: a white canvas, two axes with tick
marks and anti-aliasing-free lines. There is no text (no font): the caller names the file and
documents which colour is which.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Line colours, in order: blue, orange, green, red (matplotlib's first four defaults).
COLOURS: tuple[tuple[int, int, int], ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
_MARGIN = 24  # pixels between the canvas edge and the axes
_TICKS = 5  # tick marks on each axis (plus the origin)


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image (rows, columns, 3) as PNG bytes (no filtering, zlib level 6)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an RGB image is (rows, columns, 3); got {rgb.shape}")
    height, width = rgb.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.astype(np.uint8).reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bit, truecolour
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def line_plot(
    series: Sequence[Sequence[float]],
    *,
    width: int = 480,
    height: int = 320,
    y_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """An RGB image of one line per series against its index (epoch 1, 2, ...), colours in order
    of ``COLOURS``. Non-finite values are left out. ``y_range`` defaults to the data's range."""
    if not series or len(series) > len(COLOURS):
        raise ValueError(f"plot 1 to {len(COLOURS)} series; got {len(series)}")
    if width <= 2 * _MARGIN or height <= 2 * _MARGIN:
        raise ValueError(f"the canvas must exceed {2 * _MARGIN} pixels each way")
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = _MARGIN, width - _MARGIN, _MARGIN, height - _MARGIN
    image[bottom, left : right + 1] = 0  # x axis
    image[top : bottom + 1, left] = 0  # y axis
    for k in range(_TICKS + 1):
        x = left + round(k * (right - left) / _TICKS)
        y = bottom - round(k * (bottom - top) / _TICKS)
        image[bottom : bottom + 4, x] = 0
        image[y, left - 3 : left + 1] = 0
    finite = [float(v) for s in series for v in s if np.isfinite(v)]
    low, high = y_range if y_range is not None else (min(finite, default=0.0), max(finite, default=1.0))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    n = max(len(s) for s in series)
    for colour, values in zip(COLOURS, series, strict=False):
        points = [
            (
                left + (i * (right - left) / (n - 1) if n > 1 else (right - left) / 2),
                bottom - (float(v) - low) / (high - low) * (bottom - top),
            )
            for i, v in enumerate(values)
            if np.isfinite(v)
        ]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            _segment(image, x0, y0, x1, y1, colour)
        for px, py in points:  # a 3 x 3 dot on every value, so a single epoch shows too
            _dot(image, px, py, colour)
    return image


def write_line_plot(path: Path, series: Sequence[Sequence[float]], **kwargs: object) -> None:
    """``line_plot`` written as a PNG file."""
    path.write_bytes(encode_png(line_plot(series, **kwargs)))  # type: ignore[arg-type]


def _segment(
    image: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int]
) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) * 2 + 2
    xs = np.rint(np.linspace(x0, x1, steps)).astype(int)
    ys = np.rint(np.linspace(y0, y1, steps)).astype(int)
    keep = (ys >= 0) & (ys < image.shape[0]) & (xs >= 0) & (xs < image.shape[1])
    for dy in (0, 1):  # two pixels thick
        rows = np.clip(ys[keep] + dy, 0, image.shape[0] - 1)
        image[rows, xs[keep]] = colour


def _dot(image: np.ndarray, x: float, y: float, colour: tuple[int, int, int]) -> None:
    r, c = round(y), round(x)
    image[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = colour
