"""Volumes as files: NIfTI-1 read and written without a NIfTI library (public data sets ship it),
and the synthetic phantoms written as DICOM CT series, as the node meets real data."""

from __future__ import annotations

import datetime
import gzip
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from segmenters.synthetic import Phantom

SERIES_DESCRIPTION = "Synthetic thorax phantom (demo)"
RESCALE_INTERCEPT = -1024  # stored = HU + 1024: 12 unsigned bits hold -1024 .. 3071

# NIfTI-1 header (348 bytes, little-endian), field by field as nifti1.h lists them.
_NIFTI_HEADER = struct.Struct("<i10s18sihBB8h3f4h8f3fhBB4f2i80s24s2h6f12f16s4s")
_NIFTI_TYPES: dict[int, np.dtype[Any]] = {  # NIfTI datatype code -> numpy dtype
    2: np.dtype(np.uint8),
    4: np.dtype(np.int16),
    8: np.dtype(np.int32),
    16: np.dtype(np.float32),
    64: np.dtype(np.float64),
    256: np.dtype(np.int8),
    512: np.dtype(np.uint16),
}
_NIFTI_DATA_OFFSET = 352  # header and the 4-byte "no extensions" flag
_NIFTI_MM = 2  # xyzt_units: spatial units in mm
_NIFTI_SCANNER = 1  # qform/sform code: scanner-based anatomical coordinates


def write_nifti(phantom: Phantom, image_path: str | Path, label_path: str | Path) -> None:
    """The phantom as two NIfTI-1 files (``.nii.gz`` compressed, ``.nii`` plain): the CT in HU
    (int16) and the label map (uint8), with qform and sform giving the voxel spacing and position.

    NIfTI's world is RAS (+x to the patient's left is -x there, likewise y), and its first index
    runs fastest: the (slice, row, column) array is stored as is and read as (column, row, slice).
    """
    description = f"{SERIES_DESCRIPTION}, seed {phantom.seed}"
    _write_nifti(Path(image_path), phantom.hu, phantom.spacing, phantom.origin, description)
    _write_nifti(Path(label_path), phantom.labels, phantom.spacing, phantom.origin, description + ", labels")


def _write_nifti(
    path: Path,
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    description: str,
) -> None:
    codes = {dtype: code for code, dtype in _NIFTI_TYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise ValueError(f"no NIfTI data type for {array.dtype}")
    n_slices, rows, cols = array.shape
    dz, dy, dx = spacing
    ox, oy, oz = origin  # LPS of voxel (0, 0, 0); RAS flips x and y
    header = _NIFTI_HEADER.pack(
        348,  # sizeof_hdr
        b"",  # data_type (unused)
        b"",  # db_name (unused)
        0,  # extents
        0,  # session_error
        ord("r"),  # regular
        0,  # dim_info
        *(3, cols, rows, n_slices, 1, 1, 1, 1),  # dim
        0.0,
        0.0,
        0.0,  # intent_p1..3
        0,  # intent_code
        codes[dtype],  # datatype
        dtype.itemsize * 8,  # bitpix
        0,  # slice_start
        *(1.0, dx, dy, dz, 0.0, 0.0, 0.0, 0.0),  # pixdim; pixdim[0] = qfac = 1
        float(_NIFTI_DATA_OFFSET),  # vox_offset
        1.0,  # scl_slope
        0.0,  # scl_inter
        0,  # slice_end
        0,  # slice_code
        _NIFTI_MM,  # xyzt_units
        0.0,
        0.0,
        0.0,
        0.0,  # cal_max, cal_min, slice_duration, toffset
        0,
        0,  # glmax, glmin
        description.encode("ascii")[:79],  # descrip
        b"",  # aux_file
        _NIFTI_SCANNER,  # qform_code
        _NIFTI_SCANNER,  # sform_code
        # quatern_b, c, d: the rotation diag(-1, -1, 1) (LPS axes in RAS) is b = c = 0, d = 1.
        *(0.0, 0.0, 1.0, -ox, -oy, oz),  # quaternion and qoffset_x, y, z
        *(-dx, 0.0, 0.0, -ox),  # srow_x
        *(0.0, -dy, 0.0, -oy),  # srow_y
        *(0.0, 0.0, dz, oz),  # srow_z
        b"",  # intent_name
        b"n+1\0",  # magic: header and data in one file
    )
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    payload = header + b"\0\0\0\0" + data
    if path.name.endswith(".gz"):
        with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D NIfTI-1 single file (``.nii`` or ``.nii.gz``) as a (slice, row, column) array and its
    (slice, row, column) spacing in mm, as ``write_nifti`` writes them: no reorientation is done
    and the intensity scaling is applied only when it is not the identity."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < _NIFTI_HEADER.size:
        raise ValueError(f"{path}: too short for a NIfTI-1 header")
    order: Literal["<", ">"] = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    fields = struct.Struct(order + _NIFTI_HEADER.format[1:]).unpack(raw[: _NIFTI_HEADER.size])
    if fields[0] != 348 or fields[-1] != b"n+1\0":
        raise ValueError(f"{path}: not a single-file NIfTI-1 image")
    dim = fields[7:15]
    datatype, pixdim = fields[19], fields[22:30]
    vox_offset, slope, inter = fields[30:33]
    if dim[0] < 3 or any(d != 1 for d in dim[4 : dim[0] + 1]):
        raise ValueError(f"{path}: not a 3D image (dim {dim[: dim[0] + 1]})")
    if datatype not in _NIFTI_TYPES:
        raise ValueError(f"{path}: NIfTI data type {datatype} is not supported")
    cols, rows, n_slices = dim[1:4]
    dtype = _NIFTI_TYPES[datatype].newbyteorder(order)
    count = cols * rows * n_slices
    start = int(vox_offset)
    if len(raw) < start + count * dtype.itemsize:
        raise ValueError(f"{path}: data truncated")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(n_slices, rows, cols)
    array = array.astype(dtype.newbyteorder("="))
    if slope not in (0.0, 1.0) or inter != 0.0:
        array = array * np.float32(slope or 1.0) + np.float32(inter)
    return array, (float(pixdim[3]), float(pixdim[2]), float(pixdim[1]))


def write_dicom_series(
    phantom: Phantom,
    folder: str | Path,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
) -> list[Path]:
    """The phantom as a CT Image Storage series, one file per slice in slice order (Explicit VR
    Little Endian); returns the paths.

    The headers are complete enough for the node's loader and for highdicom, and say what this
    is: Image Type DERIVED\\SECONDARY\\AXIAL, the series description, a derivation description
    and a made-up patient ("PHANTOM-<seed>" unless ``patient_id`` is given). New UIDs each call,
    except the study's when ``study_uid`` is given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    patient_id = patient_id if patient_id is not None else f"PHANTOM-{phantom.seed}"
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    stored = (phantom.hu.astype(np.int32) - RESCALE_INTERCEPT).clip(0, 4095).astype("<u2")
    dz, dy, dx = phantom.spacing
    ox, oy, oz = phantom.origin
    paths = []
    for k in range(phantom.hu.shape[0]):
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "segnode synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic demo study"
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.DerivationDescription = f"Synthetic demo phantom made in code (seed {phantom.seed}); not a patient"
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(dz)
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 901
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(ox), _ds(oy), _ds(oz + k * dz)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(oz + k * dz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = phantom.hu.shape[1], phantom.hu.shape[2]
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = -400
        ds.WindowWidth = 1500
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds(value: float) -> float:
    """A decimal string value short enough for DS (16 characters)."""
    return round(float(value), 4)
