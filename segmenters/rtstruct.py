"""Reading RT Structure Set contours as voxel masks on the grid of their CT series.

Radiotherapy contours (an RTSTRUCT, as in the AAPM 2017 thoracic challenge) are the reference that
segmenters are scored and trained against. Each closed planar contour is matched to a CT slice by
its position along the slice normal and filled with the even-odd rule at the pixel centres; the
contours of one ROI on one slice combine by XOR, so a contour drawn inside another is a hole.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_FILLED_TYPES = {"CLOSED_PLANAR", "CLOSEDPLANAR_XOR"}
_CONTOUR_DATA = 0x30060050
MAX_TOLERANCE_MM = 1.0


def read_rtstruct_masks(
    rtstruct_path: str | os.PathLike[str] | Dataset,
    ct_datasets_sorted: Sequence[Dataset],
    tolerance_mm: float | None = None,
) -> dict[str, np.ndarray]:
    """Every ROI of a structure set as a bool mask shaped (slices, rows, columns) of the CT series.

    ``ct_datasets_sorted`` are the CT slices in the order the mask's first axis should follow (only
    their geometry is read, not their pixels). A contour belongs to the slice whose position along
    the normal is within ``tolerance_mm`` of the contour's (default: a quarter of the smallest slice
    gap, at most 1 mm); contours on no slice are skipped and counted in the log. ROIs without
    contours give an empty mask; open contours and points are not areas and are skipped.
    """
    rtstruct = rtstruct_path if isinstance(rtstruct_path, Dataset) else pydicom.dcmread(rtstruct_path)
    if rtstruct.get("SOPClassUID") != RT_STRUCTURE_SET_STORAGE:
        raise ValueError(f"not an RT Structure Set: SOP Class UID {rtstruct.get('SOPClassUID')}")
    grid = _SliceGrid(ct_datasets_sorted)
    tolerance = grid.default_tolerance() if tolerance_mm is None else tolerance_mm

    names = {int(roi.ROINumber): str(roi.ROIName) for roi in rtstruct.get("StructureSetROISequence", [])}
    masks: dict[str, np.ndarray] = {name: np.zeros(grid.shape, dtype=bool) for name in names.values()}
    for roi_contour in rtstruct.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        if number not in names:
            raise ValueError(f"ROI Contour Sequence refers to ROI number {number}, which is not defined")
        toggles: dict[int, np.ndarray] = {}
        spans: dict[int, tuple[int, int]] = {}
        unmatched = 0
        for contour in roi_contour.get("ContourSequence", []):
            if contour.get("ContourGeometricType") not in _FILLED_TYPES:
                continue
            points = _contour_points(contour)
            index = grid.slice_of(points, tolerance)
            if index is None:
                unmatched += 1
                continue
            rows, cols = grid.to_pixels(points, index)
            parity = toggles.setdefault(index, np.zeros((grid.shape[1], grid.shape[2] + 1), dtype=np.uint8))
            _toggle_crossings(parity, rows, cols)
            low, high = spans.get(index, (grid.shape[1], 0))
            top = min(max(math.floor(rows.min()), 0), grid.shape[1])
            bottom = min(max(math.ceil(rows.max()) + 1, 0), grid.shape[1])
            spans[index] = (min(low, top), max(high, bottom))
        if unmatched:
            logger.warning("ROI %r: %d contour(s) match no CT slice; skipped", names[number], unmatched)
        mask = masks[names[number]]
        for index, parity in toggles.items():
            # A pixel is inside when an odd number of edges cross its row at or left of its centre;
            # rows outside the contours' span hold no crossings.
            low, high = spans[index]
            inside = np.bitwise_xor.accumulate(parity[low:high], axis=1)[:, :-1]
            mask[index, low:high] |= inside.astype(bool)
    return masks


def _contour_points(contour: Dataset) -> np.ndarray:
    """Contour Data as (n, 3) patient coordinates.

    Parsed straight from the element's text when it is still raw: pydicom's per-value DS objects
    make a large structure set take seconds to read.
    """
    element = contour.get_item(_CONTOUR_DATA)
    if element is None:
        raise ValueError("a contour has no Contour Data")
    value = element.value
    if isinstance(value, bytes):
        text = value.decode("ascii").strip(" \x00")
        values = np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    else:
        values = np.asarray(value, dtype=np.float64)
    if values.size % 3:
        raise ValueError(f"Contour Data holds {values.size} values, not a multiple of 3")
    return values.reshape(-1, 3)


class _SliceGrid:
    """The geometry of a sorted CT series: plane axes, pixel spacing and slice positions."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            raise ValueError("no CT slices given")
        first = datasets[0]
        orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
        self.row_axis, self.col_axis = orientation[:3], orientation[3:]  # along a row, down a column
        self.normal = np.cross(self.row_axis, self.col_axis)
        self.row_spacing, self.col_spacing = (float(v) for v in first.PixelSpacing)
        self.shape = (len(datasets), int(first.Rows), int(first.Columns))
        for ds in datasets:
            if not np.allclose(
                np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4
            ):
                raise ValueError("CT slices differ in Image Orientation (Patient); one grid is needed")
            if (int(ds.Rows), int(ds.Columns)) != self.shape[1:]:
                raise ValueError("CT slices differ in size; one grid is needed")
        self.origins = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
        self.positions = self.origins @ self.normal

    def default_tolerance(self) -> float:
        """A quarter of the smallest slice gap, at most 1 mm: rounding in the contour's position is
        forgiven, a contour drawn between slices is not."""
        gaps = np.abs(np.diff(np.sort(self.positions)))
        gaps = gaps[gaps > 1e-6]
        return min(0.25 * float(gaps.min()), MAX_TOLERANCE_MM) if gaps.size else MAX_TOLERANCE_MM

    def slice_of(self, points: np.ndarray, tolerance: float) -> int | None:
        """The slice a planar contour lies on, or None."""
        along = points @ self.normal
        if np.ptp(along) > 2 * tolerance:
            return None  # not in an image plane
        distance = np.abs(self.positions - along.mean())
        index = int(distance.argmin())
        return index if distance[index] <= tolerance else None

    def to_pixels(self, points: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, column) of patient points on slice ``index``; pixel centres are integers."""
        offset = points - self.origins[index]
        return offset @ self.col_axis / self.row_spacing, offset @ self.row_axis / self.col_spacing


def _toggle_crossings(parity: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Flip ``parity`` from each edge crossing onwards along the pixel-centre row it crosses.

    Each edge counts on the rows in its half-open span [lower end, upper end), so a vertex on a row
    is counted once and horizontal edges not at all: the usual scanline rule, exact for pixel counts.
    """
    height, width = parity.shape[0], parity.shape[1] - 1
    r0, c0 = rows, cols
    r1, c1 = np.roll(rows, -1), np.roll(cols, -1)
    low, high = np.minimum(r0, r1), np.maximum(r0, r1)
    first = np.clip(np.ceil(low), 0, height).astype(np.int64)
    last = np.clip(np.ceil(high), 0, height).astype(np.int64)  # exclusive
    counts = np.maximum(last - first, 0)
    if counts.sum() == 0:
        return
    edge = np.repeat(np.arange(rows.size), counts)
    row = first[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(counts) - counts, counts))
    t = (row - r0[edge]) / (r1[edge] - r0[edge])
    col = np.clip(np.ceil(c0[edge] + t * (c1[edge] - c0[edge])), 0, width).astype(np.int64)
    np.bitwise_xor.at(parity, (row, col), np.uint8(1))
