"""build_seg / write_dataset: every SEG written is validated by dciodvfy and read back strictly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from segmenters import anatomy
from segmenters.base import ANATOMICAL_STRUCTURE, AlgorithmInfo, Concept, Structure
from segmenters.checkpoint import load_checkpoint
from segmenters.classical import ClassicalSegmenter
from segmenters.ct_series import SeriesVolume, load_series
from segmenters.datasets import read_dicom_seg
from segmenters.registry import DEMO_CHECKPOINT
from tests import dicom_factory as f
from workers.derived import UNRECORDED_DEIDENTIFICATION, write_dataset
from workers.errors import ProcessingFailedError, SeriesRejectedError
from workers.pipeline import segment_series
from workers.seg_writer import build_seg, seg_uids, series_description

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REAL_J2K = SHARED_DATA / "ct-abdomen-j2k"
REAL_THORAX = SHARED_DATA / "ct-thorax-lung1-002" / "ct"

ALGORITHM = AlgorithmInfo("segnode-classical", "1.0", Concept("123109", "Manual Processing", "DCM"))
RIGHT = Concept("24028007", "Right")
LEFT = Concept("7771000", "Left")
LUNG = Concept("39607008", "Lung")
RIGHT_LUNG = Structure(2, "Right lung", ANATOMICAL_STRUCTURE, LUNG, laterality=RIGHT, rgb=(128, 174, 128))
LEFT_LUNG = Structure(3, "Left lung", ANATOMICAL_STRUCTURE, LUNG, laterality=LEFT, rgb=(241, 214, 145))
HEART = Structure(4, "Heart", ANATOMICAL_STRUCTURE, Concept("80891009", "Heart"), rgb=(206, 110, 84))
BONE = Structure(7, "Vertebra", ANATOMICAL_STRUCTURE, Concept("51282000", "Vertebral column"))
STRUCTURES = (RIGHT_LUNG, LEFT_LUNG, HEART, BONE)  # the heart is not in the phantom
# As the classical segmenter labels them: the body (label 1) is what the lungs and airways leave.
BODY = anatomy.structure(1, "body")
WITH_BODY = (
    BODY,
    anatomy.structure(2, "right_lung"),
    anatomy.structure(3, "left_lung"),
    anatomy.structure(4, "airways"),  # the phantom's vertebra stands in for them
)


@pytest.fixture(scope="module")
def ct_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return f.make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=8, rows=48, cols=64)


@pytest.fixture(scope="module")
def series(ct_paths: list[Path]) -> SeriesVolume:
    return load_series(ct_paths)


def phantom_labels(hu: np.ndarray) -> np.ndarray:
    """Right lung 2 (image left half: patient right), left lung 3, bone 7, like a segmenter would."""
    return f.lung_and_bone_labels(hu, RIGHT_LUNG.label, LEFT_LUNG.label, BONE.label)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's complaints about ``path``; asserts there is no error and returns the warnings."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    warnings = [line for line in lines if "Warning" in line]
    for line in warnings:
        print("dciodvfy:", line)
    assert not errors, "\n".join(lines)
    return warnings


def expected_segment_map(labels: np.ndarray, present: list[Structure]) -> np.ndarray:
    out = np.zeros_like(labels)
    for number, structure in enumerate(present, start=1):
        out[labels == structure.label] = number
    return out


def check_roundtrip(
    seg_path: Path, series: SeriesVolume, labels: np.ndarray, present: list[Structure]
) -> hd.seg.Segmentation:
    """Read ``seg_path`` back and compare every segment with ``labels``, frame by source frame."""
    back = hd.seg.segread(seg_path)
    assert back.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in back.SegmentSequence] == list(range(1, len(present) + 1))
    assert [s.SegmentLabel for s in back.SegmentSequence] == [s.name for s in present]
    per_segment = back.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids),
        segment_numbers=list(range(1, len(present) + 1)),
    )
    for number, structure in enumerate(present, start=1):
        np.testing.assert_array_equal(per_segment[..., number - 1], labels == structure.label)
    combined = back.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), combine_segments=True
    )
    np.testing.assert_array_equal(combined, expected_segment_map(labels, present))
    # highdicom orders its volume its own way; the axial series runs foot->head, front->back, right->left.
    volume = back.get_volume(combine_segments=True).to_patient_orientation("HPL")
    assert volume.spatial_shape == labels.shape
    np.testing.assert_array_equal(volume.array, expected_segment_map(labels, present))
    return back


# --- a good SEG -------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless], ids=lambda s: s.name)
def test_seg_is_valid_and_reads_back(
    series: SeriesVolume, tmp_path: Path, strict_reading: None, syntax: str
) -> None:
    labels = phantom_labels(series.volume.hu)
    seg = build_seg(series, labels, ALGORITHM, STRUCTURES, transfer_syntax=syntax)
    path = tmp_path / "seg.dcm"
    write_dataset(seg, path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    present = [RIGHT_LUNG, LEFT_LUNG, BONE]
    back = check_roundtrip(path, series, labels, present)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.SeriesDescription == "AI segmentation (segnode-classical 1.0)"
    assert back.Modality == "SEG"
    assert back.StudyInstanceUID == series.study_instance_uid
    assert back.FrameOfReferenceUID == series.frame_of_reference_uid
    # Empty frames are left out: the lungs and bone are in all 8 slices, nothing else is stored.
    assert int(back.NumberOfFrames) == 3 * 8


def test_segment_descriptions_are_coded(series: SeriesVolume, strict_reading: None, tmp_path: Path) -> None:
    seg = build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES)
    write_dataset(seg, tmp_path / "seg.dcm")
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    right, left, bone = back.SegmentSequence
    for item, structure in ((right, RIGHT_LUNG), (left, LEFT_LUNG), (bone, BONE)):
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning) == (
            structure.type.value,
            "SCT",
            structure.type.meaning,
        )
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "segnode-classical"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("segnode-classical", "1.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123109"
        assert len(item.RecommendedDisplayCIELabValue) == 3
    assert (
        right.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
        == RIGHT.value
    )
    assert (
        left.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
        == LEFT.value
    )
    assert "SegmentedPropertyTypeModifierCodeSequence" not in bone.SegmentedPropertyTypeCodeSequence[0]


def test_references_cover_every_source_instance(series: SeriesVolume) -> None:
    seg = build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES)
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series.series_instance_uid
    referenced = [item.ReferencedSOPInstanceUID for item in ref_series.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(series.sop_instance_uids)
    # Each frame names the CT slice it was derived from.
    sources = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert sources == set(series.sop_instance_uids)


def test_non_contiguous_labels_are_renumbered(
    series: SeriesVolume, tmp_path: Path, strict_reading: None
) -> None:
    labels = phantom_labels(series.volume.hu)
    labels[labels == LEFT_LUNG.label] = 0  # only the right lung (2) and bone (7) remain
    seg = build_seg(series, labels, ALGORITHM, STRUCTURES)
    write_dataset(seg, tmp_path / "seg.dcm")
    check_roundtrip(tmp_path / "seg.dcm", series, labels, [RIGHT_LUNG, BONE])


def test_int64_label_map_is_accepted(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu).astype(np.int64)  # e.g. straight from argmax
    seg = build_seg(series, labels, ALGORITHM, STRUCTURES)
    assert len(seg.SegmentSequence) == 3


# --- deterministic UIDs -----------------------------------------------------------------------


def test_same_input_gives_the_same_uids(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu)
    a = build_seg(series, labels, ALGORITHM, STRUCTURES)
    b = build_seg(series, labels, ALGORITHM, STRUCTURES)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.SeriesInstanceUID != a.SOPInstanceUID
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == seg_uids(series, ALGORITHM)
    # Slice order is not input: a series loaded from shuffled paths gives the same SEG UIDs.
    reloaded = load_series(list(reversed([Path(p) for p in _paths_of(series)])))
    assert seg_uids(reloaded, ALGORITHM) == seg_uids(series, ALGORITHM)


def test_a_grown_series_keeps_its_uids_a_new_algorithm_gets_new_ones(
    ct_paths: list[Path], series: SeriesVolume
) -> None:
    # A series that grew after its job was made: the corrected SEG replaces the first one in the
    # PACS (same UIDs) instead of standing beside it.
    shorter = load_series(ct_paths[:-1])
    assert seg_uids(shorter, ALGORITHM) == seg_uids(series, ALGORITHM)
    assert (
        build_seg(shorter, phantom_labels(shorter.volume.hu), ALGORITHM, STRUCTURES).SOPInstanceUID
        == (seg_uids(series, ALGORITHM)[1])
    )
    newer = AlgorithmInfo(ALGORITHM.name, "1.1", ALGORITHM.family)
    assert seg_uids(series, newer)[0] != seg_uids(series, ALGORITHM)[0]
    other = AlgorithmInfo("segnode-unet", ALGORITHM.version, ALGORITHM.family)
    assert seg_uids(series, other)[1] != seg_uids(series, ALGORITHM)[1]
    seg = build_seg(series, phantom_labels(series.volume.hu), newer, STRUCTURES)
    assert seg.SOPInstanceUID == seg_uids(series, newer)[1]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless], ids=lambda s: s.name)
def test_a_retry_writes_the_same_bytes(series: SeriesVolume, tmp_path: Path, syntax: str) -> None:
    labels = phantom_labels(series.volume.hu)
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    write_dataset(build_seg(series, labels, ALGORITHM, STRUCTURES, transfer_syntax=syntax), first)
    write_dataset(build_seg(series, labels, ALGORITHM, STRUCTURES, transfer_syntax=syntax), second)
    assert first.read_bytes() == second.read_bytes()
    # What highdicom would make up at each build is derived or left out instead.
    seg = pydicom.dcmread(first)
    uids = {item.DimensionOrganizationUID for item in seg.DimensionIndexSequence}
    assert uids == {seg.DimensionOrganizationSequence[0].DimensionOrganizationUID}
    assert uids.isdisjoint({str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID)})
    # The content date-time is the newest source image's (the factory writes 2024-01-02 10:15).
    assert (seg.ContentDate, seg.ContentTime) == ("20240102", "101500")
    assert "InstanceCreationTime" not in seg
    assert all("ContributionDateTime" not in item for item in seg.ContributingEquipmentSequence)


def _paths_of(series: SeriesVolume) -> list[str]:
    return [str(ds.filename) for ds in series.datasets]


# --- the body segment, overlapping the others ------------------------------------------------


def labels_with_body(hu: np.ndarray) -> np.ndarray:
    """The phantom's lungs (2, 3) and vertebra (4), and body 1 for the rest of the patient."""
    labels = f.lung_and_bone_labels(hu, 2, 3, 4)
    labels[(hu > f.AIR_HU) & (labels == 0)] = BODY.label
    return labels


