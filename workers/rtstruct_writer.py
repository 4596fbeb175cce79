"""Turn a segmenter's label map into an RT Structure Set (RTSTRUCT) that a planning system imports.

One ROI per structure, in the SEG's order and with its codes, contoured per slice as the 0.5
iso-lines of the mask (scikit-image), so filled at pixel centres they give the mask back. DICOM has
no hole flag: the contours of one ROI on one plane combine by XOR, the convention readers follow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, RTStructureSetStorage
from pydicom.valuerep import format_number_as_ds
from skimage.measure import approximate_polygon, find_contours

from segmenters.base import AlgorithmInfo, Concept, Structure
from segmenters.ct_series import SeriesVolume
from workers import derived
from workers.derived import content_date_time, copy_deidentification, derived_uid, software_version
from workers.seg_writer import present_structures

log = logging.getLogger(__name__)

DEFAULT_SERIES_NUMBER = 9902  # beside the SEG's 9901, after the scanner's own series
STRUCTURE_SET_LABEL = "AI_CONTOURS"  # SH, at most 16 characters
# Douglas-Peucker simplification (skimage.measure.approximate_polygon), in pixels; 0 for none.
# None by default: measured on the shared thorax (111 slices of 512 x 512, four structures), the
# outline's corners alone are 96,000 points, a third of the traced ones, and give the mask back
# voxel for voxel. Douglas-Peucker within 0.3 pixel keeps 89,000 of them (no voxel changes: a pixel
# centre lies at least 0.35 pixel from the outline), within 0.5 pixel 50,000 (Dice 0.994 for the
# trachea, 0.998 for the lungs), and costs seconds where the corners cost milliseconds.
SIMPLIFY_TOLERANCE_PX = 0.0
COORDINATE_DECIMALS = 3  # mm: a micrometre, far below a pixel; at most 11 characters of a DS's 16
# PS3.3 C.8.8.5.4: a study is referenced by this (retired) SOP Class, there being no other.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = 0x30060050

_PATIENT_AND_STUDY = (  # copied from the source when present; type 2 ones written empty otherwise
    ("PatientName", True),
    ("PatientID", True),
    ("IssuerOfPatientID", False),
    ("PatientBirthDate", True),
    ("PatientSex", True),
    ("PatientAge", False),
    ("PatientSize", False),
    ("PatientWeight", False),
    ("StudyInstanceUID", True),
    ("StudyDate", True),
    ("StudyTime", True),
    ("ReferringPhysicianName", True),
    ("StudyID", True),
    ("AccessionNumber", True),
    ("StudyDescription", False),
)


def build_rtstruct(
    series: SeriesVolume,
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    structures: Sequence[Structure],
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = "segnode",
    manufacturer_model_name: str = "segnode",
    software_versions: str | None = None,
    device_serial_number: str = "segnode",
    tolerance_px: float = SIMPLIFY_TOLERANCE_PX,
) -> Dataset:
    """An RT Structure Set of ``label_map`` (indexed like ``series.volume.hu``) over ``series``.

    ROIs are numbered 1..n as the SEG numbers its segments: the structures present in the map, in
    the order of ``structures``; a structure that covers all labels (the body) is every labelled
    voxel and is interpreted as EXTERNAL, the others as ORGAN. Raises as
    :func:`workers.seg_writer.build_seg` does: :class:`SeriesRejectedError` when no structure is
    present, :class:`ProcessingFailedError` when the map does not fit the series or its structures.
    ``tolerance_px`` simplifies the outlines further (:data:`SIMPLIFY_TOLERANCE_PX`).
    """
    present = present_structures(series, label_map, algorithm, structures)
    content_date, content_time = content_date_time(series.datasets)
    time = content_time.strftime("%H%M%S") + (
        f".{content_time.microsecond:06d}" if content_time.microsecond else ""
    )
    ds = _header(series, algorithm, content_date.strftime("%Y%m%d"), time)
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = manufacturer_model_name
    ds.SoftwareVersions = software_versions or software_version()
    ds.DeviceSerialNumber = device_serial_number
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(series)]

    contours = _contours_by_structure(series, label_map, present, tolerance_px)
    ds.StructureSetROISequence = [
        _structure_set_roi(number, structure, series, algorithm)
        for number, structure in enumerate(present, 1)
    ]
    ds.ROIContourSequence = [
        _roi_contour(number, structure, contours[number - 1]) for number, structure in enumerate(present, 1)
    ]
    ds.RTROIObservationsSequence = [_observation(number, s) for number, s in enumerate(present, start=1)]
    ds.ApprovalStatus = "UNAPPROVED"  # made by an algorithm: for a person to review before planning
    copy_deidentification(ds, series.datasets[0])
    log.info(
        "built RTSTRUCT %s for series %s: %d ROI(s), %d contour(s)",
        ds.SOPInstanceUID,
        series.series_instance_uid,
        len(present),
        sum(len(c) for c in contours),
    )
    return ds


def rtstruct_uids(series: SeriesVolume, algorithm: AlgorithmInfo) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the RTSTRUCT (:func:`workers.derived.derived_uid`)."""
    return (
        derived_uid(series, algorithm, "rtstruct-series"),
        derived_uid(series, algorithm, "rtstruct-instance"),
    )


