"""build_sr: every SR written is validated by dciodvfy and read back strictly, and its
numbers are checked against the label map it measures."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from segmenters.base import AlgorithmInfo, Structure
from segmenters.classical import ClassicalSegmenter
from segmenters.ct_series import SeriesVolume, load_series
from tests import dicom_factory as f
from tests.shared_data import THORAX
from tests.unit.test_seg_writer import (
    ALGORITHM,
    BODY,
    BONE,
    STRUCTURES,
    WITH_BODY,
    dciodvfy,
    labels_with_body,
    phantom_labels,
)
from workers.derived import write_dataset
from workers.errors import ProcessingFailedError
from workers.seg_writer import build_seg
from workers.sr_writer import build_sr, segment_statistics, series_description, sr_uids

REAL_THORAX = THORAX / "ct"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    return load_series(f.make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=8, rows=48, cols=64))


def _write_seg_and_sr(
    series: SeriesVolume, labels: np.ndarray, structures: Sequence[Structure], folder: Path
) -> tuple[Path, Path]:
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    seg = build_seg(series, labels, ALGORITHM, structures)
    write_dataset(seg, seg_path)
    write_dataset(build_sr(series, labels, ALGORITHM, structures, seg), sr_path)
    return seg_path, sr_path


def _voxel_ml_from_headers(series: SeriesVolume) -> float:
    """A voxel's volume from the source headers themselves: pixel spacing by the step between
    slice positions (the synthetic series is axial, so the step is along z)."""
    rows_mm, cols_mm = (float(v) for v in series.datasets[0].PixelSpacing)
    z = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    step_mm = float(np.median(np.diff(z)))
    return rows_mm * cols_mm * step_mm / 1000.0


def measurement_groups(
    sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)  # TID 1500 at the root
    return report.get_volumetric_roi_measurement_groups()


def check_measurements(
    sr_path: Path,
    seg_path: Path,
    series: SeriesVolume,
    labels: np.ndarray,
    structures: Sequence[Structure],
    voxel_ml: float,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """Read ``sr_path`` back: one group per segment of the SEG at ``seg_path``, each referencing
    its segment, with the volume and mean HU of that segment's voxels in ``labels``."""
    by_name = {s.name: s for s in structures}
    seg = pydicom.dcmread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    groups = measurement_groups(sr)
    segments = list(seg.SegmentSequence)
    assert len(groups) == len(segments)
    hu = series.volume.hu
    for group, segment in zip(groups, segments, strict=True):
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_sop_class_uid == seg.SOPClassUID
        assert reference.referenced_segment_numbers == [int(segment.SegmentNumber)]
        assert group.tracking_identifier == segment.SegmentLabel
        assert group.finding_type == hd.sr.CodedConcept.from_dataset(
            segment.SegmentedPropertyTypeCodeSequence[0]
        )
        # The segment's voxels, as the SEG defines them: the body is every labelled voxel.
        structure = by_name[segment.SegmentLabel]
        mask = labels > 0 if structure.covers_all_labels else labels == structure.label
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit == hd.sr.CodedConcept("ml", "UCUM", "milliliter")
        assert volume.value == pytest.approx(np.count_nonzero(mask) * voxel_ml, rel=1e-6, abs=0.01)
        (mean,) = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert mean.unit == codes.UCUM.HounsfieldUnit
        assert mean.derivation == codes.SCT.Mean
        assert mean.value == pytest.approx(float(np.mean(hu[mask], dtype=np.float64)), abs=0.1)
    # The SEG and the CT slices are the SR's evidence; the SR is in the CT's study.
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {seg.SOPInstanceUID, *series.sop_instance_uids}
    assert sr.StudyInstanceUID == series.study_instance_uid
    return groups


# --- a good SR --------------------------------------------------------------------------------


def test_sr_measures_every_segment_with_the_body(
    series: SeriesVolume, tmp_path: Path, strict_reading: None
) -> None:
    labels = labels_with_body(series.volume.hu)
    seg_path, sr_path = _write_seg_and_sr(series, labels, WITH_BODY, tmp_path)
    if shutil.which("dciodvfy"):
        dciodvfy(sr_path)
    groups = check_measurements(sr_path, seg_path, series, labels, WITH_BODY, _voxel_ml_from_headers(series))
    assert [g.tracking_identifier for g in groups] == [s.name for s in WITH_BODY]
    body, right = groups[0], groups[1]
    # The body is larger than the lungs inside it, and as dense as a mix of air-filled lung and tissue.
    (body_volume,) = body.get_measurements(name=codes.SCT.Volume)
    (right_volume,) = right.get_measurements(name=codes.SCT.Volume)
    assert body_volume.value > right_volume.value > 0
    (right_mean,) = right.get_measurements(name=codes.DCM.AttenuationCoefficient)
    assert right_mean.value == pytest.approx(f.LUNG_HU)
    # Coded, never free text: finding, its site with laterality, and the algorithm.
    (site,) = right.finding_sites
    assert site.value == hd.sr.CodedConcept("39607008", "SCT", "Lung")
    assert site.laterality == hd.sr.CodedConcept("24028007", "SCT", "Right")
    assert right.finding_category == hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
    algorithm = hd.sr.utils.find_content_items(right[0], name=codes.DCM.AlgorithmName)
    assert [item.TextValue for item in algorithm] == [ALGORITHM.name]
    # Tracking UIDs are distinct per structure and the same on every build.
    assert len({g.tracking_uid for g in groups}) == len(groups)


