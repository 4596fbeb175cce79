"""The schema, migrations, storage records and job bookkeeping on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import Settings, load_settings
from node.core.queue import JobQueue, make_celery
from node.db import engine as db
from node.db.job_runs import DeliveryOutcome, JobRuns
from node.db.jobs import (
    cancel,
    expired_leases,
    jobs_with_due_deliveries,
    mark_queued,
    requeue,
    rerun,
    resend,
    retry,
    stale_jobs,
)
from node.db.models import (
    DestinationStatus,
    Instance,
    Job,
    JobEvent,
    JobState,
    Notification,
    Series,
    Suspension,
    utcnow,
)
from node.db.operations import PROCESSING, destination_answered, suspend
from node.jobs.assembly import assemble
from node.receive.instance_rows import InstanceRows, RowNotRecordedError
from node.receive.listener import instance_facts
from node.receive.part10 import file_preamble
from node.receive.spool_files import StorageFullError
from node.receive.storage import (
    InstanceFacts,
    InvalidUIDError,
    Storage,
    StoreOutcome,
    UIDInAnotherSeriesError,
)
from segmenters.base import Volume
from segmenters.classical import ClassicalSegmenter
from tests import peers
from tests.dicom_factory import make_ct_series
from tests.waiting import eventually
from workers.tasks import WorkerContext, run_process_job

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    else:
        url = peers.create_pg_database()
        yield url
        peers.drop_pg_database(url)


@pytest.fixture
def sessions(sessions_on_both: sessionmaker[Session]) -> sessionmaker[Session]:
    return sessions_on_both


def facts(series: str = "1.2.3.4", n: int = 1, **kw: str | float) -> InstanceFacts:
    values: dict[str, str | float] = {
        "study_uid": "1.2.3",
        "series_uid": series,
        "sop_instance_uid": f"{series}.{n}",
        "sop_class_uid": CT,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "modality": "CT",
        "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
    }
    values.update(kw)
    return InstanceFacts(**values)  # type: ignore[arg-type]


def settings_for(tmp_path: Path, quiet_period_s: float = 1, **kw: object) -> Settings:
    return load_settings(None, data_dir=str(tmp_path), quiet_period_s=quiet_period_s, **kw)


def _series_with_one_instance(sessions: sessionmaker[Session], tmp_path: Path, n: int) -> int:
    """The id of a series the storage created with its instance ``1.2.3.4.<n>``."""
    Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0).store([b"ct"], facts(n=n), "CT01")
    with sessions() as session:
        return session.scalars(select(Series.id)).one()


def _row(series_id: int, n: int, **values: object) -> dict[str, object]:
    """An instance row of :class:`InstanceRows` for ``1.2.3.4.<n>``."""
    return {
        "series_id": series_id,
        "sop_instance_uid": f"1.2.3.4.{n}",
        "sop_class_uid": CT,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "image_type": "ORIGINAL",
        "slice_thickness": None,
        "orientation": "",
        "slice_position": None,
        "images_in_acquisition": None,
        "path": f"1.2.3/1.2.3.4/1.2.3.4.{n}.dcm",
        "size_bytes": 1,
        "received_at": utcnow(),
        **values,
    }


def test_migrations_upgrade_and_downgrade(empty_db_url: str) -> None:
    db_url = empty_db_url
    engine = db.make_engine(db_url)
    with pytest.raises(db.SchemaOutOfDateError, match="segnode db upgrade"):
        db.check_schema(engine)
    db.upgrade(db_url)
    db.check_schema(engine)
    tables = set(inspect(engine).get_table_names())
    assert {
        "studies",
        "series",
        "instances",
        "jobs",
        "job_events",
        "deliveries",
        "users",
        "api_tokens",
    } <= tables
    db.downgrade(db_url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    with pytest.raises(db.SchemaOutOfDateError, match="has no segnode schema"):
        db.check_schema(engine)
    engine.dispose()


def test_storage_writes_records_and_keeps_duplicates_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    assert storage.store([b"first"], facts(n=1), "CT01") is StoreOutcome.STORED
    assert storage.store([b"second"], facts(n=2), "CT01") is StoreOutcome.STORED
    assert storage.store([b"again"], facts(n=1), "CT01") is StoreOutcome.DUPLICATE
    path = tmp_path / "store" / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm"
    assert path.read_bytes() == b"first"
    assert not list((tmp_path / "store" / ".incoming").iterdir())
    with sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.instance_count == 2
        assert series.calling_ae == "CT01"
        assert [i.path for i in session.scalars(select(Instance).order_by(Instance.id))] == [
            "1.2.3/1.2.3.4/1.2.3.4.1.dcm",
            "1.2.3/1.2.3.4/1.2.3.4.2.dcm",
        ]


def test_a_resend_with_other_contents_is_told_apart_from_a_plain_duplicate(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The first copy is kept either way; a corrected resend under the same UID is said so (the
    listener logs it as a warning), whoever sends it; one in another transfer syntax is not."""
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    ct = "1.2.840.10008.5.1.4.1.1.2"

    def received(data_set: bytes, sender: str, syntax: str = "1.2.840.10008.1.2.1") -> bytes:
        return file_preamble(ct, "1.2.3.4.1", syntax, sender) + data_set

    assert storage.store([received(b"pixels", "CT01")], facts(n=1), "CT01") is StoreOutcome.STORED
    assert storage.store([received(b"pixels", "PACS")], facts(n=1), "PACS") is StoreOutcome.DUPLICATE
    changed = storage.store([received(b"pixelz", "CT01")], facts(n=1), "CT01")
    assert changed is StoreOutcome.CHANGED_DUPLICATE
    converted = storage.store([received(b"pixelz", "PACS", "1.2.840.10008.1.2.4.90")], facts(n=1), "PACS")
    assert converted is StoreOutcome.OTHER_SYNTAX_DUPLICATE  # not said to be another image
    kept = tmp_path / "store" / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm"
    assert kept.read_bytes() == received(b"pixels", "CT01")
    assert not list((tmp_path / "store" / ".incoming").iterdir())


