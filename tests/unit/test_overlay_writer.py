"""build_overlay / write_overlay: Secondary Capture images of the CT with the outlines burned in,
validated by dciodvfy and read back strictly: the colours lie where the structures' outlines are."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from scipy import ndimage

from segmenters import anatomy
from segmenters.base import AlgorithmInfo, Structure
from segmenters.classical import ClassicalSegmenter
from segmenters.ct_series import SeriesVolume, load_series
from tests import dicom_factory as f
from tests import shared_data
from tests.unit.test_seg_writer import ALGORITHM, dciodvfy, labels_with_body
from workers.derived import UNRECORDED_DEIDENTIFICATION, derived_uid
from workers.errors import ProcessingFailedError
from workers.overlay_writer import (
    NOT_FOR_DIAGNOSIS,
    build_overlay,
    patient_orientation,
    series_description,
    write_overlay,
)

# As the classical segmenter labels them (the phantom's vertebra stands in for the airways), and a
# heart the phantom does not have: it must appear nowhere.
STRUCTURES = (
    anatomy.structure(1, "body"),
    anatomy.structure(2, "right_lung"),
    anatomy.structure(3, "left_lung"),
    anatomy.structure(4, "airways"),
    anatomy.structure(5, "heart"),
)
PRESENT = STRUCTURES[:4]
HEART = STRUCTURES[4]
ROWS, COLS = 192, 256  # under 512: outlines one pixel wide
LEGEND_PAD = 8  # the legend panel reaches this far past its text and swatches
LEGEND_ROWS = 72  # the legend of four structures on a small image ends above this row
SQUARE = np.ones((3, 3), dtype=bool)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    return load_series(f.make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=5, rows=ROWS, cols=COLS))


@pytest.fixture(scope="module")
def labels(series: SeriesVolume) -> np.ndarray:
    return labels_with_body(series.volume.hu)


@pytest.fixture(scope="module")
def written(series: SeriesVolume, labels: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_overlay(build_overlay(series, labels, ALGORITHM, STRUCTURES), tmp_path_factory.mktemp("ov"))


def outlines(labels: np.ndarray, structures: tuple[Structure, ...]) -> dict[Structure, np.ndarray]:
    """Each structure's one-pixel outline on a slice (the body's: of all labels together), as
    ``mask & ~binary_erosion(mask)`` with the image border counting as outside."""
    out = {}
    for structure in structures:
        mask = labels > 0 if structure.covers_all_labels else labels == structure.label
        out[structure] = mask & ~ndimage.binary_erosion(mask, structure=SQUARE, border_value=0)
    return out


def windowed(hu: np.ndarray, center: float = 40.0, width: float = 400.0) -> np.ndarray:
    """The grey level of each pixel in a linear DICOM window (PS3.3 C.11.2.1.2.1)."""
    return np.floor(np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255 + 0.5).astype(np.uint8)


def legend_box(rgb: np.ndarray, grey: np.ndarray, on_outline: np.ndarray) -> tuple[slice, slice]:
    """Where the legend is: what differs from the windowed CT off the outlines, with its panel."""
    rows, cols = np.nonzero((rgb != grey[..., None]).any(axis=2) & ~on_outline)
    return slice(0, rows.max() + LEGEND_PAD), slice(0, cols.max() + LEGEND_PAD)


# --- a good overlay ---------------------------------------------------------------------------


def test_overlay_is_valid_and_marked_as_derived(
    written: list[Path], series: SeriesVolume, strict_reading: None
) -> None:
    if shutil.which("dciodvfy"):
        for path in (written[0], written[-1]):
            dciodvfy(path)
    ct = series.datasets[0]
    for path in written:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
        assert (ds.BitsAllocated, ds.BitsStored, ds.Rows, ds.Columns) == (8, 8, ROWS, COLS)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert (ds.ConversionType, ds.BurnedInAnnotation) == ("WSD", "YES")
        assert NOT_FOR_DIAGNOSIS in ds.ImageComments
        assert "not for primary diagnosis" in ds.DerivationDescription
        assert ds.SeriesDescription == "segnode-classical overlay (not for diagnosis)"
        assert int(ds.SeriesNumber) == 9904
        assert ds.SeriesInstanceUID == derived_uid(series, ALGORITHM, "overlay-series")
        assert ds.Manufacturer == "segnode" and ds.SoftwareVersions.startswith("segnode")
        # Same patient and study as the CT, and a place on its pixel grid.
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyInstanceUID",
            "AccessionNumber",
        ):
            assert ds[keyword].value == ct[keyword].value
        assert [float(v) for v in ds.PixelSpacing] == [float(v) for v in ct.PixelSpacing]
        assert list(ds.PatientOrientation) == ["L", "P"]
        # The Secondary Capture IOD has no Frame of Reference or Image Plane module.
        for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient"):
            assert keyword not in ds
        assert (ds.ContentDate, ds.ContentTime) == ("20240102", "101500")
        assert "PatientIdentityRemoved" not in ds
        assert ds.pixel_array.shape == (ROWS, COLS, 3) and ds.pixel_array.dtype == np.uint8


def test_one_image_per_slice_each_referencing_its_slice(written: list[Path], series: SeriesVolume) -> None:
    assert len(written) == len(series.datasets)
    for path, source in zip(written, series.datasets, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == derived_uid(series, ALGORITHM, f"overlay-{source.SOPInstanceUID}")
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.InstanceNumber == source.InstanceNumber
        (reference,) = ds.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert reference.SpatialLocationsPreserved == "YES"
        (referenced_series,) = ds.ReferencedSeriesSequence
        assert referenced_series.SeriesInstanceUID == series.series_instance_uid
        assert (
            referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        )
    assert len({p.name for p in written}) == len(written)


def test_outlines_have_their_structures_colours_and_the_rest_is_the_grey_ct(
    written: list[Path], series: SeriesVolume, labels: np.ndarray
) -> None:
    checked = dict.fromkeys(PRESENT, 0)
    for k, path in enumerate(written):
        rgb = pydicom.dcmread(path).pixel_array
        grey = windowed(series.volume.hu[k])
        lines = outlines(labels[k], PRESENT)
        on_outline = np.logical_or.reduce(list(lines.values()))
        legend = np.zeros(on_outline.shape, dtype=bool)
        legend[legend_box(rgb, grey, on_outline)] = True
        others = {s: np.logical_or.reduce([m for t, m in lines.items() if t != s]) for s in PRESENT}
        for structure, line in lines.items():
            where = line & ~legend
            if structure.covers_all_labels:  # the body's outline gives way to the others' where they meet
                where &= ~others[structure]
            assert (rgb[where] == structure.rgb).all(), structure.name
            checked[structure] += int(np.count_nonzero(where))
        # Off the outlines (two pixels away) and the legend: the CT in the body window, in grey.
        far = ~ndimage.binary_dilation(on_outline, structure=SQUARE, iterations=2) & ~legend
        assert (rgb[far] == grey[far][:, None]).all()
        assert not (rgb == HEART.rgb).all(axis=2).any()
    assert all(n > 100 for n in checked.values()), checked
    # Not filled: inside the last slice's lungs and vertebra, the air-dark and bone-white CT.
    for label, level in ((2, 0), (3, 0), (4, 255)):
        inside = ndimage.binary_erosion(labels[-1] == label, iterations=2) & ~legend
        assert inside.any() and (rgb[inside] == level).all()


def test_legend_shows_the_structures_on_the_slice(
    written: list[Path], series: SeriesVolume, labels: np.ndarray
) -> None:
    for k, path in enumerate(written):
        rgb = pydicom.dcmread(path).pixel_array
        grey = windowed(series.volume.hu[k])
        on_outline = np.logical_or.reduce(list(outlines(labels[k], PRESENT).values()))
        box = legend_box(rgb, grey, on_outline)
        assert box[0].stop < ROWS / 2 and box[1].stop < COLS  # in the top-left corner
        panel = rgb[box]
        for structure in PRESENT:
            swatch = np.count_nonzero((panel == structure.rgb).all(axis=2))
            assert swatch >= 25, (structure.name, swatch)  # a swatch of at least 5 x 5
        # White text on black besides the swatches: the legend's own colours.
        colours = {tuple(c) for c in panel.reshape(-1, 3)}
        swatches = {s.rgb for s in PRESENT}
        assert all(c in swatches or c[0] == c[1] == c[2] for c in colours)


def test_a_slice_without_a_structure_leaves_it_out_of_the_legend(
    series: SeriesVolume, labels: np.ndarray
) -> None:
    fewer = labels.copy()
    fewer[0][fewer[0] == 4] = 1  # no vertebra ("airways") on the first slice
    images = build_overlay(series, fewer, ALGORITHM, STRUCTURES)
    first, second = images[0].pixel_array, images[1].pixel_array
    airways = STRUCTURES[3].rgb
    assert not (first == airways).all(axis=2).any()
    assert (second == airways).all(axis=2).any()


def test_a_retry_writes_the_same_bytes(series: SeriesVolume, labels: np.ndarray, tmp_path: Path) -> None:
    first = write_overlay(build_overlay(series, labels, ALGORITHM, STRUCTURES), tmp_path / "first")
    second = write_overlay(build_overlay(series, labels, ALGORITHM, STRUCTURES), tmp_path / "second")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
    # Written again into the same folder: replaced in place, no temp file left behind.
    again = write_overlay(build_overlay(series, labels, ALGORITHM, STRUCTURES), tmp_path / "first")
    assert again == first and sorted((tmp_path / "first").iterdir()) == sorted(first)


def test_a_new_algorithm_version_gets_new_uids(series: SeriesVolume, labels: np.ndarray) -> None:
    newer = AlgorithmInfo(ALGORITHM.name, "1.1", ALGORITHM.family)
    a = build_overlay(series, labels, ALGORITHM, STRUCTURES)[0]
    b = build_overlay(series, labels, newer, STRUCTURES)[0]
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


# --- window -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ({"WindowCenter": [-600, 40], "WindowWidth": [1500, 400]}, (-600.0, 1500.0)),  # the first
        ({"WindowCenter": None, "WindowWidth": None}, (40.0, 400.0)),  # none: a body window
    ],
    ids=["source-window", "body-window"],
)
def test_window_is_the_sources_or_a_body_window(
    tmp_path: Path, window: dict[str, object], expected: tuple[float, float]
) -> None:
    paths = f.make_ct_series(tmp_path / "ct", n_slices=3, rows=128, cols=128)
    for path in paths:
        f.modify(path, **window)
    series = load_series(paths)
    labels = labels_with_body(series.volume.hu)
    image = build_overlay(series, labels, ALGORITHM, STRUCTURES)[1]
    grey = windowed(series.volume.hu[1], *expected)
    far = ~ndimage.binary_dilation(labels[1] > 0, iterations=3)  # air around the body
    far[:LEGEND_ROWS] = False  # below the legend
    assert far.any()
    assert (image.pixel_array[far] == grey[far][:, None]).all()
    body = (labels[1] == 1) & ~ndimage.binary_dilation(labels[1] != 1, iterations=2)
    body[:LEGEND_ROWS] = False
    assert body.any()
    assert (image.pixel_array[body] == windowed(np.array(float(f.BODY_HU)), *expected)).all()
    assert f"C {expected[0]:g} W {expected[1]:g}" in image.DerivationDescription


# --- de-identified series, faulty label maps --------------------------------------------------


def test_a_deidentified_series_gives_images_that_say_so(tmp_path: Path, strict_reading: None) -> None:
    paths = f.make_deidentified_ct_series(
        tmp_path / "ct", method=None, method_codes=(), n_slices=3, rows=64, cols=64
    )
    series = load_series(paths)
    written = write_overlay(
        build_overlay(series, labels_with_body(series.volume.hu), ALGORITHM, STRUCTURES), tmp_path / "ov"
    )
    if shutil.which("dciodvfy"):
        dciodvfy(written[0])
    ds = pydicom.dcmread(written[0])
    assert (ds.PatientIdentityRemoved, ds.DeidentificationMethod) == ("YES", UNRECORDED_DEIDENTIFICATION)


def test_wrong_shape_is_a_segmenter_fault(series: SeriesVolume, labels: np.ndarray) -> None:
    with pytest.raises(ProcessingFailedError, match="label map of shape"):
        build_overlay(series, labels[:-1], ALGORITHM, STRUCTURES)


def test_unknown_label_is_a_segmenter_fault(series: SeriesVolume, labels: np.ndarray) -> None:
    bad = labels.copy()
    bad[2, 0, 0] = 9
    with pytest.raises(ProcessingFailedError, match=r"value\(s\) \[9\]"):
        build_overlay(series, bad, ALGORITHM, STRUCTURES)


def test_float_label_map_is_a_segmenter_fault(series: SeriesVolume, labels: np.ndarray) -> None:
    with pytest.raises(ProcessingFailedError, match="integer type"):
        build_overlay(series, labels.astype(np.float32), ALGORITHM, STRUCTURES)


def test_duplicate_structure_labels_are_a_segmenter_fault(series: SeriesVolume, labels: np.ndarray) -> None:
    with pytest.raises(ProcessingFailedError, match="distinct and positive"):
        build_overlay(series, labels, ALGORITHM, (*STRUCTURES, STRUCTURES[1]))


# --- small parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ((1, 0, 0, 0, 1, 0), ["L", "P"]),  # axial
        ((1, 0, 0, 0, 0, -1), ["L", "F"]),  # coronal
        ((0, 1, 0, 0, 0, -1), ["P", "F"]),  # sagittal
        ((-1, 0, 0, 0, -1, 0), ["R", "A"]),  # axial, feet first prone
        ((0.866, 0.5, 0, -0.5, 0.866, 0), ["LP", "PR"]),  # rotated 30 degrees
        ((0.9998, 0.02, 0, 0, 1, 0), ["L", "P"]),  # a hair off the axis
    ],
)
def test_patient_orientation_from_the_direction_cosines(iop: tuple[float, ...], expected: list[str]) -> None:
    assert patient_orientation(iop) == expected


def test_series_description_fits_lo() -> None:
    long = AlgorithmInfo("a-very-long-segmenter-name-" * 4, "1.0", ALGORITHM.family)
    text = series_description(long)
    assert len(text) == 64 and text.endswith(" overlay (not for diagnosis)")


# --- the real series --------------------------------------------------------------------------


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_real_thorax_classical_overlay(tmp_path: Path, strict_reading: None) -> None:
    # A real de-identified thorax through the classical segmenter: a valid image per slice, each
    # with the colours of the structures found on it.
    series = load_series(sorted((shared_data.THORAX / "ct").iterdir()))
    segmenter = ClassicalSegmenter()
    labels = segmenter.predict(series.volume)
    written = write_overlay(
        build_overlay(series, labels, segmenter.algorithm, segmenter.structures), tmp_path
    )
    assert len(written) == len(series.datasets)
    middle = len(written) // 2
    if shutil.which("dciodvfy"):
        for path in (written[0], written[middle], written[-1]):
            dciodvfy(path)
    ds = pydicom.dcmread(written[middle])
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == series.sop_instance_uids[middle]
    rgb = ds.pixel_array
    assert rgb.shape == (*series.volume.hu.shape[1:], 3)
    for structure in segmenter.structures:
        if structure.covers_all_labels or structure.label in labels[middle]:
            assert (rgb == structure.rgb).all(axis=2).sum() > 50, structure.name
