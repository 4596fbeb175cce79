"""What the dashboard's charts and queue panels read, on a real (SQLite) database with jobs at
known times."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from node.api import metrics, views
from node.core.config import Settings
from node.db import engine as db
from node.db.models import Delivery, DeliveryState, Job, JobState, Series, Study, utcnow


def test_charts_count_finished_jobs_by_hour_and_day_with_the_median_wait(
    sessions_on_both: sessionmaker[Session],
) -> None:
    """Counted and the medians found by the database: on both the node runs on."""
    sessions = sessions_on_both
    now = utcnow()
    finished = [  # (hours ago, state, seconds from last instance to the end)
        (0.5, JobState.DELIVERED, 4.0),
        (0.6, JobState.DELIVERED, 6.0),
        (0.7, JobState.DELIVERED, 20.0),
        (0.8, JobState.FAILED, 3.0),
        (5.5, JobState.REJECTED, 1.0),
        (30.0, JobState.DELIVERED, 10.0),  # yesterday: in the days, not in the hours
        (30.5, JobState.DELIVERED, 14.0),  # two waits: their median is the mean of both
        (24 * 20, JobState.DELIVERED, 1.0),  # older than the charts
        (0.2, JobState.SUPERSEDED, 1.0),  # not finished work
    ]
    with db.session_scope(sessions) as session:
        study = Study(study_instance_uid="1.2.3")
        session.add(study)
        for i, (hours_ago, state, wait_s) in enumerate(finished):
            end = now - timedelta(hours=hours_ago)
            series = Series(
                study=study,
                series_instance_uid=f"1.2.3.{i}",
                last_received_at=end - timedelta(seconds=wait_s),
            )
            session.add(series)
            session.add(Job(series=series, state=state, finished_at=end, created_at=end))
    with sessions() as session:
        found = views.charts(session, now)
    last_hour, five_hours_ago = found["hours"]["points"][-1], found["hours"]["points"][-6]
    assert (last_hour["delivered"], last_hour["failed"]) == (3, 1)
    assert last_hour["median_wait_s"] == pytest.approx(6.0, abs=0.01)  # SQLite: julianday doubles
    assert (five_hours_ago["delivered"], five_hours_ago["failed"]) == (0, 1)
    assert sum(p["delivered"] for p in found["hours"]["points"]) == 3
    today, yesterday = found["days"]["points"][-1], found["days"]["points"][-2]
    assert (today["delivered"], today["failed"]) == (3, 2)
    assert yesterday["delivered"] == 2 and yesterday["median_wait_s"] == pytest.approx(12.0, abs=0.01)
    assert sum(p["delivered"] + p["failed"] for p in found["days"]["points"]) == 7
    assert found["hours"]["most"] == 4 and found["days"]["longest"] == pytest.approx(12.0, abs=0.01)
    assert [p["median_wait_s"] for p in found["hours"]["points"][:-1]] == [None] * 23


def test_the_queue_puts_failures_first_and_the_oldest_waiting_first(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with db.session_scope(sessions) as session:
        study = Study(study_instance_uid="1.2.3")
        states = [JobState.QUEUED, JobState.FAILED, JobState.RECEIVED, JobState.DELIVERED, JobState.FAILED]
        for i, state in enumerate(states):
            series = Series(study=study, series_instance_uid=f"1.2.3.{i}")
            finished = now if state in (JobState.FAILED, JobState.DELIVERED) else None
            session.add(Job(series=series, state=state, finished_at=finished, reason=f"job {i + 1}"))
    with sessions() as session:
        queue = views.queue_overview(session, Settings(), now)
    assert [j["id"] for j in queue["attention"]] == [5, 2]  # newest failure first
    assert [j["id"] for j in queue["in_progress"]] == [1, 3]  # oldest waiting first
    assert [j["id"] for j in queue["finished"]] == [4]
    assert queue["counts"]["FAILED"] == 2 and queue["counts"]["RUNNING"] == 0
    assert queue["processing"] == {"suspended": False, "by": None, "since": None}


def test_the_queue_depth_metric_counts_each_queue_apart(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """GPU workers scale on their own queue: waiting jobs by their segmenter's queue, running ones
    not at all, pending deliveries of segmented jobs on the delivery queue."""
    settings = Settings(data_dir=tmp_path, segmenters={"unet": {"checkpoint": "model.pt"}})
    waiting = [("unet", JobState.RECEIVED), ("unet", JobState.QUEUED), ("unet", JobState.RUNNING)]
    waiting += [("classical", JobState.QUEUED), ("classical", JobState.SEGMENTED)]
    with db.session_scope(sessions) as session:
        study = Study(study_instance_uid="1.2.3")
        for i, (segmenter, state) in enumerate(waiting):
            series = Series(study=study, series_instance_uid=f"1.2.3.{i}", last_received_at=utcnow())
            job = Job(series=series, state=state, segmenter=segmenter)
            session.add(job)
            if state == JobState.SEGMENTED:
                session.add(Delivery(job=job, output="seg", destination="pacs", state=DeliveryState.PENDING))
    text = generate_latest(metrics.registry(sessions, settings)).decode()
    depth = {
        sample.labels["queue"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "segnode_queue_depth"
        for sample in family.samples
    }
    assert depth == {"segment-gpu": 2, "segment-cpu": 1, "deliver": 1}
