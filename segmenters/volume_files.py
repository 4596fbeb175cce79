"""Volumes as files: NIfTI read and written with nibabel (public data sets ship it), oriented by
its affine, and the synthetic phantoms written as DICOM CT series, as the node meets real data."""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from segmenters.base import Volume
from segmenters.ct_series import SeriesVolume
from segmenters.orientation import to_canonical
from segmenters.synthetic import Phantom

SERIES_DESCRIPTION = "Synthetic thorax phantom (demo)"
RESCALE_INTERCEPT = -1024  # stored = HU + 1024: 12 unsigned bits hold -1024 .. 3071


def write_nifti(phantom: Phantom, image_path: str | Path, label_path: str | Path) -> None:
    """The phantom as two NIfTI-1 files (``.nii.gz`` compressed, ``.nii`` plain): the CT in HU
    (int16) and the label map (uint8), with qform and sform giving the voxel spacing and position."""
    description = f"{SERIES_DESCRIPTION}, seed {phantom.seed}"
    affine = nifti_affine(Volume(phantom.hu, phantom.spacing), phantom.origin)
    _write_nifti(Path(image_path), phantom.hu, affine, description)
    _write_nifti(Path(label_path), phantom.labels, affine, description + ", labels")


def write_label_nifti(series: SeriesVolume, labels: np.ndarray, path: str | Path, description: str) -> None:
    """A label map of ``series`` (indexed like ``series.volume.hu``) as a NIfTI-1 file placed where
    the series lies, for tools that read NIfTI rather than DICOM-SEG."""
    _write_nifti(Path(path), labels, nifti_affine(series.volume, series.first_position), description)


def nifti_affine(volume: Volume, origin: tuple[float, float, float]) -> np.ndarray:
    """The NIfTI affine of a (slice, row, column) volume whose voxel (0, 0, 0) lies at ``origin``
    (LPS): NIfTI's first index is the column, and its world is RAS (LPS with x and y negated)."""
    dz, dy, dx = volume.spacing
    slices, rows, cols = (np.asarray(axis, dtype=np.float64) for axis in volume.axes_lps)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = cols * dx, rows * dy, slices * dz
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, description: str) -> None:
    image = nib.Nifti1Image(np.ascontiguousarray(array).transpose(2, 1, 0), affine)
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    nib.save(image, path)


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D NIfTI image as a (slice, row, column) array in this project's orientation (slices foot
    to head, rows front to back, columns the patient's right to left: DICOM's LPS) and its
    (slice, row, column) spacing in mm, whatever orientation the file stores (its qform or sform,
    as nibabel chooses); scaling applied only when it is not the identity."""
    try:
        image = nib.load(path)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable NIfTI image ({err})") from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI image")
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: not a 3D image (shape {data.shape})")
    # The affine's columns (NIfTI axes i, j, k: column, row, slice) in LPS, as a volume's axes.
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :3]
    zooms = np.linalg.norm(lps, axis=0)
    axes = tuple((float(x), float(y), float(z)) for x, y, z in (lps[:, k] / zooms[k] for k in (2, 1, 0)))
    stored = Volume(data.transpose(2, 1, 0), (float(zooms[2]), float(zooms[1]), float(zooms[0])), axes)
    canonical, _ = to_canonical(stored)
    return np.ascontiguousarray(canonical.hu), canonical.spacing


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
