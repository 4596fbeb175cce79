"""The shipped demo network served end to end: storescu -> segnode -> U-Net -> SEG in Orthanc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.db.models import Job, JobState
from segmenters.metrics import dice_iou
from segmenters.synthetic import Phantom, make_phantom
from segmenters.volume_files import write_dicom_series
from tests import peers
from tests.node_process import SegnodeProcesses

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def serve_and_fetch_seg(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc: peers.Orthanc,
    phantom: Phantom,
    tmp_path: Path,
    segmenter: str,
    segmenters: dict[str, Any] | None = None,
) -> tuple[Job, hd.seg.Segmentation, list[str]]:
    """Send ``phantom`` by storescu to a node whose rule runs ``segmenter`` and sends to Orthanc;
    returns the delivered job, the one SEG Orthanc holds, and the source SOP Instance UIDs in
    slice order."""
    paths = write_dicom_series(phantom, tmp_path / "ct")
    node = segnode_factory(
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        segmenters=segmenters or {},
        rules=[{"name": "thorax", "min_slices": 10, "segmenter": segmenter, "destinations": ["pacs"]}],
    )
    node.serve()
    sent = peers.storescu(paths, node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=240)
    (seg_id,) = [i for i in orthanc.instances() if orthanc.instance_tags(i).get("SOPClassUID") == SEG]
    seg_file = tmp_path / "seg.dcm"
    seg_file.write_bytes(orthanc.request("GET", f"/instances/{seg_id}/file"))
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    return job, hd.seg.segread(seg_file), uids


def test_demo_network_segments_a_phantom_sent_by_storescu(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    # The grid the demo model was trained on (a 256 x 384 x 384 mm thorax, 32 x 128 x 128), a new seed.
    phantom = make_phantom(shape=(32, 128, 128), spacing=(8.0, 3.0, 3.0), seed=4242)
    job, seg, uids = serve_and_fetch_seg(segnode_factory, orthanc, phantom, tmp_path, "demo-thorax-unet")
    assert "demo model" in seg.SeriesDescription
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert {"Right lung", "Left lung", "Heart"} <= set(names.values())

    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=list(names))
    reference = {s.name: s.label for s in phantom.structures}
    for number, name in names.items():
        if name in ("Right lung", "Left lung", "Heart"):
            dice, _ = dice_iou(masks[..., list(names).index(number)] > 0, phantom.labels == reference[name])
            assert dice > 0.85, (name, dice)
    assert job.segmenter == "demo-thorax-unet"
    assert np.any(masks)


def test_demo_network_cropped_to_the_body_reaches_orthanc(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    # A 600 mm field, twice the one the demo model was trained on: bare, it labels air as lung.
    phantom = make_phantom(shape=(32, 200, 200), spacing=(8.0, 3.0, 3.0), seed=4243)
    declared = {"thorax-cropped": {"base": "demo-thorax-unet", "crop_to_body": True}}
    job, seg, uids = serve_and_fetch_seg(
        segnode_factory, orthanc, phantom, tmp_path, "thorax-cropped", declared
    )
    assert job.segmenter == "thorax-cropped"

    name = "segnode-demo-thorax-unet (demo model) (body-cropped)"
    assert seg.SeriesDescription == f"AI ({name} 1.0)"
    for segment in seg.SegmentSequence:
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (name, "1.0")
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=list(names))
    assert not masks[phantom.labels == 0].any()  # nothing in the air or on the couch
    reference = {s.name: s.label for s in phantom.structures}
    for index, label in enumerate(names.values()):
        if label in ("Right lung", "Left lung"):
            dice, _ = dice_iou(masks[..., index] > 0, phantom.labels == reference[label])
            assert dice > 0.9, (label, dice)
