"""A worker on another machine: its own data folder, only the database, the broker and the node's
address in common. It reads its series over WADO-RS, hands the SEG back to the node, and a delivery
retry that finds no results on its machine fetches them from the node (PostgreSQL, Redis)."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"  # noqa: S105 - the test user's


def test_a_worker_without_the_node_folder_segments_and_delivers(
    segnode_factory: Callable[..., SegnodeProcesses],
    fresh_pg_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    pacs_port = peers.free_port()  # the PACS is down at first
    retries = {"delivery_max_attempts": 50, "delivery_backoff_s": 0.5, "delivery_backoff_max_s": 1.0}
    node = segnode_factory(
        database_url=fresh_pg_url,
        worker={"broker_url": redis_url, **retries},
        api={"enabled": True},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve(workers=False)
    added = node.cli("users", "add", "gpu-box", "--role", "worker", "--password-stdin", input=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    token = node.cli("users", "token", "gpu-box").stdout.strip()
    api = f"http://127.0.0.1:{node.values['api']['port']}"
    assert eventually(lambda: peers.port_open(node.values["api"]["port"]), timeout=60), "no API"
    request = urllib.request.Request(f"{api}/api/jobs", headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:  # a worker's token opens no page of people's
        urllib.request.urlopen(request, timeout=30)  # noqa: S310 - our own node
    assert refused.value.code == 403

    remote = segnode_factory(
        database_url=fresh_pg_url,
        worker={"broker_url": redis_url, "node_url": api, "node_token": token, **retries},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    assert remote.values["data_dir"] != node.values["data_dir"]
    remote.worker(celery_name="remote@%h")

    sent = peers.storescu(factory.make_ct_series(tmp_path / "ct", n_slices=6), node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_jobs(
        lambda jobs: (
            bool(jobs)
            and jobs[0].state == JobState.SEGMENTED
            and "send_failed" in node.cli("jobs", "show", str(jobs[0].id)).stdout
        ),
        180,
        "segmented, its first delivery refused",
    )
    node_results = Path(node.values["data_dir"]) / "outputs" / f"job-{job.id}"
    remote_data = Path(remote.values["data_dir"])
    assert (node_results / "seg.dcm").is_file()  # handed back to the node
    assert not (remote_data / "storage").exists() or not any((remote_data / "storage").rglob("*.dcm"))
    assert not any((remote_data / "cache").rglob("*.dcm"))  # the fetched series is not kept

    # As if another machine retried the delivery: no results on this one; they come from the node.
    shutil.rmtree(remote_data / "outputs" / f"job-{job.id}")
    pacs = peers.start_storescp(tmp_path / "pacs", aet="PACS", port=pacs_port)
    try:
        node.wait_for_state(JobState.DELIVERED, timeout=180)
        (received,) = pacs.wait_for_files(1)
        sent_seg, kept_seg = pydicom.dcmread(received), pydicom.dcmread(node_results / "seg.dcm")
        assert sent_seg.SOPInstanceUID == kept_seg.SOPInstanceUID == job.output_sop_instance_uid
        assert sent_seg.PixelData == kept_seg.PixelData
    finally:
        pacs.stop()
    assert (remote_data / "outputs" / f"job-{job.id}" / "seg.dcm").is_file()
    assert "worker remote@" in node.cli("jobs", "show", str(job.id)).stdout
