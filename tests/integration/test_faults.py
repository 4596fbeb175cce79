"""Faults that must lose nothing: a PACS that is down, a worker killed mid-job, a node restarted."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.db import engine as db
from node.db.models import Instance, Job, JobState
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def seg_count(orthanc: peers.Orthanc) -> int:
    return sum(orthanc.instance_tags(i).get("SOPClassUID") == SEG for i in orthanc.instances())


def rule_to(port: int, aet: str = "ORTHANC") -> dict[str, object]:
    return {
        "destinations": {"pacs": {"ae_title": aet, "host": "127.0.0.1", "port": port}},
        "rules": [{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    }


def test_pacs_down_during_dispatch_is_delivered_once_it_is_back(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc_factory: Callable[..., peers.Orthanc],
    tmp_path: Path,
) -> None:
    pacs_port = peers.free_port()
    node = segnode_factory(**rule_to(pacs_port))
    node.serve()
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=16)
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0

    def failed_twice(jobs: list[Job]) -> bool:
        return (
            bool(jobs)
            and jobs[0].state == JobState.SEGMENTED
            and "attempt 2" in node.cli("jobs", "show", str(jobs[0].id)).stdout
        )

    node.wait_for_jobs(failed_twice, timeout=120, what="two failed delivery attempts")
    shown = node.cli("jobs", "show", "1").stdout
    assert "send_failed" in shown and "connection refused or timed out" in shown

    orthanc = orthanc_factory(config={"DicomPort": pacs_port})
    node.wait_for_state(JobState.DELIVERED, timeout=120)
    assert seg_count(orthanc) == 1
    shown = node.cli("jobs", "show", "1").stdout
    assert " sent " in shown and "answered 0x0000" in shown


def test_worker_killed_mid_job_is_finished_by_another_worker_with_one_seg(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(worker={"lease_s": 3}, **rule_to(orthanc.dicom_port, orthanc.aet))
    node.serve(workers=False)
    worker = node.worker()
    paths = factory.make_ct_series(
        tmp_path / "ct", n_slices=120, rows=256, cols=256, pixel_spacing=(1.25, 1.25)
    )
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0

    node.wait_for_state(JobState.RUNNING, timeout=120)
    with node.database_write_lock() as locked:  # nobody changes a job while the worker is killed
        assert locked.execute("SELECT state FROM jobs").fetchall() == [("RUNNING",)]
        node.kill(worker)  # SIGKILL to the worker and its pool processes, mid-job

    # Another machine's worker: nothing of the dead one's name or host in common.
    node.worker("second-worker", celery_name="elsewhere@gpu-2")
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    assert job.attempts == 2
    assert job.worker.startswith("elsewhere@gpu-2/")
    shown = node.cli("jobs", "show", str(job.id)).stdout
    assert "stopped renewing its lease" in shown or "whose lease had expired" in shown, shown
    assert seg_count(orthanc) == 1


def test_node_killed_while_a_study_arrives_loses_nothing_acknowledged(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(quiet_period_s=6, **rule_to(orthanc.dicom_port, orthanc.aet))
    serve = node.serve()
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=30)
    first = peers.storescu(paths[:12], node.port, aet="SEGNODE")
    assert first.returncode == 0, first.stderr
    node.kill(serve)  # SIGKILL: no shutdown code runs

    engine = db.make_engine(node.database_url)
    with db.make_sessionmaker(engine)() as session:
        stored = session.scalars(select(Instance.path)).all()
    engine.dispose()
    assert len(stored) == 12
    storage = Path(node.values["data_dir"]) / "storage"
    for relative in stored:
        assert dcmread(storage / relative).SOPInstanceUID  # complete, readable files

    node.serve(upgrade=False)
    rest = peers.storescu(paths, node.port, aet="SEGNODE")  # the sender retries the whole study
    assert rest.returncode == 0, rest.stderr
    # The 12 slices its sender had released may have made a job before the resend grew the
    # series (a slow restart): that job is then superseded, never delivered.
    jobs = node.wait_for_jobs(
        lambda jobs: any(j.state == JobState.DELIVERED and j.instance_count == 30 for j in jobs),
        timeout=120,
        what="a DELIVERED job of the 30 slices",
    )
    (job,) = [j for j in jobs if j.state == JobState.DELIVERED]
    assert {j.state for j in jobs if j is not job} <= {JobState.SUPERSEDED}
    engine = db.make_engine(node.database_url)
    with db.make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count(Instance.id))) == 30
    engine.dispose()
    assert seg_count(orthanc) == 1
    time.sleep(0.1)


def test_a_worker_killed_while_a_delivery_retry_waits_loses_nothing(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc_factory: Callable[..., peers.Orthanc],
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Redis, as in production: an unacknowledged message comes back only after stale_job_s.
    pacs_port = peers.free_port()  # nobody listens yet: the PACS is down
    # A delivery claimed by the worker that is killed is held for 4 x delivery_timeout_s: keep it short.
    node = segnode_factory(worker={"broker_url": redis_url, "delivery_timeout_s": 2}, **rule_to(pacs_port))
    node.serve(workers=False)
    first = node.worker()
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=16)
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0

    def attempted(jobs: list[Job]) -> bool:
        return bool(jobs) and "attempt 1" in node.cli("jobs", "show", str(jobs[0].id)).stdout

    node.wait_for_jobs(attempted, timeout=120, what="a failed delivery attempt")
    node.kill(first)  # its retry was never in the broker: the database says when it is due
    orthanc = orthanc_factory(config={"DicomPort": pacs_port})
    node.worker("second-worker", celery_name="elsewhere@gpu-2")
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=120)
    assert seg_count(orthanc) == 1
    assert "answered 0x0000" in node.cli("jobs", "show", str(job.id)).stdout


def test_sigterm_mid_series_lets_the_sender_finish_and_stores_every_instance(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(scp={"shutdown_grace_s": 120})
    serve = node.serve(workers=False)
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=400, rows=64, cols=64)

    def stored() -> int:
        engine = db.make_engine(node.database_url)
        with db.make_sessionmaker(engine)() as session:
            count = session.scalar(select(func.count(Instance.id))) or 0
        engine.dispose()
        return count

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(peers.storescu, paths, node.port, aet="SEGNODE")
        deadline = time.monotonic() + 60
        while stored() < 10 and not sending.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sending.done()  # mid-series
        serve.send_signal(signal.SIGTERM)  # the stop waits for this association
        result = sending.result(timeout=300)
    assert serve.wait(timeout=120) == 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert stored() == 400
    log = node.log("serve")
    assert "listener stopped; every association had ended" in log and "node stopped" in log
    assert "Traceback" not in log and "could not be stored" not in log


def test_a_broker_on_a_full_disk_is_named_and_jobs_go_once_there_is_space(
    segnode_factory: Callable[..., SegnodeProcesses], tiny_disk: Path, tmp_path: Path
) -> None:
    broker_file = tiny_disk / "broker.sqlite"
    node = segnode_factory(
        worker={"broker_url": f"sqla+sqlite:///{broker_file}"},
        rules=[{"name": "ct", "min_slices": 3}],
    )
    node.serve()
    filler = tiny_disk / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=4)
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0  # stored elsewhere: accepted
    node.wait_for_log("serve", "is full")
    served = node.log("serve")
    assert f"the disk holding the embedded broker's file {broker_file} is full" in served
    assert "NoneType" not in served and "Traceback" not in served
    job = node.wait_for_jobs(lambda jobs: bool(jobs) and "is full" in jobs[0].reason, what="a reason")[0]
    assert job.state == JobState.RECEIVED
    assert f"waiting for the broker: the disk holding the embedded broker's file {broker_file}" in job.reason

    filler.unlink()  # space again: the job goes on by itself
    done = node.wait_for_state(JobState.DELIVERED, timeout=120)[0]
    assert done.reason == ""
    node.wait_for_log("serve", "sending jobs to the broker working again")
