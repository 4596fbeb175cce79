"""Every kind of served network end to end: a network `segnode train` made (the demo U-Net),
exported by `segnode export`, and an nnU-Net v2 model trained by nnU-Net's own commands, each
declared in the configuration; a phantom sent by storescu comes back from Orthanc as a SEG whose
segments are coded and which dciodvfy accepts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from segmenters.base import Volume
from segmenters.metrics import dice_iou
from segmenters.registry import DEMO_CHECKPOINT
from segmenters.synthetic import make_phantom
from tests import peers
from tests.integration.test_demo_model import serve_and_fetch_seg
from tests.nnunet_model import train_tiny_nnunet
from tests.node_process import SegnodeProcesses

pytestmark = pytest.mark.slow

MODEL = {"torchscript": "model.ts", "onnx": "model.onnx", "monai_bundle": "."}


@pytest.mark.parametrize("kind", list(MODEL))
def test_an_exported_network_is_served_end_to_end(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path, kind: str
) -> None:
    exporter = segnode_factory()
    exported = exporter.cli("export", str(DEMO_CHECKPOINT), "--format", kind, "--out", str(tmp_path / kind))
    assert exported.returncode == 0, exported.stderr
    declared = {"thorax-served": {kind: str((tmp_path / kind / MODEL[kind]).resolve()), "device": "cpu"}}
    phantom = make_phantom(shape=(32, 128, 128), spacing=(8.0, 3.0, 3.0), seed=4244)
    job, seg, uids = serve_and_fetch_seg(
        segnode_factory, orthanc, phantom, tmp_path, "thorax-served", declared
    )
    assert job.segmenter == "thorax-served"
    assert seg.SeriesDescription.endswith("(segnode-demo-thorax-unet (demo model) 1.0)")

    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes["Heart"] == "80891009" and codes["Right lung"] == codes["Left lung"] == "39607008"
    numbers = {s.SegmentLabel: int(s.SegmentNumber) for s in seg.SegmentSequence}
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(numbers.values())
    )
    reference = {s.name: s.label for s in phantom.structures}
    for index, name in enumerate(numbers):
        if name in ("Right lung", "Left lung", "Heart"):
            dice, _ = dice_iou(masks[..., index] > 0, phantom.labels == reference[name])
            assert dice > 0.85, (kind, name, dice)
    seg_file = tmp_path / "seg.dcm"
    assert peers.dciodvfy_errors(seg_file) == []


@pytest.fixture(scope="module")
def tiny_nnunet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An nnU-Net v2 model trained for one epoch on phantoms (about two minutes here)."""
    return train_tiny_nnunet(tmp_path_factory.mktemp("nnunet"))


def test_an_nnunet_model_is_served_end_to_end(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc: peers.Orthanc,
    tmp_path: Path,
    tiny_nnunet: Path,
) -> None:
    declared = {"thorax-nnunet": {"nnunet": str(tiny_nnunet), "folds": ["all"], "device": "cpu"}}
    phantom = make_phantom(shape=(24, 96, 96), spacing=(8.0, 4.0, 4.0), seed=4245)
    job, seg, uids = serve_and_fetch_seg(
        segnode_factory, orthanc, phantom, tmp_path, "thorax-nnunet", declared
    )
    assert job.segmenter == "thorax-nnunet"
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "nnU-Net Dataset987_SegnodePhantoms 2d"
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes["Body"] == "38266002" and codes["Right lung"] == "39607008"
    numbers = {s.SegmentLabel: int(s.SegmentNumber) for s in seg.SegmentSequence}
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(numbers.values())
    )
    reference = {s.name: s.label for s in phantom.structures}
    # One epoch teaches the body and most of the right lung; the rest is for a longer training.
    for name, least in (("Body", 0.9), ("Right lung", 0.5)):
        index = list(numbers).index(name)
        body_or_lung = phantom.labels == reference[name]
        if name == "Body":  # the SEG's body is the whole body, every label inside it
            body_or_lung = phantom.labels > 0
        dice, _ = dice_iou(masks[..., index] > 0, body_or_lung)
        assert dice > least, (name, dice)
    assert peers.dciodvfy_errors(tmp_path / "seg.dcm") == []


def test_nnunet_labels_follow_the_patient_whatever_the_series_orientation(tiny_nnunet: Path) -> None:
    from segmenters.served.nnunet import NnUNetSegmenter

    segmenter = NnUNetSegmenter(tiny_nnunet, folds=["all"], device=torch.device("cpu"))
    volume = make_phantom(shape=(24, 96, 96), spacing=(8.0, 4.0, 4.0), seed=4246).volume()
    supine = segmenter.predict(volume)
    right_lung = next(s.label for s in segmenter.structures if s.name == "Right lung")
    columns = np.nonzero(supine == right_lung)[2]
    assert columns.size and columns.mean() < volume.hu.shape[2] / 2  # the patient's right: low columns
    # The same patient stored prone-style (rows and columns reversed) and feet first.
    prone = Volume(volume.hu[:, ::-1, ::-1].copy(), volume.spacing, ((0, 0, 1), (0, -1, 0), (-1, 0, 0)))
    np.testing.assert_array_equal(segmenter.predict(prone)[:, ::-1, ::-1], supine)
    feet_first = Volume(volume.hu[::-1, :, ::-1].copy(), volume.spacing, ((0, 0, -1), (0, 1, 0), (-1, 0, 0)))
    np.testing.assert_array_equal(segmenter.predict(feet_first)[::-1, :, ::-1], supine)
