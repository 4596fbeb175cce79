"""CT in by C-STORE, DICOM-SEG out to the PACS: segnode's real processes with DCMTK and Orthanc."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def pacs_config(orthanc: peers.Orthanc, **rule: object) -> dict[str, object]:
    return {
        "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        "rules": [
            {"name": "ct", "min_slices": 3, "segmenter": "classical", "destinations": ["pacs"], **rule}
        ],
    }


def seg_instances(orthanc: peers.Orthanc) -> list[dict[str, object]]:
    tags = [{**orthanc.instance_tags(i), "ID": i} for i in orthanc.instances()]
    return [t for t in tags if t.get("SOPClassUID") == SEG]


def test_series_by_storescu_comes_back_as_seg_in_orthanc(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(**pacs_config(orthanc))
    node.serve()
    paths = factory.make_ct_series(
        tmp_path / "ct", n_slices=24, patient_name="Sensitive^Jane", patient_id="PID-7781-SECRET"
    )
    sent = peers.storescu(paths, node.port, aet="SEGNODE", calling_aet="CT01")
    assert sent.returncode == 0, sent.stdout + sent.stderr

    (job,) = node.wait_for_state(JobState.DELIVERED)
    segs = seg_instances(orthanc)
    assert len(segs) == 1
    source = dcmread(paths[0], stop_before_pixels=True)
    assert segs[0]["StudyInstanceUID"] == source.StudyInstanceUID
    assert segs[0]["SOPInstanceUID"] == job.output_sop_instance_uid

    listing = node.cli("jobs", "list")
    assert listing.returncode == 0, listing.stderr
    assert f"{job.id}  DELIVERED   classical" in listing.stdout
    shown = node.cli("jobs", "show", str(job.id))
    assert shown.returncode == 0, shown.stderr
    for event in ("created", "queued", "started", "segmented", "sent", "delivered"):
        assert f" {event} " in shown.stdout, shown.stdout
    assert "pacs: DELIVERED after 1 attempt(s)" in shown.stdout

    # A retry (or a resend) puts no second SEG into the PACS: the output UIDs are derived.
    retried = node.cli("jobs", "retry", str(job.id))
    assert retried.returncode == 0, retried.stderr
    node.wait_for_jobs(lambda jobs: jobs[0].attempts == 2 and jobs[0].state == JobState.DELIVERED)
    assert len(seg_instances(orthanc)) == 1

    # No patient identifiers in any log line of the node or its worker.
    logs = node.logs()
    assert "job 1 series" in logs
    assert "Sensitive" not in logs and "PID-7781" not in logs

    # The SEG as the PACS holds it passes dciodvfy with no errors.
    seg_file = tmp_path / "seg.dcm"
    seg_file.write_bytes(orthanc.request("GET", f"/instances/{segs[0]['ID']}/file"))
    checked = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True, check=False)
    errors = [line for line in checked.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], checked.stderr


def test_bad_series_is_rejected_with_a_reason(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(**pacs_config(orthanc))
    node.serve()
    gap = factory.make_ct_series(tmp_path / "gap", n_slices=12, skip_slices=[6])
    assert peers.storescu(gap, node.port, aet="SEGNODE").returncode == 0
    scout = factory.make_ct_series(tmp_path / "sr", n_slices=1)
    assert peers.storescu(scout, node.port, aet="SEGNODE").returncode == 0

    jobs = node.wait_for_state(JobState.REJECTED, count=2)
    reasons = sorted(j.reason for j in jobs)
    assert any("1 slices, fewer than the 3 required" in r for r in reasons), reasons
    assert any("missing" in r.lower() for r in reasons), reasons
    shown = node.cli("jobs", "list", "--state", "REJECTED")
    assert "reason:" in shown.stdout
    assert seg_instances(orthanc) == []


def test_config_check_and_schema_guard(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "tls": {"ca_bundle": "ca.pem"}}
        },
        rules=[{"name": "chest", "body_parts": ["CHEST"], "destinations": ["pacs"], "complete_by": "study"}],
    )
    checked = node.cli("config", "check")
    assert checked.returncode == 0, checked.stderr
    assert "Rule 1 'chest': segmenter classical, send to pacs" in checked.stdout
    assert "body part CHEST" in checked.stdout
    assert "complete: by study, the study's jobs together" in checked.stdout
    assert "C-STORE to PACS@127.0.0.1:4242 over TLS (trusting ca.pem)" in checked.stdout
    assert "Configuration OK." in checked.stdout

    refused = node.cli("jobs", "list")
    assert refused.returncode != 0
    assert "segnode db upgrade" in refused.stderr

    bad = segnode_factory(rules=[{"name": "r", "segmenter": "no-such-net"}])
    checked = bad.cli("config", "check")
    assert checked.returncode != 0
    assert "names segmenter 'no-such-net', which is not installed" in checked.stderr