def test_an_instance_uid_reused_in_another_series_is_refused_and_leaves_no_file(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A sender that gives a new series an instance UID of an old one: refused by name (answered
    0xC000), where it was answered as a stored duplicate with a file no row names and its series
    short of a slice."""
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    assert storage.store([b"first"], facts(n=1), "CT01") is StoreOutcome.STORED
    reused = facts(series="1.2.3.5", n=1, sop_instance_uid="1.2.3.4.1")
    with pytest.raises(UIDInAnotherSeriesError, match="stored already, in another series"):
        storage.store([b"other series"], reused, "CT01")
    assert not (tmp_path / "store" / "1.2.3" / "1.2.3.5" / "1.2.3.4.1.dcm").exists()
    assert (tmp_path / "store" / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm").read_bytes() == b"first"
    assert not list((tmp_path / "store" / ".incoming").iterdir())
    with sessions() as session:
        assert session.scalars(select(func.count()).select_from(Instance)).one() == 1


def test_a_row_that_fails_takes_its_file_along_unless_another_row_names_it(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    assert storage.store([b"first"], facts(n=1), "CT01") is StoreOutcome.STORED
    kept = tmp_path / "store" / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm"
    kept.unlink()  # as when a concurrent copy of the instance is renamed over it: placed again below
    storage._rows.close()  # every row fails from now on
    with pytest.raises(RowNotRecordedError):
        storage.store([b"copy"], facts(n=1), "CT01")
    assert kept.read_bytes() == b"copy"  # a row names it: the file stays
    with pytest.raises(RowNotRecordedError):
        storage.store([b"second"], facts(n=2), "CT01")
    assert not (kept.parent / "1.2.3.4.2.dcm").exists()  # no row names it: nothing half-recorded stays
    assert not list((tmp_path / "store" / ".incoming").iterdir())
    storage.close()


def test_a_spool_flushed_by_its_first_caller_is_stored_and_its_failure_kept_for_the_handler(
    tmp_path: Path,
) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'unused.sqlite'}")
    storage = Storage(tmp_path / "store", engine, min_free_bytes=0)
    spool = storage.open_spool()
    spool.write(b"preamble+")
    spool.write(memoryview(b"data set"))
    staged = spool.finish()  # flushed here, before it returns
    assert spool.finish() is staged  # the handler's call finds the same file
    assert staged.wait().read_bytes() == b"preamble+data set"
    assert staged.size == len(b"preamble+data set")

    gone = storage.open_spool()
    gone.write(b"cut short")
    gone.discard()  # its association aborted meanwhile
    failed = gone.finish()  # does not raise on the receiving thread
    with pytest.raises(FileNotFoundError):
        failed.wait()  # the handler refuses the instance with the reason
    storage.close()
    engine.dispose()


def test_instance_rows_count_once_and_ride_out_a_lost_connection(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _series_with_one_instance(sessions, tmp_path, n=1)
    rows = InstanceRows(sessions.kw["bind"])

    def row(n: int) -> dict[str, object]:
        return _row(series_id, n, slice_thickness=1.25)

    second = row(2)
    assert rows.add(second) is True
    assert rows.add(row(1)) is False  # recorded by the storage above: neither row nor count changes
    # The connection dies under it (a database restart): the instance goes in on a new one.
    dead = rows._connection
    assert dead is not None
    dead.dbapi_connection.close()  # type: ignore[union-attr]
    assert rows.add(row(3)) is True
    assert rows._connection is not dead
    assert rows.add(row(4)) is True
    rows.close()
    with sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.instance_count == 4
        assert series.last_received_at >= second["received_at"]  # type: ignore[operator]
        stored = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        assert sorted(stored) == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3", "1.2.3.4.4"]
        assert stored["1.2.3.4.2"].received_at == second["received_at"]  # time zone kept, as the ORM reads it
        assert stored["1.2.3.4.2"].slice_thickness == 1.25


def test_rows_from_many_threads_go_together_and_each_is_counted_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _series_with_one_instance(sessions, tmp_path, n=0)
    rows = InstanceRows(sessions.kw["bind"])
    start = threading.Barrier(8)

    def add_rows(thread: int) -> list[bool]:
        start.wait()
        # every thread also adds rows the others add: 25 distinct in all
        return [rows.add(_row(series_id, n if n % 5 == 0 else 100 * thread + n)) for n in range(1, 26)]

    with ThreadPoolExecutor(8) as pool:
        added = [r for results in pool.map(add_rows, range(8)) for r in results]
    rows.close()
    distinct = 8 * 20 + 5  # 20 of each thread's own, 5 shared by all
    assert sum(added) == distinct  # each shared row added by exactly one thread
    assert rows.transactions < len(added)  # rows that waited went in one transaction together
    with sessions() as session:
        assert session.scalars(select(Series.instance_count)).one() == distinct + 1
        assert len(session.scalars(select(Instance.id)).all()) == distinct + 1


def test_a_row_the_database_refuses_fails_alone_in_its_group(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _series_with_one_instance(sessions, tmp_path, n=0)
    rows = InstanceRows(sessions.kw["bind"])

    def add(n: int, series: int) -> bool | Exception:
        try:
            return rows.add(_row(series, n))
        except RowNotRecordedError as err:
            return err

    with ThreadPoolExecutor(3) as pool:
        with rows._lock:  # held: the three rows queue up and go as one group
            results = [
                pool.submit(add, n, series) for n, series in ((1, series_id), (2, 999_999), (3, series_id))
            ]
            deadline = time.monotonic() + 10
            while len(rows._waiting) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(rows._waiting) == 3
    first, refused, third = (r.result(timeout=30) for r in results)
    assert first is True and third is True
    assert isinstance(refused, RowNotRecordedError)  # no such series: the foreign key refuses it
    rows.close()
    with pytest.raises(RowNotRecordedError, match="closed"):
        rows.add(_row(series_id, 4))
    with sessions() as session:
        assert session.scalars(select(Series.instance_count)).one() == 3
        stored = sorted(session.scalars(select(Instance.sop_instance_uid)))
        assert stored == ["1.2.3.4.0", "1.2.3.4.1", "1.2.3.4.3"]


def test_storage_refuses_hostile_uids_and_a_full_disk(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    with pytest.raises(InvalidUIDError, match="SeriesInstanceUID is not a valid DICOM UID"):
        storage.store([b"x"], facts(series="../../etc"), "CT01")
    full = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=1 << 62)
    with pytest.raises(StorageFullError):
        full.store([b"x"], facts(), "CT01")
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))
    assert not (tmp_path / "etc").exists()
    with sessions() as session:
        assert session.scalars(select(Instance)).all() == []


def test_assembly_waits_for_quiet_routes_and_explains_rejections(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, rules=[{"name": "ct", "min_slices": 3}])
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    for n in range(4):
        storage.store([b"ct"], facts(n=n), "CT01")
    storage.store(
        [b"sr"], facts(series="1.2.3.5", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11", modality="SR"), "CT01"
    )
    with sessions.begin() as session:
        assert assemble(session, settings, utcnow()) == []  # not quiet yet
    later = utcnow() + timedelta(seconds=2)
    with sessions.begin() as session:
        queued = assemble(session, settings, later)
    assert len(queued) == 1
    with sessions.begin() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        by_state = {j.state: j for j in jobs}
        assert by_state[JobState.RECEIVED].id == queued[0]
        assert by_state[JobState.RECEIVED].instance_count == 4
        rejected = by_state[JobState.REJECTED]
        assert "modality SR is not CT" in rejected.reason
        assert rejected.finished_at is not None
        assert assemble(session, settings, later) == []  # nothing new

    # The series grows after its job was made: a new job, and the history says why.
    storage.store([b"ct"], facts(n=9), "CT01")
    with sessions.begin() as session:
        again = assemble(session, settings, utcnow() + timedelta(seconds=2))
        assert len(again) == 1
        job = session.get_one(Job, again[0])
        assert job.instance_count == 5
        assert f"grew from 4 to 5 instances after job {queued[0]} was created" in job.events[0].message


def _queued_job(sessions: sessionmaker[Session], tmp_path: Path) -> int:
    settings = settings_for(tmp_path, rules=[{"name": "ct", "min_slices": 1}])
    Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0).store([b"ct"], facts(), "CT01")
    with sessions.begin() as session:
        (job_id,) = assemble(session, settings, utcnow() + timedelta(seconds=2))
    with sessions.begin() as session:
        assert mark_queued(session, job_id)
    return job_id


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def test_claim_is_atomic_and_a_second_delivery_does_nothing(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = _queued_job(sessions, tmp_path)
    first = JobRuns(sessions, "w@a/1", lease_s=60)
    claimed = first.claim(job_id)
    assert claimed is not None and claimed.rule == "ct" and len(claimed.inputs) == 1
    assert _job(sessions, job_id).attempts == 1
    assert JobRuns(sessions, "w@b/2", lease_s=60).claim(job_id) is None  # alive in w@a/1's hands
    with sessions.begin() as session:
        assert not mark_queued(session, job_id)
    assert first.claim(job_id) is not None  # its own retry after an error
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.worker, job.attempts) == ("w@a/1", 2)
        assert "again by the same worker after an error" in job.events[-1].message


def test_a_takeover_while_the_scheduler_takes_back_a_lapsed_job_is_not_undone(
    migrated_pg_template: str, tmp_path: Path
) -> None:
    """The scheduler's pass and a worker's takeover of the same lapsed job, interleaved on
    PostgreSQL: whichever commits first, the job ends either queued with no worker holding it or
    running in the hands of the worker that was told it holds it, never queued while a worker runs it."""
    url = peers.create_pg_database(template=migrated_pg_template)
    engine = db.make_engine(url)
    sessions = db.make_sessionmaker(engine)
    try:
        job_id = _queued_job(sessions, tmp_path)
        assert JobRuns(sessions, "w@a/1", lease_s=-1).claim(job_id) is not None  # lapsed at once
        other = JobRuns(sessions, "another@b/7", lease_s=60)
        with ThreadPoolExecutor(1) as pool, sessions() as scheduler:
            (lapsed,) = expired_leases(scheduler, utcnow())
            takeover = pool.submit(other.claim, job_id)
            with contextlib.suppress(TimeoutError):
                takeover.result(timeout=1)  # without the scheduler's lock it is done by now
            requeue(scheduler, lapsed, "its worker's lease lapsed")
            scheduler.commit()
            claimed = takeover.result()
        job = _job(sessions, job_id)
        if claimed is None:
            assert (job.state, job.worker) == (JobState.QUEUED, "")
        else:
            assert (job.state, job.worker) == (JobState.RUNNING, "another@b/7")
    finally:
        engine.dispose()
        peers.drop_pg_database(url)


def test_a_lapsed_lease_goes_to_any_other_worker_and_the_old_one_is_ignored(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = _queued_job(sessions, tmp_path)
    dead = JobRuns(sessions, "w@a/1", lease_s=-1)  # its lease has lapsed the moment it is taken
    assert dead.claim(job_id) is not None
    with sessions() as session:
        assert [j.id for j in expired_leases(session, utcnow())] == [job_id]
    other = JobRuns(sessions, "another@b/7", lease_s=60)
    assert other.claim(job_id) is not None
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.worker, job.attempts) == (JobState.RUNNING, "another@b/7", 2)
        assert "taken over from worker w@a/1, whose lease had expired" in job.events[-1].message
        assert expired_leases(session, utcnow()) == []
    assert other.renew(job_id)
    assert not dead.renew(job_id)
    assert not dead.segmented(job_id, tmp_path, ["seg"], "1.2.3", "late result", 1)  # discarded
    assert not dead.ended(job_id, JobState.FAILED, "late failure", 1)
    assert _job(sessions, job_id).state == JobState.RUNNING


def test_a_cancelled_job_stays_cancelled_whatever_its_worker_reports(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = _queued_job(sessions, tmp_path)
    runs = JobRuns(sessions, "w@a/1", lease_s=60)
    assert runs.claim(job_id) is not None
    with sessions.begin() as session:
        cancel(session, job_id, who="test")
    assert not runs.renew(job_id)
    assert not runs.segmented(job_id, tmp_path, ["seg"], "1.2.3", "done", 1)
    job = _job(sessions, job_id)
    assert (job.state, job.reason) == (JobState.CANCELLED, "cancelled by test")
    with sessions.begin() as session, pytest.raises(ValueError, match="CANCELLED already"):
        cancel(session, job_id, who="test")
    with sessions.begin() as session:
        assert retry(session, job_id, who="test").state == JobState.QUEUED


def test_retry_and_stale_detection(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    settings = settings_for(tmp_path, rules=[{"name": "ct", "min_slices": 1}])
    Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0).store([b"ct"], facts(), "CT01")
    with sessions.begin() as session:
        (job_id,) = assemble(session, settings, utcnow() + timedelta(seconds=2))
        mark_queued(session, job_id)
    with sessions.begin() as session:
        assert [j.id for j in stale_jobs(session, utcnow() + timedelta(seconds=1))] == [job_id]
        assert stale_jobs(session, utcnow() - timedelta(hours=1)) == []
        job = retry(session, job_id, who="test")
        assert job.state == JobState.QUEUED
    with sessions() as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
        assert [e.event for e in events] == ["created", "queued", "requeued"]
        assert events[-1].message == "retry requested by test"
        assert all(e.host for e in events)


def test_the_first_instance_after_the_server_dropped_every_connection_is_stored(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    # What a PostgreSQL restart does to the node's connections: the server ends every one.
    db.upgrade(fresh_pg_url)
    engine = db.make_engine(fresh_pg_url)
    storage = Storage(tmp_path / "store", engine, min_free_bytes=0)
    assert storage.store([b"ct"], facts(n=1), "CT01") == StoreOutcome.STORED
    assert peers.terminate_pg_connections(fresh_pg_url) >= 1
    assert storage.store([b"ct"], facts(n=2), "CT01") == StoreOutcome.STORED
    assert storage.store([b"ct"], facts(series="1.2.3.5", n=1), "CT01") == StoreOutcome.STORED
    storage.close()
    with db.make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count(Instance.id))) == 3
    engine.dispose()


def test_the_delivery_schedule_is_the_databases(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        rules=[{"name": "ct", "min_slices": 1, "destinations": ["pacs"]}],
    )
    Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0).store([b"ct"], facts(), "CT01")
    with sessions.begin() as session:
        (job_id,) = assemble(session, settings, utcnow() + timedelta(seconds=2))
    runs = JobRuns(sessions, "w@a/1", lease_s=60)
    assert runs.claim(job_id) is not None
    assert runs.segmented(job_id, tmp_path, ["seg"], "1.2.3", "1 segment", 1)

    def due(after_s: float = 0) -> dict[int, int]:
        with sessions() as session:
            return jobs_with_due_deliveries(session, utcnow() + timedelta(seconds=after_s))

    assert due() == {job_id: 0}  # the first attempt is due at once
    claimed = runs.claim_due_deliveries(job_id, hold_s=120)
    assert claimed is not None and [(d.destination, d.output) for d in claimed[1]] == [("pacs", "seg")]
    assert JobRuns(sessions, "w@b/2", lease_s=60).claim_due_deliveries(job_id, hold_s=120) == (claimed[0], [])
    assert due() == {} and due(after_s=121) == {job_id: 0}  # held for the attempt, due if it died
    delivery_id = claimed[1][0].delivery_id
    refused = DeliveryOutcome(delivered=False, permanent=False, answer="connection refused")
    runs.attempted(job_id, delivery_id, refused, max_attempts=3, backoff_s=lambda attempts: 60.0 * attempts)
    assert due() == {} and due(after_s=61) == {job_id: 1}  # the retry is due after its backoff
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.SEGMENTED
        assert "attempt 1: connection refused; next attempt in 60 s" in job.events[-1].message


def test_the_attempt_that_ends_a_jobs_deliveries_settles_the_job(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # A worker killed right after recording an attempt must not leave the job SEGMENTED with no
    # delivery pending, which nothing would ever pick up again: the attempt itself settles it.
    settings = settings_for(
        tmp_path,
        destinations={n: {"ae_title": n.upper(), "host": "127.0.0.1", "port": 104} for n in ("a", "b")},
        rules=[{"name": "ct", "min_slices": 1, "destinations": ["a", "b"]}],
    )
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    storage.store([b"ct"], facts(series="1.2.3.1"), "CT01")
    storage.store([b"ct"], facts(series="1.2.3.2"), "CT01")
    with sessions.begin() as session:
        job_ids = assemble(session, settings, utcnow() + timedelta(seconds=2))
    runs = JobRuns(sessions, "w@a/1", lease_s=60)
    outcomes = {
        "delivered": DeliveryOutcome(delivered=True, permanent=False, answer="0x0000"),
        "refused": DeliveryOutcome(delivered=False, permanent=True, answer="association rejected"),
    }
    states: dict[str, tuple[JobState, str]] = {}
    for job_id, last in zip(sorted(job_ids), outcomes, strict=True):
        assert runs.claim(job_id) is not None
        assert runs.segmented(job_id, tmp_path, ["seg"], f"1.2.3.{job_id}", "1 segment", 1)
        claimed = runs.claim_due_deliveries(job_id, hold_s=120)
        assert claimed is not None and len(claimed[1]) == 2
        first, second = claimed[1]
        runs.attempted(job_id, first.delivery_id, outcomes["delivered"], 3, lambda attempts: 60.0)
        with sessions() as session:
            assert session.get_one(Job, job_id).state == JobState.SEGMENTED  # "b" still pending
        runs.attempted(job_id, second.delivery_id, outcomes[last], 3, lambda attempts: 60.0)
        with sessions() as session:
            job = session.get_one(Job, job_id)
            states[last] = (job.state, job.reason)
    assert states["delivered"] == (JobState.DELIVERED, "")
    assert states["refused"][0] == JobState.FAILED
    assert "b did not accept the SEG after 1 attempt(s): association rejected" in states["refused"][1]


def test_a_series_released_whole_runs_at_once_and_a_batch_in_its_grace_runs_the_same_job_again(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path,
        quiet_period_s=600,
        release_grace_s=2,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        rules=[{"name": "ct", "min_slices": 1, "destinations": ["pacs"]}],
    )
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)

    def batch(positions: range, release: bool = True) -> None:
        for n in positions:
            axial = facts(n=n, orientation="1\\0\\0\\0\\1\\0", slice_position=float(n))
            storage.store([b"ct"], axial, "CT01")
        if release:
            storage.mark_released({"1.2.3.4"})

    def due(after_s: float = 0) -> dict[int, int]:
        with sessions() as session:
            return jobs_with_due_deliveries(session, utcnow() + timedelta(seconds=after_s))

    batch(range(3))
    with sessions.begin() as session:
        (job_id,) = assemble(session, settings, utcnow())  # at once, not after the grace
        job = session.get_one(Job, job_id)
        assert job.hold_until is not None and job.hold_until > utcnow() + timedelta(seconds=1)
        assert "its results held until its 2 s release grace has passed" in job.events[0].message
    runs = JobRuns(sessions, "w@a/1", lease_s=60)
    first = runs.claim(job_id)
    assert first is not None and len(first.inputs) == 3

    batch(range(3, 5))  # the sender's next batch, within the grace, while the job runs
    with sessions.begin() as session:
        assert assemble(session, settings, utcnow()) == []  # no new job: the run under way is stale
    assert not runs.segmented(job_id, tmp_path, ["seg"], "1.2.3", "3 instances", len(first.inputs))
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.instance_count) == (JobState.RECEIVED, 5)
        assert "grew from 3 to 5 instances while the results were held" in job.events[-2].message
        assert "ran with 3 of the series' 5 instances" in job.events[-1].message
    second = runs.claim(job_id)
    assert second is not None and len(second.inputs) == 5
    assert runs.segmented(job_id, tmp_path, ["seg"], "1.2.3", "5 instances", len(second.inputs))
    assert due() == {} and due(after_s=3) == {job_id: 0}  # held until the grace has passed

    batch(range(5, 6), release=False)  # more, on an association still open: nothing is sent
    assert due(after_s=3) == {}
    assert runs.claim_due_deliveries(job_id, hold_s=120) == (tmp_path, [])
    with sessions() as session:
        assert session.scalar(select(func.count(Job.id))) == 1


def test_a_study_released_whole_runs_its_jobs_at_once_held_until_the_last_grace_ends(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path,
        quiet_period_s=600,
        release_grace_s=2,
        rules=[{"name": "study", "min_slices": 1, "complete_by": "study"}],
    )
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    for series in ("1.2.3.1", "1.2.3.2"):
        for n in range(3):
            axial = facts(series=series, n=n, orientation="1\\0\\0\\0\\1\\0", slice_position=float(n))
            storage.store([b"ct"], axial, "CT01")
        storage.mark_released({series})  # the second series' sender releases a moment later
    with sessions.begin() as session:
        job_ids = assemble(session, settings, utcnow())
        jobs = [session.get_one(Job, job_id) for job_id in job_ids]
        released = max(s.released_at for s in session.scalars(select(Series)) if s.released_at is not None)
        assert len(jobs) == 2
        assert {job.hold_until for job in jobs} == {released + timedelta(seconds=2)}
        assert all("every series of its study is complete" in job.events[0].message for job in jobs)


def test_answers_of_a_new_destination_at_once_keep_one_row_and_report_it_back_once(
    sessions: sessionmaker[Session],
) -> None:
    """Workers delivering to a destination nobody has heard from yet all record their answer, and of
    several answers that bring it back up together, one queues the webhook message."""
    start = threading.Barrier(6)

    def answer(ok: bool) -> None:
        with sessions() as session:
            start.wait()
            destination_answered(session, "pacs", ok, "PACS@10.0.0.1:104: no answer" if not ok else "0x0000")
            session.commit()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(answer, [False] * 6))
    with sessions() as session:
        row = session.scalars(select(DestinationStatus)).one()
        assert (row.name, row.ok, row.down_since is not None) == ("pacs", False, True)
        row.down_notified = True
        session.commit()
    start.reset()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(answer, [True] * 6))
    with sessions() as session:
        messages = session.scalars(select(Notification.event)).all()
        assert messages == ["destination_up"]
        assert session.scalars(select(DestinationStatus.ok)).one() is True


def test_two_admins_suspending_at_once_both_get_an_answer(sessions: sessionmaker[Session]) -> None:
    start = threading.Barrier(4)

    def click(who: str) -> bool:
        with sessions() as session:
            start.wait()
            added = suspend(session, PROCESSING, who)
            session.commit()
            return added

    with ThreadPoolExecutor(4) as pool:
        added = list(pool.map(click, ["ada", "bob", "cy", "dee"]))
    assert sorted(added) == [False, False, False, True]
    with sessions() as session:
        assert session.scalars(select(Suspension.by)).one() == ["ada", "bob", "cy", "dee"][added.index(True)]


def _job_of_stored_series(sessions: sessionmaker[Session], settings: Settings, tmp_path: Path) -> int:
    """A job for a three-slice CT series the storage took, ready for a worker."""
    storage = Storage(settings.storage_dir, sessions.kw["bind"], min_free_bytes=0)
    for path in make_ct_series(tmp_path / "ct", n_slices=3):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        storage.store([path.read_bytes()], instance_facts(ds, ds.file_meta.TransferSyntaxUID), "CT01")
    storage.close()
    with sessions.begin() as session:
        (job_id,) = assemble(session, settings, utcnow() + timedelta(seconds=2))
    return job_id


class _Failing:
    """A segmenter with a bug whose exception quotes the data it choked on."""

    structures = ClassicalSegmenter().structures
    algorithm = ClassicalSegmenter().algorithm

    def predict(self, volume: object) -> object:
        name = "^".join(("Doe", "Jane"))  # as data reaches it: not in the source a traceback shows
        raise ValueError(f"cannot handle PatientName {name!r}")


def test_a_workers_internal_error_fails_the_job_without_the_exceptions_words(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The job's reason goes to the dashboard and to webhooks, the log to whoever runs the worker;
    the exception's text may quote patient data, so neither repeats it: the log says where."""
    settings = settings_for(tmp_path, rules=[{"name": "ct", "min_slices": 1}])
    job_id = _job_of_stored_series(sessions, settings, tmp_path)
    ctx = WorkerContext(
        settings=settings,
        sessions=sessions,
        queue=JobQueue(make_celery(settings), settings),
        segmenters={"classical": _Failing()},  # type: ignore[dict-item]
    )
    assert run_process_job(ctx, job_id, "w@a/1") is False
    job = _job(sessions, job_id)
    assert job.state == JobState.FAILED
    assert job.reason == "internal error in the worker (ValueError); the worker's log says where"
    assert "in predict" in caplog.text and "Doe^Jane" not in caplog.text  # where, not the words


class _CancelledWhileSegmenting:
    """Its job is cancelled while it segments; it returns once the worker's lease keeper saw that."""

    structures = ClassicalSegmenter().structures
    algorithm = ClassicalSegmenter().algorithm

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def predict(self, volume: Volume) -> np.ndarray:
        with self.sessions.begin() as session:
            (job_id,) = session.scalars(select(Job.id)).all()
            cancel(session, job_id, "admin")
        keeper = f"segnode-renew-job {job_id}"  # the thread of workers.lease.renewed: it ends on a loss
        assert eventually(lambda: all(t.name != keeper for t in threading.enumerate()), timeout=60)
        return np.zeros(volume.hu.shape, np.uint8)


def test_a_worker_whose_job_is_cancelled_while_it_segments_writes_nothing(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker stops at its next step once its lease keeper sees the job is no longer its own:
    no outputs written for a job nobody wants (nor over those of the worker that took it over)."""
    settings = settings_for(tmp_path, rules=[{"name": "ct", "min_slices": 1}], worker={"lease_s": 1})
    job_id = _job_of_stored_series(sessions, settings, tmp_path)
    ctx = WorkerContext(
        settings=settings,
        sessions=sessions,
        queue=JobQueue(make_celery(settings), settings),
        segmenters={"classical": _CancelledWhileSegmenting(sessions)},
    )
    caplog.set_level("INFO", logger="workers.tasks")
    assert run_process_job(ctx, job_id, "w@a/1") is False
    job = _job(sessions, job_id)
    assert job.state == JobState.CANCELLED
    assert not (settings.output_dir / f"job-{job_id}").exists()
    assert f"job {job_id}: no longer this worker's; stopped" in caplog.text


def test_copies_of_one_instance_stored_at_once_keep_the_first_file_with_its_row(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Two associations (or two parts of one STOW-RS request) bringing the same instance at once:
    one is stored, the others are duplicates, and the file on disk is the one its row describes."""
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    copies = 6
    start = threading.Barrier(copies)

    def bring(copy: int, n: int) -> StoreOutcome:
        start.wait()
        syntax = f"1.2.840.10008.1.2.{copy + 1}"
        return storage.store([f"copy {copy}".encode()], facts(n=n, transfer_syntax_uid=syntax), "CT01")

    for n in range(10):
        with ThreadPoolExecutor(copies) as pool:
            outcomes = list(pool.map(bring, range(copies), [n] * copies))
        assert outcomes.count(StoreOutcome.DUPLICATE) == copies - 1
        with sessions() as session:
            uid = f"1.2.3.4.{n}"
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        kept = int(row.transfer_syntax_uid.rsplit(".", 1)[1]) - 1
        assert (tmp_path / "store" / row.path).read_bytes() == f"copy {kept}".encode()
    storage.close()


def test_only_the_latest_job_of_a_grown_series_runs_or_sends_again(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A job made before its series grew covers part of it; run or sent again it would wait for
    ever behind the newer instances. The admin is told which job covers the series now; a re-run
    takes the series as it is; a running job is not run twice."""
    settings = settings_for(
        tmp_path,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        rules=[{"name": "ct", "min_slices": 1, "destinations": ["pacs"]}],
    )
    storage = Storage(tmp_path / "store", sessions.kw["bind"], min_free_bytes=0)
    storage.store([b"ct"], facts(n=1), "CT01")
    with sessions.begin() as session:
        (old,) = assemble(session, settings, utcnow() + timedelta(seconds=2))
    runs = JobRuns(sessions, "w@a/1", lease_s=60)
    assert runs.claim(old) is not None
    with sessions.begin() as session, pytest.raises(ValueError, match="is running on w@a/1; cancel it first"):
        retry(session, old, who="ada")
    assert runs.segmented(old, tmp_path, ["seg"], "1.2.3", "1 segment", 1)
    (claimed,) = runs.claim_due_deliveries(old, hold_s=60)[1]  # type: ignore[index]
    refused = DeliveryOutcome(delivered=False, permanent=True, answer="refused")
    runs.attempted(old, claimed.delivery_id, refused, max_attempts=3, backoff_s=lambda attempts: 1.0)
    assert _job(sessions, old).state == JobState.FAILED
    storage.store([b"ct"], facts(n=2), "CT01")  # the series grows: a new job covers both
    with sessions.begin() as session:
        (new,) = assemble(session, settings, utcnow() + timedelta(seconds=2))
    for action in (lambda s: retry(s, old, who="ada"), lambda s: resend(s, old, who="ada")):
        with sessions.begin() as session, pytest.raises(ValueError, match=f"job {new} covers the series"):
            action(session)
    with sessions.begin() as session:
        cancel(session, new, who="ada")
    with sessions.begin() as session:
        again = rerun(session, old, "classical", who="ada")
        assert again.instance_count == 2
    storage.close()
