"""Measure each segment of a SEG and report it as a DICOM SR (TID 1500 Measurement Report): volume
in mL and mean HU, in numbers a PACS or a research pipeline reads without decoding a mask.

Counted from the label map the SEG was made of, so they agree with it exactly; Comprehensive 3D SR
because that is what TID 1500 readers (highdicom, dcmqi, OHIF) expect.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from node.core.uids import derive_uid
from segmenters.base import AlgorithmInfo, Concept, Structure
from segmenters.ct_series import SeriesVolume
from workers import derived
from workers.derived import (
    content_date_time,
    copy_deidentification,
    derived_uid,
    label_counts,
    software_version,
)
from workers.errors import ProcessingFailedError

log = logging.getLogger(__name__)

DEFAULT_SERIES_NUMBER = 9903  # after the SEG (9901) in a PACS series list

# The measurements, as dcmqi and the DICOM examples code them for CT: Volume (SCT) in millilitres,
# and the mean (derivation, CID 7464) of the attenuation coefficient in Hounsfield units.
VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)  # 118565006
MILLILITRE = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
ATTENUATION = hd.sr.CodedConcept.from_code(codes.DCM.AttenuationCoefficient)  # 112031
MEAN = hd.sr.CodedConcept.from_code(codes.SCT.Mean)  # 373098007
HOUNSFIELD_UNIT = hd.sr.CodedConcept.from_code(codes.UCUM.HounsfieldUnit)  # [hnsf'U]
# CID 100 has no code per body region a segmenter might see; the report names the modality only.
PROCEDURE = hd.sr.CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)  # 25045-6

# The device that made the observations is segnode itself, whichever series it measures: one UID
# for it (TID 1004 requires one), derived rather than random so the bytes stay the same.
DEVICE_OBSERVER_UID = derive_uid("segnode", "device-observer")


@dataclass(frozen=True)
class SegmentStatistics:
    """What the SR says of one segment: its voxel count, volume and mean HU."""

    segment_number: int
    structure: Structure
    voxels: int
    volume_ml: float
    mean_hu: float


def build_sr(
    series: SeriesVolume,
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    structures: Sequence[Structure],
    seg: Dataset,
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = "segnode",
    manufacturer_model_name: str = "segnode",
    software_versions: str | None = None,
    device_serial_number: str = "segnode",
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of volume and mean HU of every segment of ``seg``.

    ``seg`` is the SEG that :func:`workers.seg_writer.build_seg` made of ``label_map`` (indexed like
    ``series.volume.hu``) with ``algorithm`` and ``structures``, built or read back. Its segments
    are the structures present in the map, numbered in the order of ``structures``; the body's is
    every labelled voxel. Raises :class:`ProcessingFailedError` when the map or the SEG does not
    fit the series or each other: an SR whose numbers disagree with its SEG is never written.
    """
    stats = segment_statistics(series, label_map, algorithm, structures)
    _check_seg(seg, series, stats)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=_coded(algorithm.family)
    )
    groups = [_measurement_group(series, algorithm, algorithm_id, seg, s) for s in stats]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name="segnode",
            manufacturer_name=manufacturer,
            model_name=manufacturer_model_name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    content_date, content_time = content_date_time(series.datasets)
    series_uid, instance_uid = sr_uids(series, algorithm)
    sr = hd.sr.Comprehensive3DSR(
        # The CT first: the SR takes its patient and study from evidence[0].
        evidence=[*series.datasets, seg],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions or software_version(),
        device_serial_number=device_serial_number,
        series_description=series_description(algorithm),
        content_date=content_date,
        content_time=content_time,
        # Complete: every segment of the SEG is measured. Preliminary and unverified: no person
        # has reviewed an automatic measurement.
        is_complete=True,
    )
    _make_reproducible(sr)
    copy_deidentification(sr, series.datasets[0])
    log.info(
        "built SR %s for series %s: %d segment(s) of SEG %s measured",
        sr.SOPInstanceUID,
        series.series_instance_uid,
        len(stats),
        seg.SOPInstanceUID,
    )
    return sr


