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


@pytest.mark.slow  # real data: in CI, not in the edit loop
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


def test_a_structure_set_finds_its_ct_among_the_series_of_a_study_export(tmp_path: Path) -> None:
    from segmenters.datasets import load_roi_table
    from workers.rtstruct_writer import build_rtstruct

    export = tmp_path / "LUNG-07"
    contoured = f.make_ct_series(export / "series-3", n_slices=6, rows=32, cols=40)
    f.make_ct_series(export / "series-4", n_slices=5, rows=32, cols=40)  # another CT: no structure set
    series = load_series(contoured)
    labels = f.lung_and_bone_labels(series.volume.hu, RIGHT_LUNG.label, LEFT_LUNG.label, BONE.label)
    (export / "seg").mkdir()
    write_dataset(build_seg(series, labels, ALGORITHM, STRUCTURES), export / "seg" / "seg.dcm")  # skipped
    write_dataset(build_rtstruct(series, labels, ALGORITHM, STRUCTURES), export / "RS.dcm")

    (case,) = read_rtstruct_folder(tmp_path)
    assert case.case_id == "LUNG-07" and case.hu.shape == series.volume.hu.shape
    assert set(case.label_names.values()) == {"Right lung", "Left lung"}  # "Vertebra" is not in the table
    for name, label in (("Right lung", RIGHT_LUNG.label), ("Left lung", LEFT_LUNG.label)):
        read = case.labels == next(v for v, n in case.label_names.items() if n == name)
        assert (read == (labels == label)).mean() > 0.97, name  # contours round-trip, edges aside

    # The user's table adds a structure (and spellings): its ROI is read as a label of that name.
    table = load_roi_table(None).extended({"Vertebral body": ["Vertebra", "VB"]})
    (case,) = read_rtstruct_folder(tmp_path, table)
    assert "Vertebral body" in case.label_names.values()
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no CT series under .* with an RT Structure Set referring to it"
    ):
        read_rtstruct_folder(empty)


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_a_tumour_excluded_from_the_lungs_is_scored_in_neither_reference_nor_prediction() -> None:
    from segmenters.evaluation import score

    (plain,) = read_rtstruct_folder(THORAX)
    (cut,) = read_rtstruct_folder(THORAX, exclusions={"GTV-1": ["Lung_R", "Lung_L"]})
    right, left = (
        next(v for v, n in cut.label_names.items() if n == name) for name in ("Right lung", "Left lung")
    )
    tumour_voxels = sum(int(mask.sum()) for mask in cut.excluded.values())
    assert tumour_voxels > 1000 and set(cut.excluded) == {right, left}
    # A prediction that calls the tumour lung: penalised against the plain reference, not once cut.
    prediction = plain.labels.copy()
    prediction[cut.excluded[right]] = right

    class Fixed:
        algorithm = ALGORITHM
        structures = (
            Structure(right, "Right lung", ANATOMICAL_STRUCTURE, LUNG),
            Structure(left, "Left lung", ANATOMICAL_STRUCTURE, LUNG),
        )

        def predict(self, volume: Volume) -> np.ndarray:
            return prediction

    before = {r.structure: r.dice for r in score(Fixed(), plain, "fixed")}
    after = {r.structure: r.dice for r in score(Fixed(), cut, "fixed")}
    assert before["Right lung"] < 1.0 and after["Right lung"] == 1.0 and after["Left lung"] == 1.0
    with pytest.raises(ValueError, match="no contours of ROI 'GTV-9' to exclude"):
        read_rtstruct_folder(THORAX, exclusions={"GTV-9": ["Lung_R"]})
