"""``segnode segment``: the worker's pipeline on one series folder, offline; the SEG as a worker
writes it and the label map as NIfTI, placed where the series lies whatever its orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from node.cli import main
from segmenters.classical import ClassicalSegmenter
from segmenters.ct_series import load_series
from tests import dicom_factory as f

PRONE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # an axial series of a patient lying face down


@pytest.mark.parametrize("orientation", [f.AXIAL, PRONE], ids=["supine", "prone"])
def test_segment_writes_the_seg_and_a_label_map_placed_where_the_series_lies(
    tmp_path: Path, orientation: tuple[float, ...]
) -> None:
    paths = f.make_ct_series(tmp_path / "ct", n_slices=10, orientation=orientation)
    f.make_basic_sr(tmp_path / "ct" / "sr")  # a study folder as archives export it: other objects beside
    out = tmp_path / "out"
    ran = CliRunner().invoke(
        main, ["segment", str(tmp_path / "ct"), "--out", str(out), "--outputs", "seg,sr"]
    )
    assert ran.exit_code == 0, ran.output
    assert "labels.nii.gz" in ran.output
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.Modality == "SEG" and (out / "sr.dcm").is_file()

    series = load_series(paths)
    expected = ClassicalSegmenter().predict(series.volume)
    image = nib.Nifti1Image.from_filename(out / "labels.nii.gz")
    # NIfTI indexes (column, row, slice); the labels are the segmenter's, voxel for voxel.
    np.testing.assert_array_equal(np.asanyarray(image.dataobj).transpose(2, 1, 0), expected)
    # Each voxel lies where the DICOM header puts its pixel: a corner and the far corner (RAS).
    first = pydicom.dcmread(paths[0])
    position = np.array(first.ImagePositionPatient, dtype=float)
    row_dir, col_dir = (
        np.array(first.ImageOrientationPatient[:3]),
        np.array(first.ImageOrientationPatient[3:]),
    )
    dy, dx = (float(v) for v in first.PixelSpacing)
    rows, cols, slices = first.Rows, first.Columns, len(paths)
    last = np.array(pydicom.dcmread(paths[-1]).ImagePositionPatient, dtype=float)
    lps_far = last + row_dir * dx * (cols - 1) + col_dir * dy * (rows - 1)
    to_ras = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(
        nib.affines.apply_affine(image.affine, (0, 0, 0)), position * to_ras, atol=1e-3
    )
    far = nib.affines.apply_affine(image.affine, (cols - 1, rows - 1, slices - 1))
    np.testing.assert_allclose(far, lps_far * to_ras, atol=1e-3)


def test_segment_refuses_unknown_outputs_and_segmenters(tmp_path: Path) -> None:
    f.make_ct_series(tmp_path / "ct", n_slices=4)
    runner = CliRunner()
    bad_output = runner.invoke(
        main, ["segment", str(tmp_path / "ct"), "--out", str(tmp_path / "o"), "--outputs", "png"]
    )
    assert bad_output.exit_code != 0 and "expected some of seg, rtstruct, sr, overlay" in bad_output.output
    unknown = runner.invoke(
        main, ["segment", str(tmp_path / "ct"), "--out", str(tmp_path / "o"), "--segmenter", "nope"]
    )
    assert unknown.exit_code != 0 and "'nope' is not installed" in unknown.output
    assert not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    nothing = runner.invoke(main, ["segment", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert nothing.exit_code != 0 and "no CT images in" in nothing.output
