"""Every output a rule can ask for (SEG, RTSTRUCT, SR, overlay images), written for the real thorax,
sent to Orthanc, listed in the CT's study there, each delivery recorded, and valid in dciodvfy as
Orthanc holds it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from node.db.models import JobState
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.shared_data import THORAX

pytestmark = pytest.mark.slow


def test_seg_rtstruct_sr_and_overlay_reach_the_pacs_in_the_cts_study(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[
            {
                "name": "thorax",
                "min_slices": 3,
                "destinations": ["pacs"],
                "outputs": ["seg", "rtstruct", "sr", "overlay"],
            }
        ],
    )
    node.serve()
    slices = sorted((THORAX / "ct").iterdir())
    # The CT is in the PACS already, as at a site; the modality sends it to the node too.
    assert peers.storescu(slices, orthanc.dicom_port, aet=orthanc.aet, timeout=300).returncode == 0
    assert peers.storescu(slices, node.port, aet="SEGNODE", timeout=300).returncode == 0
    [job] = node.wait_for_state(JobState.DELIVERED, timeout=300)

    shown = node.cli("jobs", "show", str(job.id)).stdout
    for output in ("seg", "rtstruct", "sr", "overlay"):
        assert f"{output} to pacs: DELIVERED after 1 attempt(s)" in shown, shown

    study = dcmread(slices[0], stop_before_pixels=True).StudyInstanceUID
    [study_id] = [
        s
        for s in orthanc.studies()
        if orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] == study
    ]
    by_modality: Counter[str] = Counter()
    for series_id in orthanc.get(f"/studies/{study_id}")["Series"]:
        series = orthanc.get(f"/series/{series_id}")
        modality = series["MainDicomTags"].get("Modality", "")
        by_modality[modality] += len(series["Instances"])
        if modality == "CT":
            continue
        first = series["Instances"][0]
        path = tmp_path / f"{modality}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{first}/file"))
        assert peers.dciodvfy_errors(path) == [], modality
    assert by_modality["CT"] == len(slices)
    assert by_modality["SEG"] == 1 and by_modality["RTSTRUCT"] == 1 and by_modality["SR"] == 1
    assert by_modality["OT"] == len(slices)  # one overlay image for each CT slice
