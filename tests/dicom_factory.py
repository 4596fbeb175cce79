"""Synthetic DICOM test data, made in code so that no patient data is ever checked in.

``make_ct_series`` writes a small CT Image Storage series of a phantom (a soft-tissue body, two lungs,
a vertebra, air around) with complete enough headers for highdicom and dciodvfy. The other helpers
spoil such a series in one precise way each (a rewritten header, a truncated file, a missing Pixel
Data element ...) or transcode it to another transfer syntax, so that every rule of the series
loader can be tested on exactly the fault it guards against.
"""

from __future__ import annotations

import datetime
import math
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
ENHANCED_CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")

RESCALE_INTERCEPT = -1024
AIR_HU = -1000
LUNG_HU = -850
BODY_HU = 0
BONE_HU = 700

# Transfer syntaxes whose decoded pixels must equal the original exactly.
LOSSLESS_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
)
LOSSY_SYNTAXES: tuple[UID, ...] = (JPEGExtended12Bit, JPEG2000)

# DCMTK command lines per target syntax (input and output file are appended).
_DCMTK: dict[str, list[str]] = {
    ImplicitVRLittleEndian: ["dcmconv", "+ti"],
    ExplicitVRLittleEndian: ["dcmconv", "+te"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
    ExplicitVRBigEndian: ["dcmconv", "+tb"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee", "+q", "95"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    RLELossless: ["dcmcrle"],
}


def phantom_hu(n_slices: int, rows: int, cols: int) -> np.ndarray:
    """The phantom in HU, indexed (slice, row, column), int16.

    The lungs grow from the first slice to the last and the vertebra moves, so that every slice
    differs from every other and a wrong slice order cannot go unnoticed.
    """
    hu = np.full((n_slices, rows, cols), AIR_HU, dtype=np.int16)
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    r = (r + 0.5) / rows * 2 - 1  # -1 .. 1, anterior to posterior
    c = (c + 0.5) / cols * 2 - 1  # -1 .. 1, patient right to left
    body = (c / 0.9) ** 2 + (r / 0.7) ** 2 <= 1
    for k in range(n_slices):
        f = (k + 1) / n_slices
        lung_r = 0.15 + 0.2 * f
        right = ((c + 0.4) / lung_r) ** 2 + ((r + 0.05) / (lung_r * 1.5)) ** 2 <= 1
        left = ((c - 0.4) / lung_r) ** 2 + ((r + 0.05) / (lung_r * 1.5)) ** 2 <= 1
        bone = (c**2 + (r - 0.3 - 0.2 * f) ** 2) <= 0.1**2
        sl = hu[k]
        sl[body] = BODY_HU
        sl[body & (right | left)] = LUNG_HU
        sl[body & bone] = BONE_HU
    return hu


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def slice_positions(
    n_slices: int,
    *,
    spacing: float,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-160.0, -160.0, -50.0),
    tilt_deg: float = 0.0,
) -> list[tuple[float, float, float]]:
    """ImagePositionPatient per slice: ``spacing`` apart along the normal of ``orientation``.

    With ``tilt_deg`` each step also moves along the column direction by ``spacing * tan(tilt)``,
    as the positions of a gantry-tilted acquisition do: the slices are sheared, not stacked.
    """
    row, col = _unit(orientation[:3]), _unit(orientation[3:])
    normal = np.cross(row, col)
    shear = math.tan(math.radians(tilt_deg))
    base = np.asarray(origin, dtype=np.float64)
    out = []
    for k in range(n_slices):
        p = base + k * spacing * (normal + shear * col)
        out.append((round(float(p[0]), 4), round(float(p[1]), 4), round(float(p[2]), 4)))
    return out


def _file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    return meta


def _patient_and_study(ds: Dataset, *, study_uid: str, patient_name: str, patient_id: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"


def make_ct_series(
    folder: Path,
    *,
    n_slices: int = 8,
    rows: int = 64,
    cols: int = 64,
    spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (5.0, 5.0),
    slice_thickness: float | None = None,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-160.0, -160.0, -50.0),
    tilt_deg: float = 0.0,
    skip_slices: Sequence[int] = (),
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "Synthetic^Phantom",
    patient_id: str = "SYN0001",
    rescale_slope: float = 1.0,
    rescale_intercept: float = RESCALE_INTERCEPT,
) -> list[Path]:
    """Write a synthetic CT series into ``folder``; return the file paths in slice order.

    Slice ``k`` holds ``phantom_hu(n_slices, rows, cols)[k]`` at ``slice_positions(...)[k]``;
    indices in ``skip_slices`` are not written (a missing slice). ``transfer_syntax`` is one that
    :func:`transcode` knows; the original is written Explicit VR Little Endian and converted.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    hu = phantom_hu(n_slices, rows, cols)
    positions = slice_positions(
        n_slices, spacing=spacing, orientation=orientation, origin=origin, tilt_deg=tilt_deg
    )
    normal = np.cross(_unit(orientation[:3]), _unit(orientation[3:]))
    stored = np.round((hu.astype(np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("slope/intercept put the phantom outside 12-bit unsigned stored values")
    stored_u16 = stored.astype(np.uint16)
    paths: list[Path] = []
    for k in range(n_slices):
        if k in skip_slices:
            continue
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
        _patient_and_study(ds, study_uid=study_uid, patient_name=patient_name, patient_id=patient_id)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = "20240102"
        ds.InstanceCreationTime = "101600"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Synthetic phantom"
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "segnode test factory"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20240102"
        ds.ContentTime = "101500"
        ds.ImagePositionPatient = list(positions[k])
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.SliceLocation = round(float(np.dot(positions[k], normal)), 4)
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_thickness if slice_thickness is not None else spacing
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = rescale_intercept
        ds.RescaleSlope = rescale_slope
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored_u16[k].tobytes()
        path = folder / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if transfer_syntax != ExplicitVRLittleEndian:
        paths = transcode(paths, transfer_syntax)
    return paths


def transcode(paths: Sequence[Path], syntax: str, out_folder: Path | None = None) -> list[Path]:
    """Convert ``paths`` to transfer syntax ``syntax``; return the new paths in the same order.

    DCMTK does every syntax it can (an encoder other than the decoders under test); JPEG 2000,
    which the free DCMTK lacks, is encoded by pydicom with pylibjpeg-openjpeg. Without
    ``out_folder`` the files are converted in place.
    """
    out: list[Path] = []
    for src in paths:
        dst = (out_folder / src.name) if out_folder is not None else src
        if out_folder is not None:
            out_folder.mkdir(parents=True, exist_ok=True)
        if syntax in _DCMTK:
            if shutil.which(_DCMTK[syntax][0]) is None:
                raise RuntimeError(f"{_DCMTK[syntax][0]} is not installed: ./dev setup --test installs DCMTK")
            tmp = dst.with_suffix(".tmp")
            subprocess.run([*_DCMTK[syntax], str(src), str(tmp)], check=True, capture_output=True)
            tmp.replace(dst)
        elif syntax in (JPEG2000Lossless, JPEG2000):
            ds = pydicom.dcmread(src)
            if syntax == JPEG2000Lossless:
                ds.compress(JPEG2000Lossless)
            else:
                ds.compress(JPEG2000, j2k_psnr=[60])
            ds.save_as(dst, enforce_file_format=True)
        else:
            raise ValueError(f"transcode does not know transfer syntax {syntax}")
        out.append(dst)
    return out


def modify(path: Path, **elements: Any) -> Path:
    """Rewrite ``path`` with header ``elements`` set (value ``None`` deletes one).

    Validation is off so that hostile values (a UID of ``../../etc``) can be written at all.
    """
    ds = pydicom.dcmread(path)
    for keyword, value in elements.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path


def set_hostile_uid(path: Path, keyword: str = "SeriesInstanceUID", value: str = "../../etc") -> Path:
    """Give ``path`` a UID that is a path traversal, not a UID."""
    return modify(path, **{keyword: value})


def set_transfer_syntax_uid(path: Path, uid: str) -> Path:
    """Relabel the transfer syntax of ``path`` without re-encoding its data set.

    Gives a file a syntax no decoder knows (``1.2.3.4``) or one it cannot decode (MPEG-2).
    """
    raw = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta_end = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    meta.TransferSyntaxUID = UID(uid)
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(raw[:128] + b"DICM" + buf.getvalue() + raw[meta_end:])
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut ``path`` to ``keep`` of its length (a transfer that stopped half way)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def strip_pixel_data(path: Path) -> Path:
    """Remove the Pixel Data element: a header with no image."""
    return modify(path, PixelData=None)


def make_secondary_capture(folder: Path, *, study_uid: str | None = None) -> Path:
    """A Secondary Capture image (a screenshot): an image, but not a CT slice."""
    folder.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(SECONDARY_CAPTURE_STORAGE, sop_uid, ExplicitVRLittleEndian)
    _patient_and_study(
        ds, study_uid=study_uid or generate_uid(), patient_name="Synthetic^Phantom", patient_id="SYN0001"
    )
    ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((16, 16), np.uint8).tobytes()
    path = folder / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_basic_sr(folder: Path, *, study_uid: str | None = None) -> Path:
    """A Basic Text SR document: no image at all."""
    folder.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR_STORAGE, sop_uid, ExplicitVRLittleEndian)
    _patient_and_study(
        ds, study_uid=study_uid or generate_uid(), patient_name="Synthetic^Phantom", patient_id="SYN0001"
    )
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 98
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = datetime.date(2024, 1, 2).strftime("%Y%m%d")
    ds.ContentTime = "101500"
    path = folder / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_enhanced_ct(folder: Path, *, n_frames: int = 4) -> Path:
    """A (minimal) Enhanced CT Image object: one multi-frame instance instead of a slice per file."""
    paths = make_ct_series(folder / "src", n_slices=n_frames)
    frames = [pydicom.dcmread(p) for p in paths]
    ds = frames[0]
    sop_uid = generate_uid()
    ds.file_meta = _file_meta(ENHANCED_CT_STORAGE, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = ENHANCED_CT_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.NumberOfFrames = n_frames
    ds.PixelData = b"".join(f.PixelData for f in frames)
    path = folder / f"{sop_uid}.dcm"
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    shutil.rmtree(folder / "src")
    return path


def copy_with_series_uids(
    paths: Sequence[Path], folder: Path, *, study_uid: str | None = None, series_uid: str | None = None
) -> list[Path]:
    """Copy ``paths`` into ``folder``, giving Study/Series Instance UIDs to files whose are empty.

    The shared real series was anonymised by emptying these (type 1) UIDs; every PACS would refuse
    it. Restoring them on a copy leaves everything else, compressed pixel data included, untouched.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for src in paths:
        dst = folder / src.name
        shutil.copyfile(src, dst)
        ds = pydicom.dcmread(dst)
        updates = {}
        if not ds.get("StudyInstanceUID"):
            updates["StudyInstanceUID"] = study_uid
        if not ds.get("SeriesInstanceUID"):
            updates["SeriesInstanceUID"] = series_uid
        out.append(modify(dst, **updates) if updates else dst)
    return out


def lung_and_bone_labels(hu: np.ndarray, right_lung: int, left_lung: int, bone: int) -> np.ndarray:
    """A label map of a series made here, as a segmenter would give it: lung voxels of the image's
    left half (the patient's right) ``right_lung``, of its right half ``left_lung``, bone ``bone``."""
    labels = np.zeros(hu.shape, np.uint8)
    lung = hu == LUNG_HU
    half = hu.shape[2] // 2
    labels[:, :, :half][lung[:, :, :half]] = right_lung
    labels[:, :, half:][lung[:, :, half:]] = left_lung
    labels[hu == BONE_HU] = bone
    return labels


# De-identification Method Code Sequence items (CID 7050): the profile and one option.
BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
MODIFIED_DATES_OPTION = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")


def make_deidentified_ct_series(
    folder: Path,
    *,
    method: str | None = "segnode test factory",
    method_codes: Sequence[tuple[str, str, str]] = (BASIC_PROFILE, MODIFIED_DATES_OPTION),
    **series: Any,
) -> list[Path]:
    """:func:`make_ct_series` as a de-identifier leaves it: Patient Identity Removed YES, with
    ``method`` and ``method_codes`` (value, scheme, meaning) as the method; give neither to get the
    series some public collections hold, which says YES but not how."""
    paths = make_ct_series(folder, patient_name="Anonymized^", patient_id="ANON0001", **series)
    items = []
    for value, scheme, meaning in method_codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        items.append(item)
    for path in paths:
        modify(
            path,
            PatientIdentityRemoved="YES",
            DeidentificationMethod=method,
            DeidentificationMethodCodeSequence=items or None,
        )
    return paths
