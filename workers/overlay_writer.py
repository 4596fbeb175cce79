"""Overlay images: the CT slices with each structure's outline burned in and a legend, for viewers
that cannot show a SEG.

Single-frame Secondary Capture (the image object every viewer displays), outlines rather than fills
so the anatomy inside stays readable, marked derived and "not for primary diagnosis". The SC IOD has
no Frame of Reference, so a viewer cannot link these images to the CT geometrically.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from scipy import ndimage

from segmenters.base import AlgorithmInfo, Structure
from segmenters.ct_series import SeriesVolume
from workers.derived import (
    check_label_map,
    content_date_time,
    copy_deidentification,
    derived_uid,
    software_version,
    write_dataset,
)
from workers.errors import ProcessingFailedError

log = logging.getLogger(__name__)

DEFAULT_SERIES_NUMBER = 9904  # after the SEG (9901) and SR (9903) in a PACS series list
# A Secondary Capture is "other" equipment's image: the convention (and highdicom's SCImage), and it
# keeps CT hanging protocols from treating these RGB images as CT.
MODALITY = "OT"
NOT_FOR_DIAGNOSIS = "AI result - not for primary diagnosis"
# A standard body (mediastinal) window, for a source that gives none: the organs a segmenter names
# are soft tissue, and the lung outlines stand out as well on dark lung as on lung-window grey.
BODY_WINDOW = (40.0, 400.0)  # center, width in HU

# Codes (DCM) for the derivation and for the reference to the CT slice.
_SEGMENTATION = ("113076", "DCM", "Segmentation")  # CID 7203 Image Derivation
_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")  # CID 7202

# What a derived object copies from its source to stay in the same patient and study: whole
# modules (Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study), so
# a module complete in the source is complete here.
_PATIENT_AND_STUDY = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)
# Type 2 in those modules: present, empty when the source lacks them.
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def build_overlay(
    series: SeriesVolume,
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    structures: Sequence[Structure],
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
) -> list[Dataset]:
    """One RGB Secondary Capture image per slice of ``series`` (in slice order) with the outlines
    of ``structures`` in ``label_map`` (indexed like ``series.volume.hu``) burned in.

    Raises :class:`ProcessingFailedError` when the label map does not fit the series or holds
    labels no structure names: the segmenter's fault, as for the SEG.
    """
    present_per_slice = _check_labels(series, label_map, algorithm, structures)
    rows, cols = label_map.shape[1:]
    center, width = _window(series.datasets[0])
    # Colour index per label (0: not drawn as a label of its own) and colour per index.
    palette = np.zeros((len(structures) + 1, 3), dtype=np.uint8)
    index_type = np.uint8 if len(structures) < 256 else np.uint16
    index_of_label = np.zeros(max((s.label for s in structures), default=0) + 1, dtype=index_type)
    body_index = 0
    for index, structure in enumerate(structures, start=1):
        palette[index] = structure.rgb
        if structure.covers_all_labels:
            body_index = index  # the outline of every label together, not of its own label
        else:
            index_of_label[structure.label] = index
    # As in the SEG: a body the segmenter found anywhere is outlined on every slice with labels.
    body = structures[body_index - 1] if body_index else None
    body_found = body is not None and any(body.label in present for present in present_per_slice)
    font_px = _font_size(rows, cols)
    legends: dict[tuple[int, ...], np.ndarray] = {}
    template = _series_header(series, algorithm, series_number, (center, width))

    overlays: list[Dataset] = []
    for k, source in enumerate(series.datasets):
        labels = label_map[k]
        drawn = tuple(
            index
            for index, structure in enumerate(structures, start=1)
            if (
                (body_found and bool(present_per_slice[k]))
                if index == body_index
                else structure.label in present_per_slice[k]
            )
        )
        if drawn not in legends:
            legends[drawn] = _legend([structures[i - 1] for i in drawn], font_px)
        grey, colour_index = _render(
            series.volume.hu[k], labels, (center, width), index_of_label, body_index if body_found else 0
        )
        rgb = np.repeat(grey[..., None], 3, axis=2)
        outline = colour_index > 0
        rgb[outline] = palette[colour_index[outline]]
        _paste(rgb, legends[drawn])
        overlays.append(_instance(template, series, algorithm, source, k, rgb))
    log.info(
        "built %d overlay image(s) for series %s (window C %g W %g, %d legend(s))",
        len(overlays),
        series.series_instance_uid,
        center,
        width,
        len(legends),
    )
    return overlays


def write_overlay(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each overlay image into ``folder`` as ``<SOP Instance UID>.dcm``, durably and
    atomically (:func:`workers.seg_writer.write_dataset`); returns the paths in the order given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        write_dataset(ds, path)
        paths.append(path)
    return paths


def series_description(algorithm: AlgorithmInfo) -> str:
    """The series list entry (LO, at most 64 characters): the algorithm, and what not to use it for."""
    suffix = " overlay (not for diagnosis)"
    return f"{algorithm.name[: 64 - len(suffix)]}{suffix}"


# --- checks -----------------------------------------------------------------------------------


def _check_labels(
    series: SeriesVolume,
    label_map: np.ndarray,
    algorithm: AlgorithmInfo,
    structures: Sequence[Structure],
) -> list[set[int]]:
    """The labels present on each slice; the map checked as the SEG writer checks it."""
    check_label_map(series, label_map, algorithm, structures)
    who = f"{algorithm.name} {algorithm.version}"
    labels = [s.label for s in structures]
    known = set(labels)
    present: list[set[int]] = []
    for plane in label_map:
        if label_map.dtype.kind == "i" and plane.min() < 0:
            raise ProcessingFailedError(f"segmenter {who} returned negative labels")
        found = {int(v) for v in np.flatnonzero(np.bincount(plane.ravel().astype(np.intp, copy=False)))}
        found.discard(0)
        unknown = sorted(found - known)
        if unknown:
            raise ProcessingFailedError(
                f"segmenter {who} labelled voxels with value(s) {unknown[:10]} that name none of its "
                "structures"
            )
        present.append(found)
    return present


# --- pixels -----------------------------------------------------------------------------------


def _window(source: Dataset) -> tuple[float, float]:
    """The source's first (default) window, else :data:`BODY_WINDOW`; one window for the whole
    series, so that scrolling through the images shows no jumps in brightness."""
    try:
        center = float(_first(source.get("WindowCenter")))
        width = float(_first(source.get("WindowWidth")))
    except (TypeError, ValueError):
        return BODY_WINDOW
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
        return BODY_WINDOW
    return center, width


def _first(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value[0] if len(value) else None
    return value


def _grey_levels(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """``hu`` through the linear VOI window of PS3.3 C.11.2.1.2.1, as 0..255 (uint8)."""
    scaled = (hu.astype(np.float32) - np.float32(center - 0.5)) / np.float32(max(width - 1, 1)) + 0.5
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return (scaled * 255 + 0.5).astype(np.uint8)


def _outline_width(rows: int, cols: int) -> int:
    """Outline width in pixels: 1 on images under 512 pixels, 2 on a 512 image; seen at a viewer's
    usual zoom (the image fit to a screen tile), a line of one pixel of 512 is too thin to follow."""
    return max(1, min(rows, cols) // 256)


def _render(
    hu: np.ndarray,
    labels: np.ndarray,
    window: tuple[float, float],
    index_of_label: np.ndarray,
    body_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(grey levels, colour index of the outline pixels, 0 elsewhere) of one slice.

    A pixel is on the outline of its structure when a pixel of another label (or the image border)
    lies within the outline width of it (a square neighbourhood): the minimum and the maximum label
    there differ. That finds every structure's inner edge at once, in two separable filters. The
    body's outline is where the labelled region as a whole ends (a 0 in the neighbourhood); the
    other structures' outlines are drawn over it where they meet.
    """
    size = 2 * _outline_width(*labels.shape) + 1
    low = ndimage.minimum_filter(labels, size=size, mode="constant", cval=0)
    high = ndimage.maximum_filter(labels, size=size, mode="constant", cval=0)
    inside = labels > 0
    index = np.where(inside & (low != high), index_of_label[labels], 0).astype(index_of_label.dtype)
    if body_index:
        index[inside & (low == 0) & (index == 0)] = body_index
    return _grey_levels(hu, *window), index