def segment_masks(seg: hd.seg.Segmentation, series: SeriesVolume) -> dict[str, np.ndarray]:
    """Each segment's mask by segment label, indexed like ``series.volume.hu``."""
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=numbers
    )
    return {item.SegmentLabel: pixels[..., k] > 0 for k, item in enumerate(seg.SegmentSequence)}


def test_body_segment_is_the_whole_body_and_the_others_are_unchanged(
    series: SeriesVolume, ct_paths: list[Path], tmp_path: Path, strict_reading: None
) -> None:
    labels = labels_with_body(series.volume.hu)
    path = tmp_path / "seg.dcm"
    write_dataset(build_seg(series, labels, ALGORITHM, WITH_BODY), path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    back = hd.seg.segread(path)
    assert back.SegmentsOverlap == "YES"
    body = back.SegmentSequence[0]
    assert body.SegmentLabel == "Body"
    assert body.SegmentedPropertyTypeCodeSequence[0].CodeValue == "38266002"  # Entire body
    masks = segment_masks(back, series)
    # The whole body: the lungs and the vertebra inside it too, not only what label 1 marks.
    np.testing.assert_array_equal(masks["Body"], labels > 0)
    assert masks["Body"][labels == 2].all() and np.count_nonzero(labels == 2) > 0
    for structure in WITH_BODY[1:]:
        np.testing.assert_array_equal(masks[structure.name], labels == structure.label)
    # Read back as a label map (training data), the later segments win: the map comes back whole.
    case = read_dicom_seg(ct_paths[0].parent, path, WITH_BODY)
    np.testing.assert_array_equal(case.labels, labels)


def test_body_alone_overlaps_nothing(series: SeriesVolume) -> None:
    labels = (series.volume.hu > f.AIR_HU).astype(np.uint8)  # a scan with no lungs: body only
    seg = build_seg(series, labels, ALGORITHM, WITH_BODY)
    assert seg.SegmentsOverlap == "NO" and len(seg.SegmentSequence) == 1


def test_a_body_the_segmenter_did_not_find_is_not_written(series: SeriesVolume) -> None:
    # The union of the lungs is not a body: without label 1 there is no Body segment.
    labels = f.lung_and_bone_labels(series.volume.hu, 2, 3, 4)
    seg = build_seg(series, labels, ALGORITHM, WITH_BODY)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [s.name for s in WITH_BODY[1:]]
    assert seg.SegmentsOverlap == "NO"


# --- colours ----------------------------------------------------------------------------------


def _lab(rgb: tuple[int, int, int]) -> np.ndarray:
    """CIELAB (L 0..100, a and b -128..127) of an RGB colour, via highdicom's DICOM encoding."""
    value = np.asarray(hd.color.CIELabColor.from_rgb(*rgb).value, dtype=np.float64)
    return value * np.array([100.0, 255.0, 255.0]) / 65535.0 - np.array([0.0, 128.0, 128.0])


@pytest.mark.parametrize("source", ["anatomy table", "demo model"])
def test_every_structure_has_a_colour_of_its_own(source: str) -> None:
    if source == "demo model":  # its card, as the worker loads it from the checkpoint
        structures = list(load_checkpoint(DEMO_CHECKPOINT)[1].structures)
    else:
        structures = [anatomy.structure(k, key) for k, key in enumerate(anatomy.keys(), start=1)]
    assert len({s.rgb for s in structures}) == len(structures)
    for k, a in enumerate(structures):
        for b in structures[k + 1 :]:
            distance = float(np.linalg.norm(_lab(a.rgb) - _lab(b.rgb)))
            assert distance >= 15.0, (a.name, b.name, distance)  # CIE76: told apart at a glance


def test_each_segment_of_a_seg_has_its_own_display_colour(
    series: SeriesVolume, tmp_path: Path, strict_reading: None
) -> None:
    write_dataset(
        build_seg(series, labels_with_body(series.volume.hu), ALGORITHM, WITH_BODY), tmp_path / "s.dcm"
    )
    segments = pydicom.dcmread(tmp_path / "s.dcm").SegmentSequence
    colours = [tuple(item.RecommendedDisplayCIELabValue) for item in segments]
    assert len(colours) == 4 and len(set(colours)) == 4
    by_label = dict(zip((item.SegmentLabel for item in segments), colours, strict=True))
    assert by_label["Right lung"] != by_label["Left lung"]


# --- de-identified series ---------------------------------------------------------------------


def test_a_deidentified_series_gives_a_seg_that_says_so_and_how(tmp_path: Path, strict_reading: None) -> None:
    series = load_series(f.make_deidentified_ct_series(tmp_path / "ct", n_slices=6, rows=32, cols=48))
    path = tmp_path / "seg.dcm"
    write_dataset(build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES), path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    seg = pydicom.dcmread(path)
    assert seg.PatientIdentityRemoved == "YES"
    assert seg.DeidentificationMethod == "segnode test factory"
    codes = [
        (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in seg.DeidentificationMethodCodeSequence
    ]
    assert codes == [f.BASIC_PROFILE, f.MODIFIED_DATES_OPTION]


def test_a_deidentified_series_that_does_not_say_how_gives_a_valid_seg(
    tmp_path: Path, strict_reading: None
) -> None:
    # As the shared thorax series: YES, and no method at all. Copied as it is, the SEG would fail
    # validation (De-identification Method is type 1C).
    paths = f.make_deidentified_ct_series(
        tmp_path / "ct", method=None, method_codes=(), n_slices=6, rows=32, cols=48
    )
    series = load_series(paths)
    path = tmp_path / "seg.dcm"
    write_dataset(build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES), path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    seg = pydicom.dcmread(path)
    assert (seg.PatientIdentityRemoved, seg.DeidentificationMethod) == ("YES", UNRECORDED_DEIDENTIFICATION)
    assert "DeidentificationMethodCodeSequence" not in seg


def test_an_identified_series_gives_no_deidentification_attributes(series: SeriesVolume) -> None:
    seg = build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES)
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        assert keyword not in seg


# --- rejected label maps ----------------------------------------------------------------------


def test_nothing_found_rejects_the_series(series: SeriesVolume) -> None:
    labels = np.zeros(series.volume.hu.shape, np.uint8)
    with pytest.raises(SeriesRejectedError, match=r"found none of its structures \(Right lung, Left lung"):
        build_seg(series, labels, ALGORITHM, STRUCTURES)


def test_unknown_label_is_a_segmenter_fault(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu)
    labels[0, 0, 0] = 9
    with pytest.raises(ProcessingFailedError, match=r"value\(s\) \[9\]"):
        build_seg(series, labels, ALGORITHM, STRUCTURES)


def test_wrong_shape_is_a_segmenter_fault(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu)[:-1]
    with pytest.raises(ProcessingFailedError, match="label map of shape"):
        build_seg(series, labels, ALGORITHM, STRUCTURES)


def test_float_label_map_is_a_segmenter_fault(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu).astype(np.float32)
    with pytest.raises(ProcessingFailedError, match="integer type"):
        build_seg(series, labels, ALGORITHM, STRUCTURES)


def test_duplicate_structure_labels_are_a_segmenter_fault(series: SeriesVolume) -> None:
    with pytest.raises(ProcessingFailedError, match="distinct and positive"):
        build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, (RIGHT_LUNG, RIGHT_LUNG))


