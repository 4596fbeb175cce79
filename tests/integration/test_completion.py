"""Completion against real senders: a series released whole is a job at once, its results held for
the release grace; one that comes in batches, interleaved with another, or with a gap, is one job
when it is whole; a study-level rule waits for the study; a series that grows after the grace
supersedes its job; the CLI completes on request.

Quiet periods here are far longer than any wait, so a job that appears came by fast completion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from node.core.dicom import CT_IMAGE
from node.db import engine as db
from node.db.models import Job, JobEvent, JobState, Series, utcnow
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually

pytestmark = pytest.mark.slow

NEVER_QUIET = 600.0  # no test waits this long: its jobs come by fast completion or not at all
GRACE = 5.0  # the pauses between a sender's batches are far shorter


def send(port: int, datasets: Sequence[Dataset], calling: str = "MODALITY") -> None:
    """One association that stores ``datasets`` and is released."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def series(folder: Path, n: int = 12, **kwargs: object) -> list[Dataset]:
    return [dcmread(p) for p in factory.make_ct_series(folder, n_slices=n, **kwargs)]  # type: ignore[arg-type]


def creation(node: SegnodeProcesses, job: Job) -> str:
    engine = db.make_engine(node.database_url)
    with db.make_sessionmaker(engine)() as session:
        message = session.scalar(
            select(JobEvent.message).where(JobEvent.job_id == job.id, JobEvent.event == "created")
        )
    engine.dispose()
    return message or ""


def released(node: SegnodeProcesses, series_uid: str) -> bool:
    engine = db.make_engine(node.database_url)
    with db.make_sessionmaker(engine)() as session:
        at = session.scalar(select(Series.released_at).where(Series.series_instance_uid == series_uid))
    engine.dispose()
    return at is not None


@pytest.fixture(params=[False, True], ids=["plain", "fast-path"])
def node(
    request: pytest.FixtureRequest, segnode_factory: Callable[..., SegnodeProcesses]
) -> SegnodeProcesses:
    made = segnode_factory(
        quiet_period_s=NEVER_QUIET,
        release_grace_s=GRACE,
        scp={"fast_path": request.param},
        rules=[{"name": "ct", "min_slices": 3}],
    )
    made.serve(workers=False)
    return made


def test_a_series_released_whole_is_a_job_within_seconds(node: SegnodeProcesses, tmp_path: Path) -> None:
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=12)
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0
    [job] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the job")
    assert job.instance_count == 12
    made = creation(node, job)
    assert "released by its sender as a whole volume of 12 images" in made
    assert f"it runs now, its results held until its {GRACE:g} s release grace has passed" in made


def test_a_series_in_three_batches_and_one_interleaved_with_it_are_one_job_each(
    node: SegnodeProcesses, tmp_path: Path
) -> None:
    first, second = series(tmp_path / "a", 30), series(tmp_path / "b", 20)
    for batch in (first[:10], first[10:20]):  # a PACS that sends in batches, pausing briefly
        send(node.port, batch)
    # The rest of the first and the whole second, interleaved, by two senders at once.
    mixed = [ds for pair in zip(first[20:], second[:10], strict=True) for ds in pair]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda part: send(node.port, part[0], part[1]), [(mixed, "ONE"), (second[10:], "TWO")]))
    # Each release of a whole volume makes (or runs again) the series' job at once.
    jobs = node.wait_for_jobs(
        lambda jobs: sorted(j.instance_count for j in jobs) == [20, 30], timeout=60, what="two whole jobs"
    )
    assert len(jobs) == 2


def test_a_batch_short_of_what_the_sender_announced_waits_for_the_rest_then_goes_at_once(
    node: SegnodeProcesses, tmp_path: Path
) -> None:
    slices = series(tmp_path / "ct", 24)
    for ds in slices:
        ds.ImagesInAcquisition = 24
    send(node.port, slices[:12])  # a whole volume so far, evenly spaced, but not what was announced
    uid = slices[0].SeriesInstanceUID
    assert eventually(lambda: released(node, uid), timeout=30)
    time.sleep(GRACE + 2)  # past the grace: a job now would be one made of half the series
    assert node.jobs() == []
    send(node.port, slices[12:])
    [job] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the job")
    assert job.instance_count == 24
    # All it announced arrived: no grace to wait for a next batch.
    assert "released by its sender with all 24 images it announced" in creation(node, job)


def test_a_series_with_a_missing_slice_waits_out_its_quiet_period(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(quiet_period_s=8.0, release_grace_s=0.5, rules=[{"name": "ct", "min_slices": 3}])
    node.serve(workers=False)
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=12, skip_slices=[5])
    assert peers.storescu(paths, node.port, aet="SEGNODE").returncode == 0
    [job] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the job")
    made = creation(node, job)
    assert "no new instance for 8 s" in made and "released" not in made