# --- legend -----------------------------------------------------------------------------------


def _font_size(rows: int, cols: int) -> int:
    """Text height in pixels: about 1/40 of the image (13 px on 512), never under 9 px."""
    return max(9, min(rows, cols) // 40)


def _legend(entries: Sequence[Structure], font_px: int) -> np.ndarray:
    """The legend as an RGB array: a colour swatch and the name of each structure drawn, then
    :data:`NOT_FOR_DIAGNOSIS`, in white on black. Pillow's own default font, so that the image does
    not depend on the fonts of the machine that drew it."""
    font = ImageFont.load_default(size=font_px)
    pad = max(2, font_px // 3)
    line = font_px + pad
    swatch = font_px - 2
    texts = [s.name for s in entries] + [NOT_FOR_DIAGNOSIS]
    indent = swatch + pad
    width = pad + max(
        int(np.ceil(font.getlength(text))) + (indent if i < len(entries) else 0)
        for i, text in enumerate(texts)
    )
    height = pad + line * len(texts)
    image = Image.new("RGB", (width + pad, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(texts):
        top = pad + i * line
        x = pad
        if i < len(entries):
            draw.rectangle((x, top + 1, x + swatch - 1, top + swatch), fill=entries[i].rgb)
            x += indent
        draw.text((x, top), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


def _paste(rgb: np.ndarray, legend: np.ndarray) -> None:
    """The legend into the top-left corner, cut to the image on small images."""
    margin = max(1, min(rgb.shape[:2]) // 100)
    h = min(legend.shape[0], rgb.shape[0] - margin)
    w = min(legend.shape[1], rgb.shape[1] - margin)
    rgb[margin : margin + h, margin : margin + w] = legend[:h, :w]


# --- attributes -------------------------------------------------------------------------------


def _series_header(
    series: SeriesVolume, algorithm: AlgorithmInfo, series_number: int, window: tuple[float, float]
) -> Dataset:
    """What every image of the overlay series shares."""
    source = series.datasets[0]
    ds = Dataset()
    for keyword in _PATIENT_AND_STUDY:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in _TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    copy_deidentification(ds, source)
    content_date, content_time = content_date_time(series.datasets)
    # General Series, General Equipment, SC Equipment
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = MODALITY
    ds.SeriesInstanceUID = derived_uid(series, algorithm, "overlay-series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description(algorithm)
    ds.SeriesDate = content_date
    ds.SeriesTime = content_time
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if source.get(keyword):
            ds[keyword] = source[keyword]
    if "Laterality" not in ds and "ImageLaterality" not in ds:
        # A paired (or unnamed) body part needs a laterality (General Series, type 2C), and Laterality
        # can only be R or L. An axial CT slice shows both sides of the body: Image Laterality B.
        ds.ImageLaterality = "B"
    ds.Manufacturer = "segnode"
    ds.ManufacturerModelName = "segnode"
    ds.SoftwareVersions = software_version()
    ds.ConversionType = "WSD"  # workstation: drawn by software, not captured from a video signal
    ds.SecondaryCaptureDeviceManufacturer = "segnode"
    ds.SecondaryCaptureDeviceManufacturerModelName = "segnode"
    ds.SecondaryCaptureDeviceSoftwareVersions = software_version()
    # General Image, General Reference
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ContentDate = content_date
    ds.ContentTime = content_time
    ds.PatientOrientation = patient_orientation(series.image_orientation)
    ds.BurnedInAnnotation = "YES"
    ds.ImageComments = (
        f"{NOT_FOR_DIAGNOSIS}. Outlines of the structures segmented by {algorithm.name} "
        f"{algorithm.version}, drawn over the CT image."
    )
    ds.DerivationDescription = (
        f"CT image in window C {window[0]:g} W {window[1]:g} with the outlines of the structures "
        f"segmented by {algorithm.name} {algorithm.version} and a legend burned in; "
        "not for primary diagnosis"
    )[:1024]
    ds.DerivationCodeSequence = [_code(*_SEGMENTATION)]
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in source:  # lossy once, lossy in everything derived from it
            ds[keyword] = source[keyword]
    # SC Image
    if "PixelSpacing" in source:
        ds.PixelSpacing = source.PixelSpacing
    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = series.volume.hu.shape[1:]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def _instance(
    template: Dataset,
    series: SeriesVolume,
    algorithm: AlgorithmInfo,
    source: Dataset,
    k: int,
    rgb: np.ndarray,
) -> Dataset:
    ds = copy.deepcopy(template)
    uid = derived_uid(series, algorithm, f"overlay-{source.SOPInstanceUID}")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = uid
    number = source.get("InstanceNumber")
    ds.InstanceNumber = number if number not in (None, "") else k + 1
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [_code(*_SOURCE_FOR_PROCESSING)]
    reference.SpatialLocationsPreserved = "YES"  # same pixel grid as the CT slice
    ds.SourceImageSequence = [reference]
    # Common Instance Reference: the series of the referenced CT slice.
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_instance_uid
    referenced_series.ReferencedInstanceSequence = [instance]
    ds.ReferencedSeriesSequence = [referenced_series]
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def patient_orientation(iop: Sequence[float]) -> list[str]:
    """Patient Orientation (General Image) from Image Orientation (Patient): the direction of the
    rows and of the columns as letters (L/R, A/P, H/F), the main one first; directions off an axis
    by less than about 6 degrees (a component under 0.1) count as on it."""

    def letters(v: Sequence[float]) -> str:
        out = ""
        for axis in np.argsort(-np.abs(np.asarray(v, dtype=np.float64)), kind="stable"):
            if abs(v[axis]) >= 0.1:
                out += ("LR", "PA", "HF")[axis][0 if v[axis] > 0 else 1]
        return out

    return [letters(iop[:3]), letters(iop[3:])]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
