"""load_series: every rule a CT series must pass to become a volume, on data made for each fault."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MPEG2MPML, JPEG2000Lossless

from segmenters.ct_series import UnsuitableSeriesError, load_series
from tests import dicom_factory as f

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REAL_J2K = SHARED_DATA / "ct-abdomen-j2k"


def _rejected(paths: list[Path], phrase: str, *, decode_workers: int | None = None) -> str:
    with pytest.raises(UnsuitableSeriesError) as info:
        load_series(paths, decode_workers=decode_workers)
    message = str(info.value)
    assert phrase in message, message
    assert "Synthetic" not in message and "SYN0001" not in message  # no patient identifiers
    return message


# --- a good series ----------------------------------------------------------------------------


def test_loads_hu_geometry_and_headers(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=8, rows=48, cols=64, spacing=2.5, pixel_spacing=(4.0, 5.0))
    sv = load_series(paths)
    assert sv.volume.hu.shape == (8, 48, 64)
    assert sv.volume.hu.dtype == np.int16
    np.testing.assert_array_equal(sv.volume.hu, f.phantom_hu(8, 48, 64))
    assert sv.volume.spacing == pytest.approx((2.5, 4.0, 5.0))
    assert sv.volume.axes_lps == ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    assert sv.slice_positions_mm == pytest.approx([-50.0 + 2.5 * k for k in range(8)])
    assert sv.first_position == pytest.approx((-160.0, -160.0, -50.0))
    assert [ds.SOPInstanceUID for ds in sv.datasets] == list(sv.sop_instance_uids)
    assert sv.sop_instance_uids == tuple(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    assert all("PixelData" not in ds for ds in sv.datasets)
    assert len({sv.series_instance_uid, sv.study_instance_uid, sv.frame_of_reference_uid}) == 3


def test_sorts_along_the_normal_not_by_instance_number(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=9)
    numbers = list(range(1, 10))
    random.Random(4).shuffle(numbers)
    for path, number in zip(paths, numbers, strict=True):
        f.modify(path, InstanceNumber=number)
    shuffled = paths[:]
    random.Random(7).shuffle(shuffled)
    sv = load_series(shuffled)
    np.testing.assert_array_equal(sv.volume.hu, f.phantom_hu(9, 64, 64))
    assert list(sv.slice_positions_mm) == sorted(sv.slice_positions_mm)


def test_oblique_orientation_sets_axes(tmp_path: Path) -> None:
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rows run foot-wards, slices run posterior
    paths = f.make_ct_series(tmp_path, n_slices=5, orientation=coronal, spacing=3.0)
    sv = load_series(list(reversed(paths)))
    assert sv.volume.axes_lps == ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0))
    assert sv.volume.spacing[0] == pytest.approx(3.0)
    np.testing.assert_array_equal(sv.volume.hu, f.phantom_hu(5, 64, 64))


def test_fractional_slope_gives_float32_hu(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4, rescale_slope=0.5, rescale_intercept=-1024)
    sv = load_series(paths)
    assert sv.volume.hu.dtype == np.float32
    np.testing.assert_array_equal(sv.volume.hu, f.phantom_hu(4, 64, 64).astype(np.float32))


def test_hu_beyond_int16_falls_back_to_float32(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    stored = np.stack([pydicom.dcmread(p).pixel_array for p in paths]).astype(np.float64)
    for p in paths:
        f.modify(p, RescaleSlope=20)
    sv = load_series(paths)
    assert sv.volume.hu.dtype == np.float32
    np.testing.assert_array_equal(sv.volume.hu, (stored * 20 - 1024).astype(np.float32))


def test_parallel_decoding_gives_the_same_volume(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=12, transfer_syntax=JPEG2000Lossless)
    serial = load_series(paths, decode_workers=1)
    parallel = load_series(paths, decode_workers=2)
    np.testing.assert_array_equal(serial.volume.hu, parallel.volume.hu)
    np.testing.assert_array_equal(parallel.volume.hu, f.phantom_hu(12, 64, 64))


# --- transfer syntaxes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return f.make_ct_series(tmp_path_factory.mktemp("original"), n_slices=5)


def _syntaxes(syntaxes: tuple[pydicom.uid.UID, ...]) -> list[object]:
    return [pytest.param(s, id=s.name) for s in syntaxes]


@pytest.mark.parametrize("syntax", _syntaxes(f.LOSSLESS_SYNTAXES))
def test_lossless_syntaxes_decode_to_the_same_hu(
    original: list[Path], tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    paths = f.transcode(original, syntax, tmp_path)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(paths).volume.hu, load_series(original).volume.hu)


@pytest.mark.parametrize("syntax", _syntaxes(f.LOSSY_SYNTAXES))
def test_lossy_syntaxes_decode_to_nearly_the_same_hu(
    original: list[Path], tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    paths = f.transcode(original, syntax, tmp_path)
    got = load_series(paths).volume.hu.astype(np.float64)
    want = load_series(original).volume.hu.astype(np.float64)
    assert np.mean(np.abs(got - want)) < 25  # DCMTK rescales 12-bit JPEG; HU must survive that


def test_unknown_transfer_syntax_is_named(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    f.set_transfer_syntax_uid(paths[1], "1.2.3.4")
    _rejected(paths, "unknown transfer syntax 1.2.3.4")


def test_undecodable_transfer_syntax_is_named(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4, transfer_syntax=JPEG2000Lossless)
    f.set_transfer_syntax_uid(paths[2], MPEG2MPML)
    _rejected(paths, "MPEG2 Main Profile / Main Level), which this node cannot decode")


# --- rejected geometry ------------------------------------------------------------------------


def test_mixed_orientations(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=6)
    f.modify(paths[3], ImageOrientationPatient=[1, 0, 0, 0, 0.9998477, -0.0174524])
    msg = _rejected(paths, "mixed orientations")
    assert "1 of 6 slices" in msg


def test_orientation_within_tolerance_is_one_orientation(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    f.modify(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 1, 0.00005])
    assert load_series(paths).volume.hu.shape[0] == 4


def test_mixed_pixel_grids(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    f.modify(paths[1], PixelSpacing=[4.0, 4.0])
    _rejected(paths, "mixed pixel grids")


def test_missing_slice_names_the_gap(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=10, spacing=2.5, skip_slices=(4,))
    msg = _rejected(paths, "slice(s) missing")
    assert "-42.50 mm and -37.50 mm" in msg  # slices 3 and 5 of a stack starting at -50 mm
    assert "5.00 mm" in msg and "2.50 mm apart" in msg


def test_irregular_spacing(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=8, spacing=2.5)
    f.modify(paths[4], ImagePositionPatient=[-160.0, -160.0, -50.0 + 4 * 2.5 + 0.6])
    _rejected(paths, "irregular slice spacing")


def test_duplicate_positions(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=6)
    f.modify(paths[3], ImagePositionPatient=pydicom.dcmread(paths[2]).ImagePositionPatient)
    _rejected(paths, "repeat the position of another slice")


def test_gantry_tilt(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=6, tilt_deg=15.0)
    _rejected(paths, "gantry/detector tilt of 15.0 degrees is not supported")


def test_slices_shifted_in_plane(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=6, spacing=2.5)
    f.modify(paths[3], ImagePositionPatient=[-150.0, -160.0, -50.0 + 3 * 2.5])
    _rejected(paths, "do not lie on one line")


def test_single_slice(tmp_path: Path) -> None:
    _rejected(f.make_ct_series(tmp_path, n_slices=1), "a single-slice series cannot be segmented in 3D")


def test_two_slices(tmp_path: Path) -> None:
    _rejected(f.make_ct_series(tmp_path, n_slices=2), "at least 3 needed")


def test_no_instances() -> None:
    _rejected([], "no instances")


# --- rejected instances -----------------------------------------------------------------------


def test_truncated_pixel_data_names_the_instance(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=5)
    uid = pydicom.dcmread(paths[2]).SOPInstanceUID
    f.truncate(paths[2], keep=0.6)
    msg = _rejected(paths, f"instance {uid} could not be decoded")
    assert "truncated" in msg


def test_truncated_pixel_data_in_a_decoder_process(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=8, transfer_syntax=JPEG2000Lossless)
    uid = pydicom.dcmread(paths[5]).SOPInstanceUID
    f.truncate(paths[5], keep=0.8)
    _rejected(paths, f"instance {uid} could not be decoded", decode_workers=2)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_truncated_header_names_the_file(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=5)
    f.truncate(paths[1], keep=0.02)
    msg = _rejected(paths, f"file {paths[1].name}")
    assert "truncated or corrupt" in msg


def test_garbage_file(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(bytes(range(256)) * 8)
    _rejected([*paths, junk], "file junk.dcm is not a readable DICOM file")


def test_missing_file(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    paths[0].unlink()
    _rejected(paths, "is missing")


def test_no_pixel_data(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=5)
    uid = pydicom.dcmread(paths[3]).SOPInstanceUID
    f.strip_pixel_data(paths[3])
    _rejected(paths, f"instance {uid} could not be decoded: it has no Pixel Data")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_series_uid(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    f.set_hostile_uid(paths[0], "SeriesInstanceUID", "../../etc")
    msg = _rejected(paths, "SeriesInstanceUID is not a valid DICOM UID")
    assert "../" not in msg


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_sop_instance_uid_is_named_by_file(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path, n_slices=4)
    f.set_hostile_uid(paths[1], "SOPInstanceUID", "../../etc/passwd")
    msg = _rejected(paths, f"file {paths[1].name}: SOPInstanceUID is not a valid DICOM UID")
    assert "passwd" not in msg


def test_secondary_capture_is_not_ct(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path / "ct", n_slices=4)
    sc = f.make_secondary_capture(tmp_path / "sc")
    _rejected(
        [*paths, sc], "a Secondary Capture Image Storage object (1.2.840.10008.5.1.4.1.1.7), not a CT image"
    )


def test_structured_report_is_not_ct(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path / "ct", n_slices=4)
    sr = f.make_basic_sr(tmp_path / "sr")
    _rejected([sr, *paths], "not a CT image")


def test_enhanced_ct_is_rejected_clearly(tmp_path: Path) -> None:
    _rejected([f.make_enhanced_ct(tmp_path)], "multi-frame Enhanced CT Image Storage object")


def test_two_series_mixed(tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    a = f.make_ct_series(tmp_path / "a", n_slices=3, study_uid=study)
    b = f.make_ct_series(tmp_path / "b", n_slices=3, study_uid=study, origin=(-160, -160, 50))
    _rejected([*a, *b], "2 different series")


def test_same_instance_twice(tmp_path: Path) -> None:
    paths = f.make_ct_series(tmp_path / "a", n_slices=4)
    copy = tmp_path / "copy.dcm"
    shutil.copyfile(paths[0], copy)
    _rejected([*paths, copy], "given twice")


# --- the factory and the real series ----------------------------------------------------------


def test_factory_writes_valid_ct_images(tmp_path: Path) -> None:
    path = f.make_ct_series(tmp_path, n_slices=3)[0]
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    report = out.stdout + out.stderr
    assert "CTImage" in report
    assert not [line for line in report.splitlines() if "Error" in line], report


def test_real_series_as_shared_lacks_series_uids() -> None:
    # The anonymiser emptied StudyInstanceUID / SeriesInstanceUID (type 1): no PACS stores that.
    with pytest.raises(UnsuitableSeriesError, match="has no StudyInstanceUID"):
        load_series(sorted(REAL_J2K.iterdir()))


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_real_jpeg2000_series_loads(tmp_path: Path) -> None:
    paths = f.copy_with_series_uids(sorted(REAL_J2K.iterdir()), tmp_path)
    random.Random(1).shuffle(paths)
    sv = load_series(paths)
    assert sv.volume.hu.shape == (20, 512, 512)
    assert sv.volume.hu.dtype == np.int16
    # 2 mm between slice positions although SliceThickness says 3 mm (overlapping slices).
    assert sv.volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert sv.slice_thickness_mm == pytest.approx(3.0)
    assert sv.volume.axes_lps == ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    assert np.all(np.diff(sv.slice_positions_mm) == pytest.approx(2.0))
    # The SOP UIDs emptied in the data set come from the file meta information.
    assert all(uid.startswith("1.3.12.2.1107.5.1.4.60064.") for uid in sv.sop_instance_uids)
    hu = sv.volume.hu
    assert hu.min() == -1024  # outside the reconstruction circle
    assert -1100 < np.median(hu[:, :40, :]) < -900  # air above the patient
    assert 20 < np.median(hu[:, 236:276, 236:276]) < 80  # soft tissue mid-abdomen
    assert hu.max() > 1000  # bone
    np.testing.assert_array_equal(load_series(paths, decode_workers=1).volume.hu, hu)