def test_rle_is_refused_for_binary(series: SeriesVolume) -> None:
    with pytest.raises(ValueError, match="transfer syntax"):
        build_seg(
            series,
            phantom_labels(series.volume.hu),
            ALGORITHM,
            STRUCTURES,
            transfer_syntax="1.2.840.10008.1.2.5",
        )


# --- small parts ------------------------------------------------------------------------------


def test_series_description_fits_lo() -> None:
    long = AlgorithmInfo("a-very-long-segmenter-name-" * 4, "12.3.4", ALGORITHM.family)
    text = series_description(long)
    assert len(text) == 64 and text.startswith("AI (a-very-long-") and text.endswith(")")


def test_series_description_keeps_name_and_version_before_its_words() -> None:
    cropped = AlgorithmInfo("segnode-demo-thorax-unet (demo model) (body-cropped)", "1.0", ALGORITHM.family)
    assert series_description(cropped) == "AI (segnode-demo-thorax-unet (demo model) (body-cropped) 1.0)"
    assert series_description(ALGORITHM) == "AI segmentation (segnode-classical 1.0)"


def test_write_seg_replaces_atomically(series: SeriesVolume, tmp_path: Path) -> None:
    seg = build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES)
    path = tmp_path / "seg.dcm"
    path.write_bytes(b"old")
    write_dataset(seg, path)
    assert pydicom.dcmread(path).SOPInstanceUID == seg.SOPInstanceUID
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]  # no temp file left behind


