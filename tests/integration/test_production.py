"""Production shape: PostgreSQL, Redis, a separate ``segnode worker``; and a PACS that auto-routes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.shared_data import real_j2k_copy

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def segs(orthanc: peers.Orthanc) -> list[dict[str, object]]:
    tags = [orthanc.instance_tags(i) for i in orthanc.instances()]
    return [t for t in tags if t.get("SOPClassUID") == SEG]


def test_real_jpeg2000_series_through_postgresql_redis_and_a_separate_worker(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc: peers.Orthanc,
    fresh_pg_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    node = segnode_factory(
        database_url=fresh_pg_url,
        worker={"broker_url": redis_url},
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[{"name": "ct", "min_slices": 10, "destinations": ["pacs"]}],
    )
    node.serve(workers=False)
    node.worker()
    paths = real_j2k_copy(tmp_path / "j2k")
    sent = peers.storescu(paths, node.port, aet="SEGNODE", calling_aet="CT01", extra_args=["-R", "-xv"])
    assert sent.returncode == 0, sent.stdout + sent.stderr

    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    assert job.instance_count == 20
    (seg,) = segs(orthanc)
    source = dcmread(paths[0], stop_before_pixels=True)
    assert seg["StudyInstanceUID"] == source.StudyInstanceUID
    assert seg["SOPInstanceUID"] == job.output_sop_instance_uid
    shown = node.cli("jobs", "show", str(job.id)).stdout
    assert "load_decode" in shown and "segment" in shown and "write_seg" in shown
    assert "worker segnode-test@" in shown
    # A Celery pool process is daemonic to the standard library: the decoders must start regardless.
    cores = min(len(os.sched_getaffinity(0)), 20)
    assert f"20 slices decoded by {cores} process(es)" in shown


def test_orthanc_auto_routes_stable_ct_series_and_gets_the_seg_back(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc_factory: Callable[..., peers.Orthanc],
    tmp_path: Path,
) -> None:
    node_port = peers.free_port()
    # Orthanc's own routing: every stable CT series goes to segnode (the SEG series is not CT).
    lua = """
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    RestApiPost('/modalities/segnode/store', seriesId)
  end
end
"""
    orthanc = orthanc_factory(modalities={"segnode": ["SEGNODE", "127.0.0.1", node_port]}, lua_scripts=[lua])
    node = segnode_factory(
        scp={"port": node_port, "allowed_calling_aes": [orthanc.aet]},
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    for path in factory.make_ct_series(tmp_path / "ct", n_slices=20):
        orthanc.upload(path)

    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    assert job.instance_count == 20
    assert len(segs(orthanc)) == 1
    assert len(orthanc.series()) == 2