def test_a_study_level_rule_makes_the_jobs_of_a_study_together(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(
        quiet_period_s=NEVER_QUIET,
        release_grace_s=0.5,
        rules=[{"name": "study", "min_slices": 3, "complete_by": "study"}],
    )
    node.serve(workers=False)
    study = generate_uid()
    early, late = series(tmp_path / "a", 10, study_uid=study), series(tmp_path / "b", 10, study_uid=study)
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    slow = ae.associate("127.0.0.1", node.port, ae_title="SEGNODE")  # the study's other series, under way
    assert slow.is_established
    assert slow.send_c_store(late[0]).Status == 0
    send(node.port, early)  # whole and released: alone it would be a job half a second later
    assert eventually(lambda: released(node, early[0].SeriesInstanceUID), timeout=30)
    time.sleep(2.0)  # past its grace
    assert node.jobs() == []  # it waits for the study
    for ds in late[1:]:
        assert slow.send_c_store(ds).Status == 0
    slow.release()
    jobs = node.wait_for_jobs(lambda jobs: len(jobs) == 2, timeout=60, what="the study's two jobs")
    assert all("every series of its study is complete" in creation(node, j) for j in jobs)


def test_a_series_that_grows_supersedes_its_job_and_one_seg_reaches_the_pacs(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(
        quiet_period_s=NEVER_QUIET,
        release_grace_s=0.5,
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve(workers=False)  # the first job waits in the queue while the series grows
    slices = series(tmp_path / "ct", 16)
    send(node.port, slices[:8])
    [first] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the first job")
    held = first.hold_until
    assert held is not None
    assert eventually(lambda: utcnow() > held, timeout=30)  # the rest comes after the grace
    send(node.port, slices[8:])
    jobs = node.wait_for_jobs(lambda jobs: len(jobs) == 2, timeout=60, what="the second job")
    assert jobs[0].state == JobState.SUPERSEDED
    assert f"superseded by job {jobs[1].id}" in jobs[0].reason
    node.worker()
    done = node.wait_for_state(JobState.DELIVERED, timeout=120)
    assert [j.id for j in done if j.state == JobState.DELIVERED] == [jobs[1].id]
    assert node.jobs()[0].state == JobState.SUPERSEDED  # its task ran and found it superseded
    segs = [i for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SEG"]
    assert len(segs) == 1


def test_a_batch_within_the_grace_runs_the_same_job_again_and_one_whole_seg_reaches_the_pacs(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    node = segnode_factory(
        quiet_period_s=NEVER_QUIET,
        release_grace_s=GRACE,
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    slices = series(tmp_path / "ct", 16)
    send(node.port, slices[:8])
    [job] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the job")
    send(node.port, slices[8:])  # the next batch, well within the grace
    [done] = node.wait_for_state(JobState.DELIVERED, timeout=120)
    assert (done.id, done.instance_count) == (job.id, 16)
    assert (
        done.hold_until is not None and done.finished_at is not None and done.finished_at >= done.hold_until
    )
    assert [j.id for j in node.jobs()] == [job.id]
    shown = node.cli("jobs", "show", str(job.id)).stdout
    assert "held until:" in shown and "grew from 8 to 16 instances while the results were held" in shown
    segs = [i for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SEG"]
    assert len(segs) == 1
    seg = dcmread(BytesIO(orthanc.request("GET", f"/instances/{segs[0]}/file")))
    [source] = seg.ReferencedSeriesSequence  # the SEG of the whole series, not of its first batch
    assert {i.ReferencedSOPInstanceUID for i in source.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in slices
    }


def test_complete_on_request_from_the_command_line(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(
        quiet_period_s=NEVER_QUIET, rules=[{"name": "ct", "min_slices": 3, "fast_completion": False}]
    )
    node.serve(workers=False)
    slices = series(tmp_path / "ct", 6)
    send(node.port, slices)
    asked = node.cli("complete", slices[0].StudyInstanceUID)
    assert asked.returncode == 0, asked.stderr
    assert "1 series taken as complete" in asked.stdout
    [job] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the job")
    assert "completed on request" in creation(node, job)
    unknown = node.cli("complete", "1.2.3.999")
    assert unknown.returncode != 0 and "no series or study 1.2.3.999 has been received" in unknown.stderr


def test_a_release_after_a_refused_instance_waits_out_the_quiet_period(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    node = segnode_factory(quiet_period_s=8.0, release_grace_s=0.5, rules=[{"name": "ct", "min_slices": 3}])
    node.serve(workers=False)
    slices = series(tmp_path / "ct", 8)
    broken = slices[-1].copy()
    del broken.PixelData  # refused: the sender will send it again, the series is not whole yet
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SEGNODE")
    assert assoc.is_established
    for ds in slices[:-1]:
        assert assoc.send_c_store(ds).Status == 0
    assert assoc.send_c_store(broken).Status == 0xA900
    assoc.release()
    [job] = node.wait_for_jobs(lambda jobs: len(jobs) == 1, timeout=60, what="the job")
    made = creation(node, job)
    assert "no new instance for 8 s" in made and "released" not in made