def test_sr_of_a_seg_without_the_body(series: SeriesVolume, tmp_path: Path, strict_reading: None) -> None:
    # The heart is absent from the phantom: no segment, no group, and the vertebra is segment 3.
    labels = phantom_labels(series.volume.hu)
    seg_path, sr_path = _write_seg_and_sr(series, labels, STRUCTURES, tmp_path)
    if shutil.which("dciodvfy"):
        dciodvfy(sr_path)
    groups = check_measurements(sr_path, seg_path, series, labels, STRUCTURES, _voxel_ml_from_headers(series))
    assert [g.tracking_identifier for g in groups] == ["Right lung", "Left lung", "Vertebra"]
    assert [g.referenced_segment.referenced_segment_numbers for g in groups] == [[1], [2], [3]]  # type: ignore[union-attr]


def test_sr_of_a_seg_with_one_segment(series: SeriesVolume, tmp_path: Path, strict_reading: None) -> None:
    # A lone segment's identification is in the SEG's shared groups, where highdicom's own
    # ReferencedSegment.from_segmentation does not look.
    only = [STRUCTURES[0]]
    labels = phantom_labels(series.volume.hu)
    labels = np.where(labels == only[0].label, labels, 0).astype(labels.dtype)
    seg_path, sr_path = _write_seg_and_sr(series, labels, only, tmp_path)
    assert "SegmentIdentificationSequence" in pydicom.dcmread(seg_path).SharedFunctionalGroupsSequence[0]
    if shutil.which("dciodvfy"):
        dciodvfy(sr_path)
    groups = check_measurements(sr_path, seg_path, series, labels, only, _voxel_ml_from_headers(series))
    assert [g.tracking_identifier for g in groups] == [only[0].name]


def test_sr_of_a_seg_read_back_is_the_same(series: SeriesVolume, tmp_path: Path) -> None:
    # The worker may measure a SEG it built or one read from disk: the same SR either way.
    labels = labels_with_body(series.volume.hu)
    seg_path, sr_path = _write_seg_and_sr(series, labels, WITH_BODY, tmp_path)
    write_dataset(
        build_sr(series, labels, ALGORITHM, WITH_BODY, pydicom.dcmread(seg_path)), tmp_path / "again.dcm"
    )
    assert (tmp_path / "again.dcm").read_bytes() == sr_path.read_bytes()


def test_a_retry_writes_the_same_bytes(series: SeriesVolume, tmp_path: Path) -> None:
    labels = labels_with_body(series.volume.hu)
    seg = build_seg(series, labels, ALGORITHM, WITH_BODY)
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    write_dataset(build_sr(series, labels, ALGORITHM, WITH_BODY, seg), first)
    write_dataset(build_sr(series, labels, ALGORITHM, WITH_BODY, seg), second)
    assert first.read_bytes() == second.read_bytes()
    sr = pydicom.dcmread(first)
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == sr_uids(series, ALGORITHM)
    assert sr.SeriesNumber == 9903 and sr.Modality == "SR"
    assert sr.Manufacturer == "segnode" and str(sr.SoftwareVersions).startswith("segnode")
    # The content date-time is the newest source image's (the factory writes 2024-01-02 10:15).
    assert (sr.ContentDate, sr.ContentTime) == ("20240102", "101500")
    assert "InstanceCreationTime" not in sr
    assert all("ContributionDateTime" not in item for item in sr.ContributingEquipmentSequence)


def test_a_new_algorithm_gets_new_uids(series: SeriesVolume) -> None:
    newer = AlgorithmInfo(ALGORITHM.name, "1.1", ALGORITHM.family)
    assert sr_uids(series, newer)[0] != sr_uids(series, ALGORITHM)[0]
    assert set(sr_uids(series, ALGORITHM)).isdisjoint(
        {build_seg(series, phantom_labels(series.volume.hu), ALGORITHM, STRUCTURES).SOPInstanceUID}
    )


