"""The scheduler against a real broker: a job waits while Redis is unreachable, then goes out once."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import redis
from sqlalchemy import select

from node.core.config import load_settings
from node.core.queue import SEGMENT_CPU, JobQueue, make_celery
from node.db import engine as db
from node.db.engine import session_scope
from node.db.job_runs import JobRuns
from node.db.models import Job, JobEvent, JobState, utcnow
from node.jobs.assembly import assemble
from node.jobs.scheduler import Scheduler
from node.receive.storage import InstanceFacts, Storage
from tests import peers


def test_job_waits_for_an_unreachable_broker_then_is_queued_once(tmp_path: Path, redis_url: str) -> None:
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.make_sessionmaker(engine)
    facts = InstanceFacts(
        "1.2.3", "1.2.3.4", "1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "CT"
    )
    storage = Storage(tmp_path / "store", engine, 0)
    storage.store([b"ct"], facts, "CT01")
    storage.close()

    down = load_settings(
        None,
        data_dir=str(tmp_path),
        quiet_period_s=0.01,
        rules=[{"name": "ct", "min_slices": 1}],
        worker={"broker_url": f"redis://127.0.0.1:{peers.free_port()}/0"},
    )
    dead_app = make_celery(down)
    dead_app.conf.broker_connection_timeout = 1
    dead_app.conf.broker_transport_options = {"max_retries": 1}
    time.sleep(5 * down.quiet_period_s)  # the series is quiet, however fast the lines above ran
    Scheduler(down, sessions, JobQueue(dead_app, down)).tick()
    with sessions() as session:
        (job,) = session.scalars(select(Job)).all()
        assert job.state == JobState.RECEIVED

    up = down.model_copy(update={"worker": down.worker.model_copy(update={"broker_url": redis_url})})
    scheduler = Scheduler(up, sessions, JobQueue(make_celery(up), up))
    scheduler.tick()
    scheduler.tick()
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state == JobState.QUEUED
        events = [e.event for e in session.scalars(select(JobEvent).order_by(JobEvent.id))]
        assert events == ["created", "queued"]
        assert utcnow() - job.created_at < timedelta(minutes=1)
    assert redis.Redis.from_url(redis_url).llen(SEGMENT_CPU) == 1
    engine.dispose()


def test_a_lapsed_job_taken_back_while_the_broker_is_away_is_sent_once_it_works(
    tmp_path: Path, redis_url: str
) -> None:
    url = f"sqlite:///{tmp_path / 'segnode.sqlite'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.make_sessionmaker(engine)
    storage = Storage(tmp_path / "store", engine, 0)
    storage.store(
        [b"ct"],
        InstanceFacts(
            "1.2.3", "1.2.3.4", "1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "CT"
        ),
        "CT01",
    )
    storage.close()
    down = load_settings(
        None,
        data_dir=str(tmp_path),
        rules=[{"name": "ct", "min_slices": 1}],
        worker={"broker_url": f"redis://127.0.0.1:{peers.free_port()}/0"},
    )
    with session_scope(sessions) as session:
        (job_id,) = assemble(session, down, utcnow() + timedelta(seconds=60))
    assert JobRuns(sessions, "dead@w/1", lease_s=-1).claim(job_id) is not None  # lapsed at once
    dead_app = make_celery(down)
    dead_app.conf.broker_connection_timeout = 1
    dead_app.conf.broker_transport_options = {"max_retries": 1}
    Scheduler(down, sessions, JobQueue(dead_app, down)).tick()  # takes it back; cannot send it
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.worker) == (JobState.RECEIVED, "")
        assert "stopped renewing its lease" in job.events[-1].message
    up = down.model_copy(update={"worker": down.worker.model_copy(update={"broker_url": redis_url})})
    Scheduler(up, sessions, JobQueue(make_celery(up), up)).tick()
    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.QUEUED
    assert redis.Redis.from_url(redis_url).llen(SEGMENT_CPU) == 1
    engine.dispose()
