"""A worker on another machine: its own data folder, only the database, the broker and the node's
address in common. It reads its series over WADO-RS, hands the SEG back to the node, and a delivery
retry always fetches them from the node, whatever its machine has (PostgreSQL, Redis). A worker that
lost its job hands back nothing, and a series is written as it arrives."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, text

from node.core.config import Settings
from node.db import engine as db
from node.db.job_runs import JobRuns
from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.dicomweb_source import GatedSource
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually
from workers.errors import ProcessingFailedError
from workers.remote import WORKER_HEADER, NodeClient

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
    node.add_user("gpu-box", "worker", PASSWORD)
    token = node.token("gpu-box")
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

    # As if a worker had been killed while it fetched the SEG: what it left is not what is sent.
    left = remote_data / "outputs" / f"job-{job.id}" / "seg.dcm"
    left.write_bytes(left.read_bytes()[:1000])
    pacs = peers.start_storescp(tmp_path / "pacs", aet="PACS", port=pacs_port)
    try:
        node.wait_for_state(JobState.DELIVERED, timeout=180)
        (received,) = pacs.wait_for_files(1)
        sent_seg, kept_seg = pydicom.dcmread(received), pydicom.dcmread(node_results / "seg.dcm")
        assert sent_seg.SOPInstanceUID == kept_seg.SOPInstanceUID == job.output_sop_instance_uid
        assert sent_seg.PixelData == kept_seg.PixelData
    finally:
        pacs.stop()
    assert left.read_bytes() == (node_results / "seg.dcm").read_bytes()
    assert not list(left.parent.glob(".*"))  # no temporary file left beside it
    assert "worker remote@" in node.cli("jobs", "show", str(job.id)).stdout


def _worker_token(node: SegnodeProcesses) -> str:
    node.add_user("gpu-box", "worker", PASSWORD)
    return node.token("gpu-box")


def _results(tmp_path: Path, name: str, seg: bytes) -> Path:
    """A worker's results folder holding ``seg``."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "seg.dcm").write_bytes(seg)
    return folder


def _waiting_on_body(engine: Engine) -> int:
    """The database connections left in a transaction for over a second: a request that held one
    while its body arrived would show here."""
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'idle in transaction' AND state_change < now() - interval '1 second'"
                )
            )
        )


def test_a_worker_that_lost_its_job_hands_back_nothing(
    segnode_factory: Callable[..., SegnodeProcesses],
    fresh_pg_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Worker A's lease lapsed and B took the job over: A's late upload is refused and B's SEG
    stays. An upload under way when its job changes hands (here: cancelled) is refused at the
    end, and no database connection waits on its body meanwhile."""
    node = segnode_factory(
        database_url=fresh_pg_url,
        worker={"broker_url": redis_url},
        api={"enabled": True},
        rules=[{"name": "ct", "min_slices": 3}],
    )
    node.serve(workers=False)  # the jobs are run here, by hand, as workers A and B
    token = _worker_token(node)
    port = node.values["api"]["port"]
    assert eventually(lambda: peers.port_open(port), timeout=60), "no API"
    sent = peers.storescu(factory.make_ct_series(tmp_path / "ct", n_slices=4), node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_jobs(lambda jobs: bool(jobs) and jobs[0].state == JobState.QUEUED, 120, "queued")
    engine = db.make_engine(fresh_pg_url)
    try:
        sessions = db.make_sessionmaker(engine)
        assert JobRuns(sessions, "gpu-a/1", lease_s=0.5).claim(job.id) is not None
        node.wait_for_jobs(  # A's lease lapses; the scheduler queues the job again, and B takes it
            lambda jobs: jobs[0].state == JobState.QUEUED and not jobs[0].worker, 60, "A's job taken back"
        )
        assert JobRuns(sessions, "gpu-b/2", lease_s=600).claim(job.id) is not None

        client = NodeClient(
            Settings(
                data_dir=tmp_path / "gpu",
                worker={"node_url": f"http://127.0.0.1:{port}", "node_token": token},
            )
        )
        kept = Path(node.values["data_dir"]) / "outputs" / f"job-{job.id}" / "seg.dcm"
        client.upload(job.id, _results(tmp_path, "b", b"B's SEG"), "gpu-b/2")
        with pytest.raises(ProcessingFailedError, match=r"409.*no longer worker gpu-a/1's"):
            client.upload(job.id, _results(tmp_path, "a", b"A's late SEG"), "gpu-a/1")
        assert kept.read_bytes() == b"B's SEG"

        body = b"B's second SEG " * 10_000
        upload = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        upload.putrequest("PUT", f"/api/jobs/{job.id}/results/seg.dcm")
        for name, value in (("Authorization", f"Bearer {token}"), (WORKER_HEADER, "gpu-b/2")):
            upload.putheader(name, value)
        upload.putheader("Content-Length", str(len(body)))
        upload.endheaders(body[: len(body) // 2])
        time.sleep(2)  # the node reads the body's first half and waits for the rest
        assert _waiting_on_body(engine) == 0
        cancelled = node.cli("jobs", "cancel", str(job.id))
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        upload.send(body[len(body) // 2 :])
        answer = upload.getresponse()
        assert answer.status == 409 and b"CANCELLED" in answer.read()
        upload.close()
    finally:
        engine.dispose()
    assert kept.read_bytes() == b"B's SEG"
    assert sorted(p.name for p in kept.parent.iterdir()) == ["seg.dcm"]  # no temporary file left


def test_a_worker_writes_each_instance_of_its_series_as_it_arrives(tmp_path: Path) -> None:
    """The first instance is on the worker's disk while the node still sends the rest: a long
    series is never in the worker's memory whole."""
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=4)
    datasets = [pydicom.dcmread(path) for path in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    cache = tmp_path / "cache"
    port = peers.free_port()
    parts = [path.read_bytes() for path in paths]
    with GatedSource(port, study, series, parts, lambda: (cache / f"{uids[0]}.dcm").is_file()) as node:
        client = NodeClient(
            Settings(data_dir=tmp_path / "gpu", worker={"node_url": f"http://127.0.0.1:{port}"})
        )
        fetched = client.fetch_inputs(study, series, uids, cache)
    assert node.stored_early, "the worker wrote nothing before the node had sent the whole series"
    assert [str(pydicom.dcmread(path).SOPInstanceUID) for path in fetched] == uids
    assert [pydicom.dcmread(path).PixelData for path in fetched] == [ds.PixelData for ds in datasets]
