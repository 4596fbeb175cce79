"""build_rtstruct: every RTSTRUCT written is validated by dciodvfy and read back by an independent
reader, dicompyler-core, whose contours, filled at the CT's pixel centres, must give the label map.

dicompyler-core fills contours in its DVH calculation: each contour's mask on the dose grid, the
masks of one plane combined by XOR (a contour inside another is a hole). The tests call that same
code with the CT slice's pixel centres as the grid.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from skimage.draw import polygon

from segmenters import anatomy
from segmenters.base import AlgorithmInfo, Structure
from segmenters.classical import ClassicalSegmenter
from segmenters.ct_series import SeriesVolume, load_series
from segmenters.rtstruct import read_rtstruct_masks
from tests import dicom_factory as f
from tests.shared_data import THORAX
from tests.unit.test_seg_writer import ALGORITHM, dciodvfy
from workers.derived import UNRECORDED_DEIDENTIFICATION, write_dataset
from workers.errors import ProcessingFailedError, SeriesRejectedError
from workers.rtstruct_writer import (
    DEFAULT_SERIES_NUMBER,
    build_rtstruct,
    rtstruct_uids,
    series_description,
    slice_contours,
)
from workers.seg_writer import build_seg

BODY = anatomy.structure(1, "body")
RIGHT_LUNG = anatomy.structure(2, "right_lung")
LEFT_LUNG = anatomy.structure(3, "left_lung")
AIRWAYS = anatomy.structure(4, "airways")  # the phantom's vertebra stands in for them
HEART = anatomy.structure(5, "heart")  # two islands, on four slices only
ESOPHAGUS = anatomy.structure(6, "esophagus")  # not in the map
STRUCTURES = (BODY, RIGHT_LUNG, LEFT_LUNG, AIRWAYS, HEART, ESOPHAGUS)
PRESENT = STRUCTURES[:-1]

# Hand-made on the 48 x 64 phantom: a square hole in the right lung with one lung pixel left in its
# middle (an island inside the hole), and a heart of two blobs on slices 2 to 5.
LUNG_HOLE = (slice(20, 25), slice(17, 22))
LUNG_ISLAND = (22, 19)
HEART_BLOBS = ((slice(12, 15), slice(29, 31)), (slice(12, 15), slice(33, 35)))
HEART_SLICES = range(2, 6)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    return load_series(f.make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=8, rows=48, cols=64))


@pytest.fixture(scope="module")
def labels(series: SeriesVolume) -> np.ndarray:
    """Body 1 (what the others leave), lungs 2 and 3 (the right one with a hole and an island in
    it), vertebra 4, and a heart 5 of two islands."""
    hu = series.volume.hu
    out = f.lung_and_bone_labels(hu, RIGHT_LUNG.label, LEFT_LUNG.label, AIRWAYS.label)
    out[(hu > f.AIR_HU) & (out == 0)] = BODY.label
    assert (out[(slice(None), *LUNG_HOLE)] == RIGHT_LUNG.label).all()
    out[(slice(None), *LUNG_HOLE)] = BODY.label
    out[(slice(None), *LUNG_ISLAND)] = RIGHT_LUNG.label
    for k in HEART_SLICES:
        for blob in HEART_BLOBS:
            assert (out[(k, *blob)] == BODY.label).all()
            out[(k, *blob)] = HEART.label
    return out


def truth(labels: np.ndarray, structure: Structure) -> np.ndarray:
    """What an ROI should cover: the body every labelled voxel, any other structure its label."""
    return labels > 0 if structure.covers_all_labels else labels == structure.label


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


# --- the independent reader -------------------------------------------------------------------


def dicompyler() -> tuple[ModuleType, ModuleType]:
    """dicompyler-core's DICOM parser and DVH calculation modules.

    Its newest release on PyPI (0.5.6) still imports ``pydicom.dicomio.read_file``, which pydicom 3
    removed in favour of ``dcmread`` (dicompyler-core#380, fixed upstream after that release); with
    the old name pointed at the new function, its reading code runs unchanged.
    """
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):
        setattr(pydicom.dicomio, "read_file", pydicom.dcmread)  # noqa: B010 - not in pydicom's stubs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its import of pydicom.pixel_data_handlers
        from dicompylercore import dicomparser, dvhcalc
    return dicomparser, dvhcalc


def read_back(
    path: Path, series: SeriesVolume, *, xor: bool = True
) -> tuple[dict[str, dict[str, object]], dict[str, np.ndarray]]:
    """dicompyler-core's structures (by name), and each one's contours filled on the CT grid the
    way its DVH calculation fills them on a dose grid.

    dicompyler-core is axial-only (it keys contours by z), as both series here are. Each contour is
    put on the slice at its z (checked to 0.01 mm); dicompyler-core's ``get_contour_mask`` tests the
    slice's pixel centres in the contour's bounding box (matplotlib's point in polygon), and the
    contours of a plane are XOR'd, as its ``calculate_plane_histogram`` does (OR'd if not ``xor``,
    to show what the XOR does).
    """
    dicomparser, dvhcalc = dicompyler()
    parser = dicomparser.DicomParser(str(path))
    info = parser.GetStructures()
    first = series.datasets[0]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    shape = series.volume.hu.shape
    origins = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in series.datasets])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    masks: dict[str, np.ndarray] = {}
    for number, structure in info.items():
        mask = np.zeros(shape, dtype=bool)
        for planes in parser.GetStructureCoordinates(number).values():
            for plane in planes:
                assert plane["type"] == "CLOSED_PLANAR"
                points = np.asarray(plane["data"], dtype=np.float64)
                assert len(points) == plane["num_points"] >= 3
                k = int(np.abs(origins[:, 2] - points[0, 2]).argmin())
                assert np.abs(points[:, 2] - origins[k, 2]).max() < 0.01, "a contour off its slice's plane"
                x0, y0 = origins[k, :2]
                c0, c1 = index_span(points[:, 0], x0, col_spacing, shape[2])
                r0, r1 = index_span(points[:, 1], y0, row_spacing, shape[1])
                lut = (x0 + np.arange(c0, c1) * col_spacing, y0 + np.arange(r0, r1) * row_spacing)
                x, y = np.meshgrid(*lut)
                grid = {"lut": lut, "x_lut_index": 0}
                inside = dvhcalc.get_contour_mask(
                    grid, None, np.column_stack([x.ravel(), y.ravel()]), points[:, :2]
                )
                region = mask[k, r0:r1, c0:c1]
                if xor:
                    region ^= inside
                else:
                    region |= inside
        masks[str(structure["name"])] = mask
    return {str(s["name"]): s for s in info.values()}, masks


def index_span(values: np.ndarray, origin: float, spacing: float, size: int) -> tuple[int, int]:
    """The pixel indices [first, last + 1) whose centres can lie within ``values`` (mm)."""
    first = int(np.floor((values.min() - origin) / spacing))
    last = int(np.ceil((values.max() - origin) / spacing))
    return max(first, 0), min(last + 1, size)


def contour_items(ds: Dataset, roi_number: int) -> list[Dataset]:
    (roi,) = [item for item in ds.ROIContourSequence if int(item.ReferencedROINumber) == roi_number]
    return list(roi.ContourSequence)


def slice_of(contour: Dataset, series: SeriesVolume) -> int:
    z = float(contour.ContourData[2])  # an axial series: every point of a contour has its slice's z
    return int(np.argmin([abs(float(ds.ImagePositionPatient[2]) - z) for ds in series.datasets]))


# --- a good RTSTRUCT --------------------------------------------------------------------------


def test_rtstruct_is_valid_and_reads_back_as_the_label_map(
    series: SeriesVolume, labels: np.ndarray, tmp_path: Path, strict_reading: None
) -> None:
    path = tmp_path / "rtstruct.dcm"
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    info, masks = read_back(path, series)
    assert list(masks) == [s.name for s in PRESENT]  # the absent esophagus has no ROI
    for structure in PRESENT:
        expected = truth(labels, structure)
        assert dice(masks[structure.name], expected) >= 0.95, structure.name
        # The outlines run half-way between pixel centres and keep every corner: nothing is lost.
        np.testing.assert_array_equal(masks[structure.name], expected, err_msg=structure.name)
    assert info["Body"]["type"] == "EXTERNAL"
    assert {info[s.name]["type"] for s in PRESENT[1:]} == {"ORGAN"}
    for structure in PRESENT:
        assert tuple(int(v) for v in info[structure.name]["color"]) == structure.rgb  # type: ignore[attr-defined]
    # The node's own reader (segmenters.rtstruct, even-odd filling) agrees.
    ours = read_rtstruct_masks(path, series.datasets)
    for structure in PRESENT:
        np.testing.assert_array_equal(ours[structure.name], truth(labels, structure))


def test_a_hole_and_islands_are_contours_of_their_own_combined_by_xor(
    series: SeriesVolume, labels: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "rtstruct.dcm"
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), path)
    ds = pydicom.dcmread(path)
    right_lung = [slice_of(c, series) for c in contour_items(ds, 2)]
    assert [right_lung.count(k) for k in range(8)] == [3] * 8  # outline, hole, island in the hole
    heart = [slice_of(c, series) for c in contour_items(ds, 5)]
    assert [heart.count(k) for k in range(8)] == [0, 0, 2, 2, 2, 2, 0, 0]  # two islands, four slices
    body = [slice_of(c, series) for c in contour_items(ds, 1)]
    assert [body.count(k) for k in range(8)] == [1] * 8  # the whole body: no hole where the lung has one
    # XOR'd, the contours give the lung with its hole and the island in it; OR'd, the hole would be
    # lung: the nesting is what says "hole".
    _, xor = read_back(path, series)
    _, union = read_back(path, series, xor=False)
    expected = truth(labels, RIGHT_LUNG)
    np.testing.assert_array_equal(xor["Right lung"], expected)
    assert not expected[(0, *LUNG_HOLE)].all() and expected[(0, *LUNG_ISLAND)]
    assert union["Right lung"][(slice(None), *LUNG_HOLE)].all()


def test_rois_carry_the_seg_segments_numbers_names_and_codes(
    series: SeriesVolume, labels: np.ndarray, strict_reading: None, tmp_path: Path
) -> None:
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), tmp_path / "rt.dcm")
    write_dataset(build_seg(series, labels, ALGORITHM, STRUCTURES), tmp_path / "seg.dcm")
    rt, seg = pydicom.dcmread(tmp_path / "rt.dcm"), pydicom.dcmread(tmp_path / "seg.dcm")
    rois, observations = rt.StructureSetROISequence, rt.RTROIObservationsSequence
    assert [(int(r.ROINumber), r.ROIName) for r in rois] == [
        (int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence
    ]
    assert [int(r.ReferencedROINumber) for r in rt.ROIContourSequence] == [int(r.ROINumber) for r in rois]
    assert [int(o.ReferencedROINumber) for o in observations] == [int(r.ROINumber) for r in rois]

    def code(item: Dataset) -> tuple[str, str, str]:
        return (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)

    for observation, segment, structure in zip(observations, seg.SegmentSequence, PRESENT, strict=True):
        identification = observation.RTROIIdentificationCodeSequence[0]
        segment_type = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (
            code(identification)
            == code(segment_type)
            == (structure.type.value, "SCT", structure.type.meaning)
        )
        assert code(observation.SegmentedPropertyCategoryCodeSequence[0]) == code(
            segment.SegmentedPropertyCategoryCodeSequence[0]
        )
        modifiers = [code(m) for m in identification.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == [
            code(m) for m in segment_type.get("SegmentedPropertyTypeModifierCodeSequence", [])
        ]
        assert observation.RTROIInterpretedType == ("EXTERNAL" if structure.covers_all_labels else "ORGAN")
    assert [
        code(m)
        for m in observations[1].RTROIIdentificationCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    ] == [("24028007", "SCT", "Right")]
    assert [tuple(r.ROIDisplayColor) for r in rt.ROIContourSequence] == [s.rgb for s in PRESENT]
    assert {r.ROIGenerationAlgorithm for r in rois} == {"AUTOMATIC"}


def test_every_image_is_referenced_and_every_contour_its_own(
    series: SeriesVolume, labels: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "rtstruct.dcm"
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), path)
    ds = pydicom.dcmread(path)
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == series.frame_of_reference_uid == ds.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == series.study_instance_uid
    (referenced_series,) = study.RTReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == series.series_instance_uid
    images = referenced_series.ContourImageSequence
    assert [i.ReferencedSOPInstanceUID for i in images] == list(series.sop_instance_uids)
    assert {i.ReferencedSOPClassUID for i in images} == {f.CTImageStorage}
    assert {r.ReferencedFrameOfReferenceUID for r in ds.StructureSetROISequence} == {
        series.frame_of_reference_uid
    }
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            (image,) = contour.ContourImageSequence
            assert image.ReferencedSOPInstanceUID == series.sop_instance_uids[slice_of(contour, series)]
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            assert not np.array_equal(points[0], points[-1])  # a closed contour does not repeat its start
    for roi in pydicom.dcmread(path).ROIContourSequence:  # the values as written, each a valid DS
        for contour in roi.ContourSequence:
            text = contour.get_item(0x30060050).value
            assert isinstance(text, bytes)
            assert max(len(v) for v in text.decode().strip().split("\\")) <= 16


def test_header_names_the_algorithm_and_copies_patient_and_study(
    series: SeriesVolume, labels: np.ndarray, tmp_path: Path, strict_reading: None
) -> None:
    path = tmp_path / "rtstruct.dcm"
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), path)
    ds, source = pydicom.dcmread(path), series.datasets[0]
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == rtstruct_uids(series, ALGORITHM)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert int(ds.SeriesNumber) == DEFAULT_SERIES_NUMBER == 9902
    assert ds.SeriesDescription == "AI contours (segnode-classical 1.0)"
    assert 0 < len(ds.StructureSetLabel) <= 16
    assert ds.Manufacturer == "segnode" and ds.SoftwareVersions.startswith("segnode")
    assert ds.ApprovalStatus == "UNAPPROVED"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        assert ds[keyword].value == source[keyword].value, keyword
    for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        assert ds.get(keyword) == source.get(keyword), keyword
    # From the newest source image's content date-time (2024-01-02 10:15), never the time of writing.
    for date, time_ in (
        ("StructureSetDate", "StructureSetTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("SeriesDate", "SeriesTime"),
    ):
        assert (ds[date].value, ds[time_].value) == ("20240102", "101500")
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod"):
        assert keyword not in ds


def test_a_retry_writes_the_same_bytes(series: SeriesVolume, labels: np.ndarray, tmp_path: Path) -> None:
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), first)
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), second)
    assert first.read_bytes() == second.read_bytes()


def test_a_newer_algorithm_writes_under_other_uids(series: SeriesVolume, labels: np.ndarray) -> None:
    newer = AlgorithmInfo(ALGORITHM.name, "2.0", ALGORITHM.family)
    old, new = (
        build_rtstruct(series, labels, ALGORITHM, STRUCTURES),
        build_rtstruct(series, labels, newer, STRUCTURES),
    )
    assert old.SeriesInstanceUID != new.SeriesInstanceUID and old.SOPInstanceUID != new.SOPInstanceUID


def test_a_deidentified_series_gives_an_rtstruct_that_says_so(tmp_path: Path, strict_reading: None) -> None:
    paths = f.make_deidentified_ct_series(
        tmp_path / "ct", method=None, method_codes=(), n_slices=4, rows=32, cols=48
    )
    series = load_series(paths)
    labels = f.lung_and_bone_labels(series.volume.hu, RIGHT_LUNG.label, LEFT_LUNG.label, AIRWAYS.label)
    path = tmp_path / "rtstruct.dcm"
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    ds = pydicom.dcmread(path)
    assert (ds.PatientIdentityRemoved, ds.DeidentificationMethod) == ("YES", UNRECORDED_DEIDENTIFICATION)
    assert [r.ROIName for r in ds.StructureSetROISequence] == [
        "Right lung",
        "Left lung",
        "Trachea and bronchi",
    ]


# --- rejected label maps (the SEG's checks, shared) -------------------------------------------


def test_nothing_found_rejects_the_series(series: SeriesVolume) -> None:
    with pytest.raises(SeriesRejectedError, match="found none of its structures"):
        build_rtstruct(series, np.zeros(series.volume.hu.shape, np.uint8), ALGORITHM, STRUCTURES)


def test_unknown_label_is_a_segmenter_fault(series: SeriesVolume, labels: np.ndarray) -> None:
    bad = labels.copy()
    bad[0, 0, 0] = 9
    with pytest.raises(ProcessingFailedError, match=r"value\(s\) \[9\]"):
        build_rtstruct(series, bad, ALGORITHM, STRUCTURES)


# --- outlines ---------------------------------------------------------------------------------


def fill(outlines: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for outline in outlines:
        rows, cols = polygon(outline[:, 0], outline[:, 1], shape)
        mask[rows, cols] ^= True
    return mask


def test_outlines_close_on_the_image_edge_and_keep_only_corners() -> None:
    mask = np.ones((6, 9), dtype=bool)
    mask[2:4, 3:6] = False  # a hole
    outer, hole = sorted(slice_contours(mask), key=len, reverse=True)
    # The outer outline runs half a pixel outside the image, its corners cut: 8 points of the 30
    # traced (one on every pixel edge crossed).
    assert len(outer) == 8 and outer[:, 0].min() == -0.5 and outer[:, 1].max() == 8.5
    assert len(hole) == 8
    np.testing.assert_array_equal(fill([outer, hole], mask.shape), mask)
    assert slice_contours(np.zeros((4, 4), dtype=bool)) == []
    single = np.zeros((3, 3), dtype=bool)
    single[1, 1] = True
    (diamond,) = slice_contours(single, tolerance_px=0.5)  # too small to simplify: kept as traced
    assert len(diamond) == 4
    np.testing.assert_array_equal(fill([diamond], single.shape), single)


def test_simplification_trades_points_for_a_little_accuracy() -> None:
    rows, cols = np.mgrid[0:512, 0:512]
    disk = (rows - 250.3) ** 2 + (cols - 260.7) ** 2 <= 200.0**2
    (exact,) = slice_contours(disk)
    (simple,) = slice_contours(disk, tolerance_px=0.5)
    np.testing.assert_array_equal(fill([exact], disk.shape), disk)
    assert len(simple) < len(exact) / 2
    assert dice(fill([simple], disk.shape), disk) >= 0.999


def test_series_description_fits_lo() -> None:
    long = AlgorithmInfo("a-very-long-segmenter-name-" * 4, "12.3.4", ALGORITHM.family)
    text = series_description(long)
    assert len(text) == 64 and text.startswith("AI (a-very-long-") and text.endswith(")")


# --- the real thorax --------------------------------------------------------------------------


@pytest.mark.slow  # ~15 s on a 2-core machine: the independent reader fills ~1,500 contours
def test_real_thorax_classical_rtstruct(tmp_path: Path, strict_reading: None) -> None:
    # The de-identified planning CT through the classical segmenter: body, lungs, airways, every
    # one read back by dicompyler-core to the label map (the body as every labelled voxel).
    series = load_series(sorted((THORAX / "ct").iterdir()))
    segmenter = ClassicalSegmenter()
    labels = segmenter.predict(series.volume)
    start = time.perf_counter()
    ds = build_rtstruct(series, labels, segmenter.algorithm, segmenter.structures)
    print(f"thorax RTSTRUCT built in {time.perf_counter() - start:.2f} s")
    path = tmp_path / "rtstruct.dcm"
    write_dataset(ds, path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    info, masks = read_back(path, series)
    present = [s for s in segmenter.structures if np.any(labels == s.label)]
    assert list(masks) == [s.name for s in present] and len(present) == 4
    for structure in present:
        expected = truth(labels, structure)
        score = dice(masks[structure.name], expected)
        print(f"{structure.name}: Dice {score:.5f}")
        assert score >= 0.95, structure.name
        np.testing.assert_array_equal(masks[structure.name], expected, err_msg=structure.name)
    assert [info[s.name]["type"] for s in present] == ["EXTERNAL", "ORGAN", "ORGAN", "ORGAN"]
    for structure in present:
        assert tuple(int(v) for v in info[structure.name]["color"]) == structure.rgb  # type: ignore[attr-defined]
    back = pydicom.dcmread(path)
    identified = [o.RTROIIdentificationCodeSequence[0].CodeValue for o in back.RTROIObservationsSequence]
    assert identified == [s.type.value for s in present]
    assert back.PatientIdentityRemoved == "YES" and back.DeidentificationMethod
    contoured = {
        image.ReferencedSOPInstanceUID
        for roi in back.ROIContourSequence
        for contour in roi.ContourSequence
        for image in contour.ContourImageSequence
    }
    referenced = {
        image.ReferencedSOPInstanceUID
        for image in back.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    }
    assert contoured <= referenced == set(series.sop_instance_uids)
    longest = max(int(c.NumberOfContourPoints) for c in back.ROIContourSequence[0].ContourSequence)
    assert longest < 1000  # a body outline of hundreds of points, not thousands
