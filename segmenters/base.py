"""The interface every segmenter implements, classical or learned.

A segmenter sees a plain volume in Hounsfield units with its voxel spacing and returns a label map.
It never sees DICOM: the workers build the volume and write the DICOM outputs, so an ML engineer can
use a segmenter (and test it) with nothing but numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Concept:
    """A coded concept (SNOMED CT by default), kept free of any DICOM library type."""

    value: str
    meaning: str
    scheme: str = "SCT"


# Categories and types used by the segment descriptions (SNOMED CT, as DICOM CID 7150 / 7166 list them).
ANATOMICAL_STRUCTURE = Concept("91723000", "Anatomical Structure")
BODY_CATEGORY = Concept("91723000", "Anatomical Structure")
ENTIRE_BODY = Concept("38266002", "Entire body")

# Types of structures that contain every other structure a segmenter labels. With one label per
# voxel, a segmenter can only label such a structure as what the others leave of it.
_CONTAINING_TYPES = frozenset({(ENTIRE_BODY.scheme, ENTIRE_BODY.value)})


@dataclass(frozen=True)
class Structure:
    """One structure a segmenter labels: its label value in the map and its coded identity."""

    label: int
    name: str
    category: Concept
    type: Concept
    laterality: Concept | None = None
    rgb: tuple[int, int, int] = (255, 255, 255)

    @property
    def covers_all_labels(self) -> bool:
        """True when the structure contains all the others (its type is the entire body).

        Its label in a map is only the remainder, so outputs that can overlap (a SEG) write it as
        the union of every label: what its code names. Decided by the code, not a stored flag, so
        model cards saved before this existed (the demo model's) are read the same way.
        """
        return (self.type.scheme, self.type.value) in _CONTAINING_TYPES


# A supine, head-first axial scan as DICOM stores it: slices foot to head, rows anterior to
# posterior, columns the patient's right to left (segmenters.orientation turns others into it).
CANONICAL_AXES_LPS: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 1.0),
    (0.0, 1.0, 0.0),
    (1.0, 0.0, 0.0),
)


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units.

    ``hu`` is indexed (slice, row, column); slices are ordered along the slice normal (increasing
    position along the normal of the image plane). ``spacing`` is (between slices, between rows,
    between columns) in millimetres. Rows run along the image's column direction cosine and columns
    along its row direction cosine, exactly as in the DICOM pixel array, so a label map maps back to
    the source frames one to one.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    # Unit vectors, in patient coordinates (DICOM LPS: +x to the patient's left, +y posterior,
    # +z superior), along which the slice, row and column indices grow. The default is a plain
    # axial scan: slices foot to head, rows anterior to posterior, columns right to left.
    axes_lps: tuple[tuple[float, float, float], ...] = CANONICAL_AXES_LPS

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"a volume is 3D (slices, rows, columns); got shape {self.hu.shape}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"voxel spacing must be positive; got {self.spacing}")


@dataclass(frozen=True)
class AlgorithmInfo:
    """What the DICOM-SEG says about the algorithm that made it."""

    name: str
    version: str
    family: Concept
    kind: str = "AUTOMATIC"  # or "SEMIAUTOMATIC"; highdicom's SegmentAlgorithmTypeValues


@runtime_checkable
class Segmenter(Protocol):
    """Turns a CT volume into a label map.

    ``predict`` returns a uint8 array of ``volume.hu.shape`` where 0 is background and every other
    value is the ``label`` of one of ``structures``. Structures do not overlap: one label per voxel,
    so a structure that contains the others (the body) labels only what they leave of it.
    """

    @property
    def algorithm(self) -> AlgorithmInfo: ...

    @property
    def structures(self) -> Sequence[Structure]: ...

    def predict(self, volume: Volume) -> np.ndarray: ...
