"""The highdicom internals workers/seg_overlap.py leans on, checked on the installed highdicom: each
test fails when a seam moved (the private method renamed or re-shaped, no longer called per frame),
instead of the fast route silently writing a different SEG.

Run them before adding a highdicom version to ``workers.seg_overlap.TESTED_HIGHDICOM``.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from segmenters import anatomy
from segmenters.base import ANATOMICAL_STRUCTURE, AlgorithmInfo, Concept, Structure
from segmenters.ct_series import SeriesVolume, load_series
from tests import dicom_factory as factory
from workers import seg_overlap
from workers.derived import write_dataset
from workers.seg_writer import build_seg

ALGORITHM = AlgorithmInfo("segnode-contract", "1.0", Concept("123109", "Manual Processing", "DCM"))
# As the classical segmenter labels them: the body (label 1) is what the lungs and bone leave.
WITH_BODY = (
    anatomy.structure(1, "body"),
    anatomy.structure(2, "right_lung"),
    anatomy.structure(3, "left_lung"),
    Structure(4, "Vertebra", ANATOMICAL_STRUCTURE, Concept("51282000", "Vertebral column")),
)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    return load_series(factory.make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=20, rows=64, cols=64))


def labels_with_body(hu: np.ndarray) -> np.ndarray:
    labels = factory.lung_and_bone_labels(hu, 2, 3, 4)
    labels[(hu > factory.AIR_HU) & (labels == 0)] = 1
    return labels


def test_the_installed_highdicom_is_one_the_fast_route_was_tested_with() -> None:
    assert version("highdicom") in seg_overlap.TESTED_HIGHDICOM
    assert seg_overlap.unavailable() is None


def test_the_overridden_method_keeps_its_parameters() -> None:
    method = inspect.getattr_static(hd.seg.Segmentation, seg_overlap.PRIVATE_METHOD)
    assert isinstance(method, staticmethod)
    # highdicom calls it per frame and segment with these, by keyword after the plane.
    assert list(inspect.signature(method.__func__).parameters) == [
        "pixel_array",
        "segment_number",
        "described_segment_numbers",
        "segmentation_type",
        "max_fractional_value",
        "dtype",
    ]


def test_another_highdicom_version_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg_overlap, "version", lambda name: "0.29.0")
    reason = seg_overlap.unavailable()
    assert reason is not None and "highdicom 0.29.0" in reason and "0.28.2" in reason


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless], ids=lambda s: s.name)
def test_both_routes_write_the_same_bytes(
    series: SeriesVolume, tmp_path: Path, strict_reading: None, syntax: str
) -> None:
    labels = labels_with_body(series.volume.hu)
    fast, public = tmp_path / "fast.dcm", tmp_path / "public.dcm"
    write_dataset(build_seg(series, labels, ALGORITHM, WITH_BODY, transfer_syntax=syntax), fast)
    write_dataset(
        build_seg(series, labels, ALGORITHM, WITH_BODY, transfer_syntax=syntax, fast_overlap=False), public
    )
    assert fast.read_bytes() == public.read_bytes()
    # Not two equal wrong files: the body is every labelled voxel, the others their label, overlapping.
    back = hd.seg.segread(fast)
    assert back.SegmentsOverlap == "YES"
    masks = back.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=[1, 2, 3, 4]
    )
    np.testing.assert_array_equal(masks[..., 0], labels > 0)
    for number in (2, 3, 4):
        assert masks[..., number - 1].any()
        np.testing.assert_array_equal(masks[..., number - 1], labels == number)


def test_the_body_alone_does_not_overlap(series: SeriesVolume, tmp_path: Path) -> None:
    labels = (series.volume.hu > factory.AIR_HU).astype(np.uint8)
    fast, public = tmp_path / "fast.dcm", tmp_path / "public.dcm"
    write_dataset(build_seg(series, labels, ALGORITHM, WITH_BODY, fast_overlap=True), fast)
    write_dataset(build_seg(series, labels, ALGORITHM, WITH_BODY, fast_overlap=False), public)
    assert fast.read_bytes() == public.read_bytes()
    assert pydicom.dcmread(fast).SegmentsOverlap == "NO"


def test_the_fast_route_uses_the_subclass_only_when_available(
    series: SeriesVolume, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    labels = labels_with_body(series.volume.hu)
    assert type(build_seg(series, labels, ALGORITHM, WITH_BODY)) is seg_overlap._Segmentation
    assert type(build_seg(series, labels, ALGORITHM, WITH_BODY, fast_overlap=False)) is hd.seg.Segmentation
    # Without a union segment both routes are highdicom's own call with the label map.
    no_body = factory.lung_and_bone_labels(series.volume.hu, 2, 3, 4)
    assert type(build_seg(series, no_body, ALGORITHM, WITH_BODY)) is hd.seg.Segmentation
    # Another highdicom: the public route, and the reason logged once per process.
    monkeypatch.setattr(seg_overlap, "version", lambda name: "0.0.1-contract")
    seg_overlap._log_unavailable.cache_clear()
    with caplog.at_level("WARNING", logger=seg_overlap.__name__):
        for _ in range(2):
            assert type(build_seg(series, labels, ALGORITHM, WITH_BODY)) is hd.seg.Segmentation
    assert [r.getMessage() for r in caplog.records].count(
        "SEG overlapping segments through highdicom's public API (more memory and time): "
        f"{seg_overlap.unavailable()}"
    ) == 1