def test_write_seg_leaves_nothing_on_failure(tmp_path: Path) -> None:
    broken = pydicom.Dataset()  # no file meta: pydicom refuses to write it as a file
    with pytest.raises((ValueError, AttributeError)):
        write_dataset(broken, tmp_path / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


# --- the real series --------------------------------------------------------------------------


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_real_series_seg(tmp_path: Path, strict_reading: None) -> None:
    paths = f.copy_with_series_uids(sorted(REAL_J2K.iterdir()), tmp_path / "ct")
    series = load_series(paths)
    hu = series.volume.hu
    labels = np.zeros(hu.shape, np.uint8)
    labels[hu > 250] = BONE.label
    labels[(hu > 20) & (hu < 80)] = HEART.label  # any soft-tissue label will do here
    seg = build_seg(series, labels, ALGORITHM, STRUCTURES, transfer_syntax=JPEG2000Lossless)
    path = tmp_path / "seg.dcm"
    write_dataset(seg, path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    check_roundtrip(path, series, labels, [HEART, BONE])


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_real_thorax_classical_seg(tmp_path: Path, strict_reading: None) -> None:
    # A real de-identified thorax (Patient Identity Removed YES, no method given) through the
    # classical segmenter: a valid SEG whose Body is the patient's whole outline.
    series = load_series(sorted(REAL_THORAX.iterdir()))
    segmenter = ClassicalSegmenter()
    labels = segmenter.predict(series.volume)
    path = tmp_path / "seg.dcm"
    write_dataset(build_seg(series, labels, segmenter.algorithm, segmenter.structures), path)
    if shutil.which("dciodvfy"):
        dciodvfy(path)
    back = hd.seg.segread(path)
    assert back.PatientIdentityRemoved == "YES" and back.DeidentificationMethod
    masks = segment_masks(back, series)
    np.testing.assert_array_equal(masks["Body"], labels > 0)
    assert masks["Body"][masks["Right lung"]].all() and masks["Right lung"].any()
    for structure in segmenter.structures[1:]:
        np.testing.assert_array_equal(masks[structure.name], labels == structure.label)


def test_dates_written_against_the_standard_are_left_empty_not_a_failed_job(tmp_path: Path) -> None:
    """A CT with its birth date as 1961-07-04 (common, not DICOM's 19610704): the SEG is written,
    dciodvfy-clean, with that date empty."""
    paths = f.make_ct_series(tmp_path / "ct", n_slices=4, rows=32, cols=32)
    for path in paths:
        f.modify(path, PatientBirthDate="1961-07-04", StudyTime="12:30")
    results = segment_series(
        paths, ClassicalSegmenter(), tmp_path / "out", transfer_syntax=ExplicitVRLittleEndian
    )
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert seg.PatientBirthDate == "" and seg.StudyTime == "" and results.seg_uid == seg.SOPInstanceUID
    checked = subprocess.run(["dciodvfy", str(tmp_path / "out" / "seg.dcm")], capture_output=True, text=True)
    assert " Error" not in checked.stderr, checked.stderr
