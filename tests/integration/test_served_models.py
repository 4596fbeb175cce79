"""Every kind of served network end to end: a network `segnode train` made (the demo U-Net),
exported by `segnode export`, declared in the configuration, and a phantom sent by storescu comes
back from Orthanc as a SEG whose segments are coded and which dciodvfy accepts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from segmenters.metrics import dice_iou
from segmenters.registry import DEMO_CHECKPOINT
from segmenters.synthetic import make_phantom
from tests import peers
from tests.integration.test_demo_model import serve_and_fetch_seg
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
