"""Volumes turned into the orientation networks learn from, and label maps turned back.

The canonical orientation is that of a supine, head-first axial scan as DICOM stores it: slices
foot to head, rows front to back, columns the patient's right to left (LPS). A prone, feet-first,
coronal or sagittal series is brought to it by flips and axis swaps only, never resampled, so its
label map maps back to the source frames one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import nibabel as nib
import numpy as np

from segmenters.base import CANONICAL_AXES_LPS, Volume

_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
_CANONICAL = np.array([[2, 1], [1, 1], [0, 1]], dtype=np.float64)  # (slice, row, column) is (S, P, L)


def to_canonical(volume: Volume) -> tuple[Volume, Callable[[np.ndarray], np.ndarray]]:
    """``volume`` in the canonical orientation, and what turns an array indexed like it back
    into ``volume``'s indexing."""
    directions = np.eye(4)
    directions[:3, :3] = np.array(volume.axes_lps, dtype=np.float64).T  # a column per array axis
    # Array axes in the order and sense of L, P, S; canonical (slice, row, column) is S, P, L.
    ornt = nib.orientations.io_orientation(directions)
    if np.array_equal(ornt, _CANONICAL):
        return volume, lambda labels: labels  # already canonical (the usual case): no copy
    hu = nib.orientations.apply_orientation(volume.hu, ornt).transpose(2, 1, 0)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = volume.spacing  # each axis' spacing in its new place (L, P, S)
    canonical = replace(
        volume,
        hu=np.ascontiguousarray(hu),
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        axes_lps=CANONICAL_AXES_LPS,
    )
    back = nib.orientations.ornt_transform(_IDENTITY, ornt)

    def restore(labels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(labels.transpose(2, 1, 0), back))

    return canonical, restore


CANONICAL_CODES = "SPL"  # the canonical (slice, row, column) directions: superior, posterior, left


def reorient(array: np.ndarray, source: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """``array``, whose axes grow towards the directions ``source`` names (such as SPL), with its axes
    swapped and flipped to grow towards ``target`` (such as RAS); also, for each source axis, its
    index in the result (to move spacings along)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(tuple(source)), nib.orientations.axcodes2ornt(tuple(target))
    )
    moved = transform[:, 0].astype(int)
    if source == target:
        return array, moved
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, transform)), moved


def to_codes(
    volume: Volume, codes: str
) -> tuple[np.ndarray, tuple[float, float, float], Callable[[np.ndarray], np.ndarray]]:
    """``volume``'s CT numbers with their axes growing towards ``codes`` (a model's orientation),
    their spacing in that order, and what turns a label map so indexed back into ``volume``'s."""
    canonical, restore = to_canonical(volume)
    hu, moved = reorient(canonical.hu, CANONICAL_CODES, codes)
    spacing = [0.0, 0.0, 0.0]
    for axis, target in enumerate(moved):
        spacing[target] = canonical.spacing[axis]

    def back(labels: np.ndarray) -> np.ndarray:
        return restore(reorient(labels, codes, CANONICAL_CODES)[0])

    return hu, (spacing[0], spacing[1], spacing[2]), back
