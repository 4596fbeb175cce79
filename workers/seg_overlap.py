"""highdicom's Segmentation with overlapping segments (the body over the organs) from one label map.

highdicom takes overlapping segments only as one full-size mask per segment, stacked, which it then
sums in 64-bit integers to find the overlap: several times the label map's memory, and time on the
user's critical path (figures in benchmarks/RESULTS.md). The fast route gives highdicom the label map
instead, as for segments that do not overlap, and cuts each frame of a segment that covers all labels
as ``plane != 0`` where highdicom cuts ``plane == number``.

Everything here that leans on highdicom internals (its private per-frame
``_get_segment_pixel_array``) is in this module, and nothing outside it does. The fast route runs
only when asked (``worker.seg_fast_overlap``) and on an installed highdicom that tests/contract
passed with; otherwise the stacked masks go through highdicom's public API, to the same bytes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Collection, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import highdicom as hd
import numpy as np

log = logging.getLogger(__name__)

# The highdicom releases whose internals tests/contract checked; pyproject.toml pins the same.
TESTED_HIGHDICOM = ("0.28.2",)
# The private method the fast route overrides, and the parameters it is called with that it uses.
PRIVATE_METHOD = "_get_segment_pixel_array"
RELIED_ON_PARAMETERS = ("pixel_array", "segment_number", "dtype")


def unavailable() -> str | None:
    """Why the fast route cannot run with the installed highdicom, or None when it can."""
    try:
        installed = version("highdicom")
    except PackageNotFoundError:
        return "the installed highdicom's version cannot be read"
    if installed not in TESTED_HIGHDICOM:
        return f"highdicom {installed} is not a version it was tested with ({', '.join(TESTED_HIGHDICOM)})"
    method = inspect.getattr_static(hd.seg.Segmentation, PRIVATE_METHOD, None)
    if not isinstance(method, staticmethod):
        return f"highdicom's Segmentation.{PRIVATE_METHOD} is gone or no longer a static method"
    parameters = list(inspect.signature(method.__func__).parameters)
    if parameters[:2] != list(RELIED_ON_PARAMETERS[:2]) or RELIED_ON_PARAMETERS[2] not in parameters:
        return f"highdicom's Segmentation.{PRIVATE_METHOD} takes ({', '.join(parameters)}) now"
    return None


def make_segmentation(
    *,
    pixel_array: np.ndarray,
    segment_descriptions: Sequence[hd.seg.SegmentDescription],
    union_segments: Collection[int],
    fast: bool,
    **highdicom_kwargs: Any,
) -> hd.seg.Segmentation:
    """A SEG of ``pixel_array``, a label map of segment numbers (frames, rows, columns).

    Each segment is the voxels labelled with its number, except those in ``union_segments``, which
    are every labelled voxel. ``fast`` asks for the route through highdicom's internals; it is
    taken only where :func:`unavailable` allows, and either route gives the same data set.
    """
    kwargs = {"segment_descriptions": segment_descriptions, **highdicom_kwargs}
    if not union_segments:  # no overlap: highdicom takes the label map as it is
        return hd.seg.Segmentation(pixel_array=pixel_array, **kwargs)
    if fast:
        reason = unavailable()
        if reason is None:
            return _Segmentation(union_segments=union_segments, pixel_array=pixel_array, **kwargs)
        _log_unavailable(reason)
    numbers = [int(item.SegmentNumber) for item in segment_descriptions]
    return hd.seg.Segmentation(pixel_array=_stacked_masks(pixel_array, numbers, union_segments), **kwargs)


def _stacked_masks(
    label_map: np.ndarray, numbers: Sequence[int], union_segments: Collection[int]
) -> np.ndarray:
    """highdicom's public form of overlapping segments: one boolean mask per segment, stacked last."""
    stack = np.empty((*label_map.shape, len(numbers)), dtype=bool)
    for k, number in enumerate(numbers):
        if number in union_segments:
            np.not_equal(label_map, 0, out=stack[..., k])
        else:
            np.equal(label_map, number, out=stack[..., k])
    return stack


@functools.cache
def _log_unavailable(reason: str) -> None:
    """Once per process (and reason): the public route's cost is no surprise to whoever reads the log."""
    log.warning("SEG overlapping segments through highdicom's public API (more memory and time): %s", reason)


class _Segmentation(hd.seg.Segmentation):
    """highdicom's SEG of a label map in which the ``union_segments`` are every labelled voxel."""

    def __init__(self, *, union_segments: Collection[int], **kwargs: Any) -> None:
        self._union_segments = frozenset(union_segments)
        self._nonempty: set[int] = set()  # the segments with a voxel, seen frame by frame
        super().__init__(**kwargs)
        # highdicom took the label map for segments that do not overlap. A covering segment holds
        # every labelled voxel, so with another segment that has a voxel they overlap, as highdicom
        # would find from the stacked masks.
        if self._nonempty & self._union_segments and len(self._nonempty) > 1:
            self.SegmentsOverlap = "YES"

    def _get_segment_pixel_array(  # type: ignore[override]
        self, pixel_array: np.ndarray, segment_number: int, **kwargs: Any
    ) -> np.ndarray:
        if segment_number in self._union_segments:
            frame = (pixel_array != 0).astype(kwargs["dtype"])
        else:
            frame = super()._get_segment_pixel_array(pixel_array, segment_number=segment_number, **kwargs)
        if segment_number not in self._nonempty and frame.any():
            self._nonempty.add(segment_number)
        return frame
