"""Training cases from DICOM: a CT series and a SEG made for it in code (by the node's own SEG
writer) read back with labels and names intact; a real series read for training exactly as the
worker serves it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from segmenters.base import ANATOMICAL_STRUCTURE, AlgorithmInfo, Concept, Structure, Volume
from segmenters.classical import ClassicalSegmenter
from segmenters.ct_series import load_series
from segmenters.datasets import read_dicom_seg, read_rtstruct_folder
from tests import dicom_factory as f
from tests.shared_data import THORAX
from workers.derived import write_dataset
from workers.pipeline import segment_series
from workers.seg_writer import build_seg

ALGORITHM = AlgorithmInfo("segnode-test", "1.0", Concept("123110", "Artificial Intelligence", "DCM"))
LUNG = Concept("39607008", "Lung")
RIGHT_LUNG = Structure(2, "Right lung", ANATOMICAL_STRUCTURE, LUNG, laterality=Concept("24028007", "Right"))
LEFT_LUNG = Structure(3, "Left lung", ANATOMICAL_STRUCTURE, LUNG, laterality=Concept("7771000", "Left"))
HEART = Structure(4, "Heart", ANATOMICAL_STRUCTURE, Concept("80891009", "Heart"))
BONE = Structure(7, "Vertebra", ANATOMICAL_STRUCTURE, Concept("51282000", "Vertebral column"))
STRUCTURES = (RIGHT_LUNG, LEFT_LUNG, HEART, BONE)  # no heart in the phantom: segments 1-3 are 2, 3, 7


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """(CT folder, SEG file, the label map the SEG was made from)."""
    folder = tmp_path_factory.mktemp("case")
    paths = f.make_ct_series(folder / "ct", n_slices=6, rows=32, cols=40)
    series = load_series(paths)
    hu = series.volume.hu
    labels = f.lung_and_bone_labels(hu, RIGHT_LUNG.label, LEFT_LUNG.label, BONE.label)
    labels[0] = 0  # an empty slice: the SEG leaves its frames out
    seg_file = folder / "seg.dcm"
    write_dataset(build_seg(series, labels, ALGORITHM, STRUCTURES), seg_file)
    return folder / "ct", seg_file, labels


def test_segments_become_labels_by_number_with_their_names(written: tuple[Path, Path, np.ndarray]) -> None:
    ct, seg_file, labels = written
    case = read_dicom_seg(ct, seg_file, case_id="phantom")
    numbered = np.zeros_like(labels)
    for number, structure in enumerate((RIGHT_LUNG, LEFT_LUNG, BONE), start=1):
        numbered[labels == structure.label] = number
    np.testing.assert_array_equal(case.labels, numbered)
    assert dict(case.label_names) == {1: "Right lung", 2: "Left lung", 3: "Vertebra"}
    assert case.case_id == "phantom"
    assert case.hu.shape == labels.shape and case.spacing == (2.5, 5.0, 5.0)
    assert int(case.hu.min()) == f.AIR_HU and int(case.hu.max()) == f.BONE_HU


def test_structures_map_segments_back_to_their_labels_by_code(
    written: tuple[Path, Path, np.ndarray],
) -> None:
    # The SEG numbers its segments 1..3; the structures' codes put back labels 2, 3 and 7.
    ct, seg_file, labels = written
    case = read_dicom_seg(ct, seg_file, STRUCTURES)
    np.testing.assert_array_equal(case.labels, labels)
    assert dict(case.label_names) == {2: "Right lung", 3: "Left lung", 7: "Vertebra"}


def test_segments_no_structure_codes_are_left_out(written: tuple[Path, Path, np.ndarray]) -> None:
    ct, seg_file, labels = written
    case = read_dicom_seg(ct, seg_file, (RIGHT_LUNG, HEART))
    np.testing.assert_array_equal(case.labels, np.where(labels == RIGHT_LUNG.label, labels, 0))
    assert dict(case.label_names) == {2: "Right lung"}


def test_seg_of_another_series_is_refused(written: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    _, seg_file, _ = written
    f.make_ct_series(tmp_path / "other", n_slices=6, rows=32, cols=40)
    with pytest.raises(ValueError, match="references none of the images"):
        read_dicom_seg(tmp_path / "other", seg_file)


class _Recording:
    """A segmenter that keeps what the serving path gave it, then segments as the classical one."""

    def __init__(self) -> None:
        self.inner = ClassicalSegmenter()
        self.algorithm = self.inner.algorithm
        self.structures = self.inner.structures
        self.volumes: list[Volume] = []

    def predict(self, volume: Volume) -> np.ndarray:
        self.volumes.append(volume)
        return self.inner.predict(volume)


def test_a_network_is_served_exactly_the_volume_it_was_trained_on(tmp_path: Path) -> None:
    # Training reads the thorax with its contours; the worker's pipeline serves the same files.
    (case,) = read_rtstruct_folder(THORAX)
    served = _Recording()
    segment_series(
        sorted((THORAX / "ct").iterdir()),
        served,
        tmp_path / "results",
        transfer_syntax=ExplicitVRLittleEndian,
    )
    (volume,) = served.volumes
    assert volume.hu.dtype == case.hu.dtype
    np.testing.assert_array_equal(volume.hu, case.hu)
    assert volume.spacing == case.spacing
