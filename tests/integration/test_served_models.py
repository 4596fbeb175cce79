"""Every kind of served network end to end: a network `segnode train` made (the demo U-Net),
exported by `segnode export`, an nnU-Net v2 model trained by nnU-Net's own commands, and one such
model as TotalSegmentator's weights, each declared in the configuration; a phantom sent by
storescu comes back from Orthanc as a SEG whose segments are coded and which dciodvfy accepts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segmenters.base import Volume
from segmenters.metrics import dice_iou
from segmenters.registry import DEMO_CHECKPOINT
from segmenters.synthetic import make_phantom
from tests import peers
from tests.integration.test_demo_model import serve_and_fetch_seg
from tests.nnunet_model import TOTALSEGMENTATOR_BODY, install_as_totalsegmentator_weights, train_tiny_nnunet
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


@pytest.fixture(scope="module")
def tiny_totalsegmentator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TOTALSEG_HOME_DIR holding a tiny nnU-Net as the weights of TotalSegmentator's fast body task
    (its dataset 300), trained for one epoch on phantoms: only the weights are small."""
    root = tmp_path_factory.mktemp("totalsegmentator")
    install_as_totalsegmentator_weights(train_tiny_nnunet(root, dataset=TOTALSEGMENTATOR_BODY), root / "home")
    return root / "home"


def test_a_totalsegmentator_task_is_served_end_to_end(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc: peers.Orthanc,
    tmp_path: Path,
    tiny_totalsegmentator: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tiny_totalsegmentator))  # the worker's environment
    declared = {"body": {"totalsegmentator": "body", "fast": True, "device": "cpu"}}
    phantom = make_phantom(shape=(24, 96, 96), spacing=(8.0, 4.0, 4.0), seed=4247)
    nodes: list[SegnodeProcesses] = []

    def node_factory(**config: Any) -> SegnodeProcesses:
        nodes.append(segnode_factory(**config))
        return nodes[-1]

    job, seg, uids = serve_and_fetch_seg(node_factory, orthanc, phantom, tmp_path, "body", declared)
    assert job.segmenter == "body"
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "TotalSegmentator body"
    # Coded by TotalSegmentator's published mapping: the trunk, and the limbs, which it found none of.
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes["body_trunc"] == "22943007"
    numbers = {s.SegmentLabel: int(s.SegmentNumber) for s in seg.SegmentSequence}
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(numbers.values())
    )
    trunk = masks[..., list(numbers).index("body_trunc")] > 0
    dice, _ = dice_iou(trunk, phantom.labels > 0)
    assert dice > 0.9, dice
    assert peers.dciodvfy_errors(tmp_path / "seg.dcm") == []
    # No usage report left the node, and no log line says one would: its config says so before the run.
    config = json.loads((tiny_totalsegmentator / "config.json").read_text())
    assert config["send_usage_stats"] is False
    (node,) = nodes
    log = (node.workdir / "serve.log").read_text(errors="replace")
    assert "running body" in log and "usage statistics" not in log


def test_totalsegmentator_labels_follow_the_patient_whatever_the_series_orientation(
    tiny_totalsegmentator: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segmenters.served.totalsegmentator import TotalSegmentatorSegmenter

    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tiny_totalsegmentator))
    segmenter = TotalSegmentatorSegmenter("body", fast=True, device=torch.device("cpu"))
    volume = make_phantom(shape=(24, 96, 96), spacing=(8.0, 4.0, 4.0), seed=4248).volume()
    supine = segmenter.predict(volume)
    assert np.count_nonzero(supine == 1) > supine.size // 4  # the trunk fills much of the grid
    prone = Volume(volume.hu[:, ::-1, ::-1].copy(), volume.spacing, ((0, 0, 1), (0, -1, 0), (-1, 0, 0)))
    np.testing.assert_array_equal(segmenter.predict(prone)[:, ::-1, ::-1], supine)
    feet_first = Volume(volume.hu[::-1, :, ::-1].copy(), volume.spacing, ((0, 0, -1), (0, 1, 0), (-1, 0, 0)))
    np.testing.assert_array_equal(segmenter.predict(feet_first)[::-1, :, ::-1], supine)