def series_description(algorithm: AlgorithmInfo) -> str:
    return derived.series_description(algorithm, "contours")


def slice_contours(mask: np.ndarray, tolerance_px: float = SIMPLIFY_TOLERANCE_PX) -> list[np.ndarray]:
    """The closed outlines of a 2D boolean ``mask`` as (n, 2) arrays of fractional (row, column).

    Outer outlines, holes and islands inside holes alike: filled by XOR at the pixel centres they
    give ``mask`` back (exactly, unless ``tolerance_px`` moves them). The first point is not
    repeated at the end, as in a DICOM closed contour.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    # Only the mask's bounding box, with a border of background so that outlines on the image's
    # edge close as well.
    box = np.pad(mask[top : rows[-1] + 1, left : cols[-1] + 1], 1).astype(np.float32)
    outlines = []
    for outline in find_contours(box, 0.5):
        if tolerance_px > 0:
            simple = approximate_polygon(outline, tolerance_px)
            if len(simple) >= 4:  # not a pixel or two collapsed to a line
                outline = simple
        outlines.append(_corners(outline) + np.array([top - 1, left - 1]))
    return outlines


def _corners(outline: np.ndarray) -> np.ndarray:
    """The vertices of a closed outline (first point repeated last) where its direction changes.

    Marching squares gives a point on every pixel edge it crosses, so a straight run of n pixels
    is n points on one line; its two ends say the same. The points lie on the half-pixel lattice,
    so a zero cross product is exact.
    """
    points = outline[:-1]
    incoming = points - np.roll(points, 1, axis=0)
    outgoing = np.roll(points, -1, axis=0) - points
    turn = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    return points[turn != 0]


# --- the data set ---------------------------------------------------------------------------


def _header(series: SeriesVolume, algorithm: AlgorithmInfo, date: str, time: str) -> Dataset:
    """SOP Common, Patient, General Study, RT Series, Frame of Reference and the structure set's
    identity: everything but the ROIs and the equipment."""
    source = series.datasets[0]
    series_uid, instance_uid = rtstruct_uids(series, algorithm)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SpecificCharacterSet" in source:  # the patient's name is copied as it is encoded
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = instance_uid
    for keyword, type_2 in _PATIENT_AND_STUDY:
        if source.get(keyword) is not None:
            setattr(ds, keyword, source[keyword].value)
        elif type_2:
            setattr(ds, keyword, None)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description(algorithm)
    ds.OperatorsName = None
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator")
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = algorithm.name[:64]
    ds.StructureSetDescription = f"Automatic contours by {algorithm.name} {algorithm.version}"[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    return ds


def _referenced_frame_of_reference(series: SeriesVolume) -> Dataset:
    """The CT's Frame of Reference, study and series, and every image of it (not only the
    contoured ones): the structure set was defined on the whole series."""
    images = []
    for source in series.datasets:
        image = Dataset()
        image.ReferencedSOPClassUID = source.SOPClassUID
        image.ReferencedSOPInstanceUID = source.SOPInstanceUID
        images.append(image)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_instance_uid
    referenced_series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = series.study_instance_uid
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    return frame


def _structure_set_roi(
    number: int, structure: Structure, series: SeriesVolume, algorithm: AlgorithmInfo
) -> Dataset:
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
    roi.ROIName = structure.name[:64]
    roi.ROIGenerationAlgorithm = algorithm.kind  # AUTOMATIC or SEMIAUTOMATIC, as RTSTRUCT defines them
    roi.ROIGenerationDescription = f"{algorithm.name} {algorithm.version}"[:64]
    return roi


def _roi_contour(number: int, structure: Structure, contours: list[Dataset]) -> Dataset:
    item = Dataset()
    item.ROIDisplayColor = list(structure.rgb)
    item.ContourSequence = DicomSequence(contours)
    item.ReferencedROINumber = number
    return item


def _observation(number: int, structure: Structure) -> Dataset:
    """Interpreted type and codes: the SEG's category and type (with laterality) for the ROI."""
    item = Dataset()
    item.ObservationNumber = number
    item.ReferencedROINumber = number
    item.RTROIInterpretedType = "EXTERNAL" if structure.covers_all_labels else "ORGAN"
    item.ROIInterpreter = None
    item.SegmentedPropertyCategoryCodeSequence = [_coded(structure.category)]
    identification = _coded(structure.type)
    if structure.laterality is not None:
        identification.SegmentedPropertyTypeModifierCodeSequence = [_coded(structure.laterality)]
    item.RTROIIdentificationCodeSequence = [identification]
    return item


