"""What the API and the dashboard show, read from the database as plain dictionaries: the JSON
routes return them and the dashboard's templates render them, so both always agree."""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Float, Integer, Row, Select, case, cast, func, select
from sqlalchemy.orm import Session

from node.core.config import DicomDestination, Settings
from node.core.identifiers import read_identifiers
from node.core.queue import DELIVER, QUEUES, broker_depth, segment_queue
from node.db.models import (
    TERMINAL_STATES,
    Delivery,
    DeliveryState,
    DestinationStatus,
    Instance,
    Job,
    JobEvent,
    JobState,
    Series,
    Study,
    WorkerBeat,
    utcnow,
)
from node.db.operations import PROCESSING, delivery_target, live_workers, suspensions
from node.jobs.assembly import series_facts
from node.jobs.routing import why_not

WAITING = (JobState.RECEIVED, JobState.QUEUED)
ATTENTION = (JobState.FAILED, JobState.REJECTED)
# A worker silent for this many heartbeats is gone.
MISSED_BEATS = 3


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def jobs_query() -> Select[Job, Series, Study]:
    return (
        select(Job, Series, Study)
        .join(Series, Job.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
    )


def job_row(row: Row[Job, Series, Study]) -> dict[str, Any]:
    job, series, study = row
    return {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "segmenter": job.segmenter,
        "rule": job.rule,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "series_description": series.series_description,
        "calling_ae": series.calling_ae,
        "instance_count": job.instance_count,
        "attempts": job.attempts,
        "worker": job.worker,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "hold_until": iso(job.hold_until),
    }


def job_detail(session: Session, settings: Settings, job_id: int) -> dict[str, Any] | None:
    """One job with its event history (oldest first), its deliveries, and the patient and study
    as the series' first file names them (only logged-in users ever get here); None if none."""
    found = session.execute(jobs_query().where(Job.id == job_id)).first()
    if found is None:
        return None
    job = found[0]
    first = session.scalar(
        select(Instance.path).where(Instance.series_id == job.series_id).order_by(Instance.id).limit(1)
    )
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    return {
        **job_row(found),
        "outputs": list(job.outputs),
        "destinations": list(job.destinations),
        "has_results": bool(job.output_sop_instance_uid),
        "patient": read_identifiers(settings.storage_dir / first) if first else {},
        "events": [
            {"at": iso(e.at), "event": e.event, "state": e.state.value, "host": e.host, "message": e.message}
            for e in events
        ],
        "deliveries": [
            {
                "destination": d.destination,
                "output": d.output,
                "state": d.state.value,
                "attempts": d.attempts,
                "last_status": d.last_status,
                "delivered_at": iso(d.delivered_at),
                "next_attempt_at": iso(d.next_attempt_at),
            }
            for d in job.deliveries
        ],
    }


def state_counts(session: Session) -> dict[str, int]:
    found = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
    return {state.value: int(found.get(state, 0)) for state in JobState}


def queue_overview(session: Session, settings: Settings, now: datetime, limit: int = 25) -> dict[str, Any]:
    """The dashboard's live queue: counts, what needs a person (failures first), what waits
    (oldest first), what runs, what finished last; with processing's suspension if any."""
    since = now - timedelta(days=1)
    attention = session.execute(
        jobs_query()
        .where(Job.state.in_(ATTENTION), Job.finished_at >= since)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    waiting = session.execute(
        jobs_query()
        .where(Job.state.in_((*WAITING, JobState.RUNNING, JobState.SEGMENTED)))
        .order_by(Job.id)
        .limit(limit)
    ).all()
    finished = session.execute(
        jobs_query()
        .where(Job.state.in_(TERMINAL_STATES - set(ATTENTION)))
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(limit)
    ).all()
    suspension = suspensions(session).get(PROCESSING)
    return {
        "counts": state_counts(session),
        "attention": [job_row(row) for row in attention],
        "in_progress": [job_row(row) for row in waiting],
        "finished": [job_row(row) for row in finished],
        "processing": {
            "suspended": suspension is not None,
            "by": suspension.by if suspension else None,
            "since": iso(suspension.since) if suspension else None,
        },
        "at": iso(now),
    }


def workers(session: Session, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    """Workers seen in the last day: live or gone, what each runs now, how many jobs it finished in
    the last day."""
    live_after = now - timedelta(seconds=MISSED_BEATS * settings.worker.heartbeat_s)
    rows = session.scalars(
        select(WorkerBeat).where(WorkerBeat.last_seen_at >= now - timedelta(days=1)).order_by(WorkerBeat.name)
    ).all()
    # Two queries whatever the number of workers, each on an index (state, finished_at): a job's
    # worker is "NAME/PID", so both are grouped by name here.
    day_ago = now - timedelta(days=1)
    running: dict[str, list[int]] = {}
    for job_id, worker in session.execute(select(Job.id, Job.worker).where(Job.state == JobState.RUNNING)):
        running.setdefault(worker.rpartition("/")[0], []).append(job_id)
    done: Counter[str] = Counter()
    for worker, count in session.execute(
        select(Job.worker, func.count(Job.id))
        .where((Job.finished_at >= day_ago) | (Job.state == JobState.SEGMENTED), Job.worker != "")
        .group_by(Job.worker)
    ):
        done[worker.rpartition("/")[0]] += count
    found = []
    for beat in rows:
        current, jobs_done = sorted(running.get(beat.name, [])), done[beat.name]
        live = beat.stopped_at is None and beat.last_seen_at >= live_after
        found.append(
            {
                "name": beat.name,
                "host": beat.host,
                "pid": beat.pid,
                "gpu": beat.gpu or None,
                "concurrency": beat.concurrency,
                "online": live,
                "state": "online" if live else ("stopped" if beat.stopped_at else "silent"),
                "started_at": iso(beat.started_at),
                "last_seen_at": iso(beat.last_seen_at),
                "current_jobs": current,
                "jobs_done_24h": jobs_done,
            }
        )
    return found


def destinations(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """Every configured destination: address, suspension, last answer, what waits for it."""
    paused = suspensions(session)
    status = {s.name: s for s in session.scalars(select(DestinationStatus))}
    counts = Counter(
        {
            (name, state): n
            for name, state, n in session.execute(
                select(Delivery.destination, Delivery.state, func.count(Delivery.id))
                .join(Job, Job.id == Delivery.job_id)
                .where(Delivery.state != DeliveryState.DELIVERED)
                .where(Job.state.in_((JobState.SEGMENTED, JobState.FAILED)))
                .group_by(Delivery.destination, Delivery.state)
            )
        }
    )
    found = []
    for name, dest in settings.destinations.items():
        suspension = paused.get(delivery_target(name))
        last = status.get(name)
        found.append(
            {
                "name": name,
                "kind": dest.kind,
                "address": dest.address,
                "tls": dest.tls is not None
                if isinstance(dest, DicomDestination)
                else dest.url.startswith("https"),
                "suspended": suspension is not None,
                "suspended_by": suspension.by if suspension else None,
                "suspended_since": iso(suspension.since) if suspension else None,
                "state": _destination_state(suspension is not None, last),
                "last_answer": last.answer if last else None,
                "last_checked_at": iso(last.checked_at) if last else None,
                "down_since": iso(last.down_since) if last else None,
                "pending": counts[(name, DeliveryState.PENDING)],
                "failed": counts[(name, DeliveryState.FAILED)],
            }
        )
    return found


def _destination_state(suspended: bool, last: DestinationStatus | None) -> str:
    if suspended:
        return "suspended"
    if last is None:
        return "unknown"
    return "up" if last.ok else "down"


def database_depths(session: Session, settings: Settings) -> dict[str, dict[str, int]]:
    """Each queue's work as the database counts it (the truth): jobs waiting for a worker
    (received or queued) and running, by the queue of their segmenter; deliveries pending on the
    delivery queue."""
    by_queue = {name: Counter[str]() for name in QUEUES}
    for segmenter, state, count in session.execute(
        select(Job.segmenter, Job.state, func.count(Job.id))
        .where(Job.state.in_((*WAITING, JobState.RUNNING)))
        .group_by(Job.segmenter, Job.state)
    ):
        by_queue[segment_queue(settings, segmenter)][state.value] += count
    deliveries = session.scalar(
        select(func.count(Delivery.id))
        .join(Job, Job.id == Delivery.job_id)
        .where(Job.state == JobState.SEGMENTED, Delivery.state == DeliveryState.PENDING)
    )
    return {
        name: {
            "waiting_jobs": counted[JobState.RECEIVED.value] + counted[JobState.QUEUED.value],
            "running": counted[JobState.RUNNING.value],
            "deliveries_pending": int(deliveries or 0) if name == DELIVER else 0,
        }
        for name, counted in by_queue.items()
    }


def queues(session: Session, settings: Settings, celery: Celery) -> list[dict[str, Any]]:
    """Each queue's depth as the database counts it and as the broker holds it."""
    at_broker = broker_depth(celery)
    return [
        {"name": name, **counted, "broker_messages": at_broker[name]}
        for name, counted in database_depths(session, settings).items()
    ]


def series_detail(session: Session, settings: Settings, uid: str) -> dict[str, Any] | None:
    """A stored series: its facts, which rule takes it and why each other declines (the rule
    tester), and its jobs."""
    series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
    if series is None:
        return None
    facts = series_facts(session, series)
    verdicts = []
    taken_by = None
    for rule in settings.rules:
        problem = why_not(rule, facts)
        if problem is None and taken_by is None:
            taken_by = rule.name
            verdict = "takes it"
        elif problem is None:
            verdict = f"would take it, but rule {taken_by!r} comes first"
        else:
            verdict = f"declines: {problem}"
        verdicts.append({"rule": rule.name, "matches": problem is None, "verdict": verdict})
    jobs = session.execute(jobs_query().where(Job.series_id == series.id).order_by(Job.id)).all()
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study.study_instance_uid,
        "modality": series.modality,
        "series_description": series.series_description,
        "body_part": series.body_part,
        "calling_ae": series.calling_ae,
        "instance_count": series.instance_count,
        "first_received_at": iso(series.first_received_at),
        "last_received_at": iso(series.last_received_at),
        "waiting_for_completion": series.instance_count > series.assembled_count,
        "facts": {
            "sop_classes": sorted(facts.sop_class_uids),
            "image_types": sorted(facts.image_types),
            "slice_thickness_mm": statistics.median(facts.slice_thicknesses)
            if facts.slice_thicknesses
            else None,
        },
        "routing": {"taken_by": taken_by, "rules": verdicts},
        "jobs": [job_row(row) for row in jobs],
    }


def studies(session: Session, cursor: int | None, limit: int) -> dict[str, Any]:
    query = select(Study).order_by(Study.id.desc()).limit(limit + 1)
    if cursor is not None:
        query = query.where(Study.id < cursor)
    rows = session.scalars(query).all()
    items = [
        {
            "id": study.id,
            "study_instance_uid": study.study_instance_uid,
            "created_at": iso(study.created_at),
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "modality": s.modality,
                    "series_description": s.series_description,
                    "instance_count": s.instance_count,
                    "calling_ae": s.calling_ae,
                }
                for s in study.series
            ],
        }
        for study in rows[:limit]
    ]
    return {"items": items, "next_cursor": items[-1]["id"] if len(rows) > limit else None}


CHART_SCALES = {"hours": (timedelta(hours=1), 24), "days": (timedelta(days=1), 14)}


def charts(session: Session, now: datetime) -> dict[str, Any]:
    """Jobs finished and the median wait from last instance to result delivered (a DELIVERED job
    finishes with its last delivery), per hour for the last day and per day for two weeks."""
    return {name: _chart(session, now, step, count) for name, (step, count) in CHART_SCALES.items()}


def _chart(session: Session, now: datetime, step: timedelta, count: int) -> dict[str, Any]:
    """One scale's points, counted and their medians found by the database: at 100,000 jobs,
    sending two weeks of rows to Python cost more than the queries (benchmarks/RESULTS.md)."""
    start = now - step * count
    wait = _seconds(session, Job.finished_at, Series.last_received_at)
    rows = (
        select(
            _floor(session, _seconds(session, Job.finished_at, start) / step.total_seconds()).label("bucket"),
            case((wait < 0, 0.0), else_=wait).label("wait"),
            (Job.state == JobState.DELIVERED).label("delivered"),
            Job.state.in_(ATTENTION).label("failed"),
        )
        .join(Series, Series.id == Job.series_id)
        .where(Job.finished_at >= start, Job.state.in_(TERMINAL_STATES - {JobState.SUPERSEDED}))
        .subquery()
    )
    # One pass: each bucket's counts, and the median of its delivered jobs' waits (the middle
    # row, or the mean of the middle two, among them).
    ranked = select(
        rows,
        func.row_number()
        .over(partition_by=(rows.c.bucket, rows.c.delivered), order_by=rows.c.wait)
        .label("rank"),
        func.count().over(partition_by=(rows.c.bucket, rows.c.delivered)).label("n"),
    ).subquery()
    middle = ranked.c.delivered & ranked.c.rank.between((ranked.c.n + 1) // 2, (ranked.c.n + 2) // 2)
    delivered, failed = dict.fromkeys(range(count), 0), dict.fromkeys(range(count), 0)
    medians: dict[int, float | None] = dict.fromkeys(range(count))
    for bucket, n_delivered, n_failed, median in session.execute(
        select(
            ranked.c.bucket,
            func.sum(case((ranked.c.delivered, 1), else_=0)),
            func.sum(case((ranked.c.failed, 1), else_=0)),
            func.avg(case((middle, ranked.c.wait))),
        ).group_by(ranked.c.bucket)
    ):
        if bucket in delivered:  # a clock ahead of ``now`` puts a job past the last point
            delivered[bucket], failed[bucket] = int(n_delivered), int(n_failed)
            medians[bucket] = None if median is None else float(median)
    return {
        "points": [
            {
                "start": iso(start + step * i),
                "delivered": delivered[i],
                "failed": failed[i],
                "median_wait_s": medians[i],
            }
            for i in range(count)
        ],
        "most": max(delivered[i] + failed[i] for i in range(count)),
        "longest": max((m for m in medians.values() if m is not None), default=0.0),
    }


def _floor(session: Session, value: Any) -> Any:
    """The integer below ``value``, which is never negative here: SQLite's CAST truncates, which
    is the floor of a positive number, where PostgreSQL's rounds."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(value, Integer)
    return cast(func.floor(value), Integer)


def _seconds(session: Session, later: Any, earlier: Any) -> Any:
    """Seconds from ``earlier`` to ``later`` (timestamps), in the session's database's own terms:
    one conversion a row, which at 100,000 jobs is most of what the charts cost."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return cast(func.extract("epoch", later - earlier), Float)  # a float, not a Decimal per row


def live(session: Session, settings: Settings) -> list[WorkerBeat]:
    """Workers with a live heartbeat (what /readyz needs one of)."""
    return live_workers(session, utcnow(), MISSED_BEATS * settings.worker.heartbeat_s)