def test_a_deidentified_series_gives_an_sr_that_says_so(tmp_path: Path, strict_reading: None) -> None:
    paths = f.make_deidentified_ct_series(
        tmp_path / "ct", method=None, method_codes=(), n_slices=6, rows=32, cols=48
    )
    series = load_series(paths)
    _, sr_path = _write_seg_and_sr(series, phantom_labels(series.volume.hu), STRUCTURES, tmp_path)
    if shutil.which("dciodvfy"):
        dciodvfy(sr_path)
    sr = pydicom.dcmread(sr_path)
    assert sr.PatientIdentityRemoved == "YES" and sr.DeidentificationMethod


# --- the numbers ------------------------------------------------------------------------------


def test_statistics_use_the_spacing_between_slices(series: SeriesVolume) -> None:
    labels = labels_with_body(series.volume.hu)
    stats = segment_statistics(series, labels, ALGORITHM, WITH_BODY)
    spacing = series.volume.spacing
    assert [s.segment_number for s in stats] == [1, 2, 3, 4]
    assert stats[0].structure == BODY and stats[0].voxels == np.count_nonzero(labels)
    for s in stats:
        assert s.volume_ml == pytest.approx(s.voxels * spacing[0] * spacing[1] * spacing[2] / 1000.0)


def test_a_seg_of_other_segments_is_refused(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu)
    lungs_only = np.where(labels == BONE.label, 0, labels).astype(np.uint8)
    other = build_seg(series, lungs_only, ALGORITHM, STRUCTURES)  # the SEG of another map: no vertebra
    with pytest.raises(ProcessingFailedError, match="has segments"):
        build_sr(series, labels, ALGORITHM, STRUCTURES, other)


def test_a_label_map_that_does_not_fit_is_refused(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu)
    seg = build_seg(series, labels, ALGORITHM, STRUCTURES)
    with pytest.raises(ProcessingFailedError, match="label map of shape"):
        build_sr(series, labels[:-1], ALGORITHM, STRUCTURES, seg)
    unknown = labels.copy()
    unknown[0, 0, 0] = 9
    with pytest.raises(ProcessingFailedError, match=r"value\(s\) \[9\]"):
        build_sr(series, unknown, ALGORITHM, STRUCTURES, seg)


def test_only_a_seg_is_measured(series: SeriesVolume) -> None:
    labels = phantom_labels(series.volume.hu)
    with pytest.raises(ProcessingFailedError, match="SOP class"):
        build_sr(series, labels, ALGORITHM, STRUCTURES, series.datasets[0])


def test_series_description_fits_lo() -> None:
    assert series_description(ALGORITHM) == "AI measurements (segnode-classical 1.0)"
    long = AlgorithmInfo("a-very-long-segmenter-name-" * 4, "12.3.4", ALGORITHM.family)
    text = series_description(long)
    assert len(text) == 64 and text.startswith("AI (a-very-long-") and text.endswith(")")


# --- the real series --------------------------------------------------------------------------


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_real_thorax_classical_sr(tmp_path: Path, strict_reading: None) -> None:
    # A real de-identified thorax through the classical segmenter: a valid SR whose volumes and
    # means are those of the label map over the real grid.
    series = load_series(sorted(REAL_THORAX.iterdir()))
    segmenter = ClassicalSegmenter()
    labels = segmenter.predict(series.volume)
    seg = build_seg(series, labels, segmenter.algorithm, segmenter.structures)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    write_dataset(seg, seg_path)
    write_dataset(build_sr(series, labels, segmenter.algorithm, segmenter.structures, seg), sr_path)
    if shutil.which("dciodvfy"):
        dciodvfy(sr_path)
    sr = hd.sr.srread(sr_path)
    assert sr.PatientIdentityRemoved == "YES" and sr.DeidentificationMethod
    groups = measurement_groups(sr)
    assert [g.tracking_identifier for g in groups] == [s.SegmentLabel for s in seg.SegmentSequence]
    spacing = series.volume.spacing
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    by_name = {s.name: s for s in segmenter.structures}
    for group in groups:
        structure = by_name[str(group.tracking_identifier)]
        mask = labels > 0 if structure.covers_all_labels else labels == structure.label
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        (mean,) = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert volume.value == pytest.approx(np.count_nonzero(mask) * voxel_ml, rel=1e-6, abs=0.01)
        assert mean.value == pytest.approx(float(np.mean(series.volume.hu[mask], dtype=np.float64)), abs=0.1)
    (body,) = [g for g in groups if g.tracking_identifier == "Body"]
    (body_volume,) = body.get_measurements(name=codes.SCT.Volume)
    assert 5_000 < body_volume.value < 100_000  # an adult thorax, in mL