def _coded(concept: Concept) -> Dataset:
    """A Code Sequence item; highdicom chooses Code Value or Long Code Value by the value's length."""
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


# --- contours ---------------------------------------------------------------------------------


def _contours_by_structure(
    series: SeriesVolume, label_map: np.ndarray, present: Sequence[Structure], tolerance_px: float
) -> list[list[Dataset]]:
    """For each present structure, its Contour Sequence items, slice by slice in volume order."""
    out: list[list[Dataset]] = [[] for _ in present]
    for k, plane in enumerate(label_map):
        source = series.datasets[k]
        for index, structure in enumerate(present):
            mask = plane != 0 if structure.covers_all_labels else plane == structure.label
            for outline in slice_contours(mask, tolerance_px):
                out[index].append(_contour(len(out[index]) + 1, _to_patient(outline, source), source))
    return out


def _to_patient(points: np.ndarray, source: Dataset) -> np.ndarray:
    """Fractional (row, column) on the slice ``source`` to patient coordinates in mm (PS3.3
    C.7.6.2.1.1): a column index steps along the row direction cosine, a row index along the
    column one, each by its own spacing."""
    position = np.array(source.ImagePositionPatient, dtype=np.float64)
    orientation = np.array(source.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in source.PixelSpacing)
    along_rows = np.outer(points[:, 1] * col_spacing, orientation[:3])
    down_columns = np.outer(points[:, 0] * row_spacing, orientation[3:])
    return position + along_rows + down_columns


def _contour(number: int, points: np.ndarray, source: Dataset) -> Dataset:
    image = Dataset()
    image.ReferencedSOPClassUID = source.SOPClassUID
    image.ReferencedSOPInstanceUID = source.SOPInstanceUID
    contour = Dataset()
    contour.ContourImageSequence = [image]
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = len(points)
    contour.ContourNumber = number
    # Valid DS by construction (fixed precision, at most 16 characters): pydicom's check of each of
    # the thorax's ~300,000 values would cost most of a second.
    contour[_CONTOUR_DATA] = DataElement(
        _CONTOUR_DATA, "DS", _decimal_strings(points.ravel()), validation_mode=config.IGNORE
    )
    return contour


def _decimal_strings(values: np.ndarray) -> list[str]:
    """DS values at :data:`COORDINATE_DECIMALS`, without trailing zeros (pydicom's own shortest
    form for a value too large for that, which no patient coordinate is)."""
    rounded = np.round(values, COORDINATE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    out = []
    for v in rounded.tolist():
        text = f"{v:.{COORDINATE_DECIMALS}f}".rstrip("0").rstrip(".")
        out.append(text if len(text) <= 16 else format_number_as_ds(v))
    return out