def sr_uids(series: SeriesVolume, algorithm: AlgorithmInfo) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR (:func:`workers.derived.derived_uid`)."""
    return derived_uid(series, algorithm, "sr-series"), derived_uid(series, algorithm, "sr-instance")


def series_description(algorithm: AlgorithmInfo) -> str:
    return derived.series_description(algorithm, "measurements")


def segment_statistics(
    series: SeriesVolume,
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    structures: Sequence[Structure],
) -> list[SegmentStatistics]:
    """Voxel count, volume and mean HU of each structure present in ``label_map``, numbered as the
    SEG numbers its segments: in the order of ``structures``, absent ones left out; a structure that
    covers all labels (the body) counts every labelled voxel.

    The volume is the voxel count times the voxel's volume: row and column spacing by the spacing
    between slice centres, which is what a voxel of a stack of slices stands for (not the slice
    thickness, which overlapping or gapped slices make larger or smaller).
    """
    counts, sums = label_counts(series, label_map, algorithm, structures, hu_sums=True)
    assert sums is not None
    voxel_ml = float(np.prod(series.volume.spacing)) / 1000.0  # mm^3 -> mL
    out: list[SegmentStatistics] = []
    for structure in structures:
        if counts[structure.label] == 0:
            continue  # not found: no segment in the SEG, nothing to measure
        if structure.covers_all_labels:
            n, total = int(counts[1:].sum()), float(sums[1:].sum())
        else:
            n, total = int(counts[structure.label]), float(sums[structure.label])
        out.append(SegmentStatistics(len(out) + 1, structure, n, n * voxel_ml, total / n))
    return out


# --- helpers ----------------------------------------------------------------------------------


def _check_seg(seg: Dataset, series: SeriesVolume, stats: Sequence[SegmentStatistics]) -> None:
    """The SEG is one of this series, with the segments the label map gives, in the same order."""
    if seg.SOPClassUID != SegmentationStorage:
        raise ProcessingFailedError(
            f"the SR measures a SEG; {seg.SOPInstanceUID} is of SOP class {seg.SOPClassUID}"
        )
    if seg.StudyInstanceUID != series.study_instance_uid:
        raise ProcessingFailedError(
            f"SEG {seg.SOPInstanceUID} belongs to another study than series {series.series_instance_uid}"
        )
    found = [(int(item.SegmentNumber), str(item.SegmentLabel)) for item in seg.SegmentSequence]
    expected = [(s.segment_number, s.structure.name[:64]) for s in stats]
    if found != expected:
        raise ProcessingFailedError(
            f"SEG {seg.SOPInstanceUID} has segments {found[:20]}; the label map gives {expected[:20]}"
        )


def _measurement_group(
    series: SeriesVolume,
    algorithm: AlgorithmInfo,
    algorithm_id: hd.sr.AlgorithmIdentification,
    seg: Dataset,
    stats: SegmentStatistics,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for one segment: what it is (finding, site), where (the SEG's segment, and through
    it the CT slices it lies on), and its volume and mean HU."""
    structure = stats.structure
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(series, algorithm, f"sr-tracking:{structure.name}"),
        identifier=structure.name[:64],
    )
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=stats.volume_ml, unit=MILLILITRE),
        hd.sr.Measurement(name=ATTENUATION, value=stats.mean_hu, unit=HOUNSFIELD_UNIT, derivation=MEAN),
    ]
    site = hd.sr.FindingSite(
        anatomic_location=_coded(structure.type),
        laterality=_coded(structure.laterality) if structure.laterality is not None else None,
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=_referenced_segment(seg, stats.segment_number),
        finding_type=_coded(structure.type),
        finding_category=_coded(structure.category),
        finding_sites=[site],
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _referenced_segment(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    """The segment and the CT images its frames derive from, as highdicom's ``from_segmentation``
    makes it; that reads each frame's segment from the per-frame groups only, where a SEG of one
    segment has none (its segment is in the shared groups)."""
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    sources: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        identification = frame.get("SegmentIdentificationSequence") or shared
        if identification[0].ReferencedSegmentNumber != number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                sources.setdefault(
                    source.ReferencedSOPInstanceUID,
                    hd.sr.SourceImageForSegmentation(
                        source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID
                    ),
                )
    if not sources:
        raise ProcessingFailedError(f"SEG {seg.SOPInstanceUID} has no frame of segment {number}")
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_images=list(sources.values()),
    )


def _coded(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


def _make_reproducible(sr: hd.sr.Comprehensive3DSR) -> None:
    """Drop what highdicom stamps with the time of building (all optional, type 3), so that the
    same input gives the same bytes: instance creation date and time, and contribution times."""
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in sr:
            delattr(sr, keyword)
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            del equipment.ContributionDateTime
