"""The one place where a job changes state.

Every change writes a :class:`JobEvent` in the same transaction, so the event log is the job's
complete history: who did what, on which host, and why.
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.db.models import (
    TERMINAL_STATES,
    Delivery,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
    Series,
    Study,
    utcnow,
)
from node.db.operations import notify

HOST = socket.gethostname()


class JobNotFoundError(LookupError):
    pass


def record_event(session: Session, job: Job, event: str, message: str = "", host: str | None = None) -> None:
    """Append an event in the job's current state (used for steps that change no state)."""
    job.updated_at = utcnow()
    session.add(JobEvent(job_id=job.id, event=event, state=job.state, host=host or HOST, message=message))


def transition(
    session: Session,
    job: Job,
    state: JobState,
    event: str,
    message: str = "",
    *,
    reason: str | None = None,
) -> None:
    """Move ``job`` to ``state`` and log it; ``reason`` (for FAILED / REJECTED) is what the admin reads."""
    now = utcnow()
    job.state = state
    job.updated_at = now
    if reason is not None:
        job.reason = reason
    if state in TERMINAL_STATES:
        job.finished_at = now
    session.add(
        JobEvent(job_id=job.id, event=event, state=state, host=HOST, message=message or (reason or ""))
    )
    if state in (JobState.FAILED, JobState.REJECTED):
        notify(
            session,
            f"job_{state.value.lower()}",
            {
                "job": job.id,
                "state": state.value,
                "reason": job.reason,
                "rule": job.rule,
                "segmenter": job.segmenter,
                "series_instance_uid": job.series.series_instance_uid,
            },
        )


def create_job(
    session: Session,
    series: Series,
    *,
    rule: str | None,
    segmenter: str | None,
    destinations: list[str],
    state: JobState,
    message: str,
    reason: str = "",
    outputs: list[str] | None = None,
) -> Job:
    """A new job for ``series`` as it is now, with its first event."""
    job = Job(
        series_id=series.id,
        rule=rule,
        segmenter=segmenter,
        destinations=list(destinations),
        outputs=list(outputs or ["seg"]),
        state=state,
        reason=reason,
        instance_count=series.instance_count,
    )
    session.add(job)
    session.flush()
    if state in TERMINAL_STATES:
        job.finished_at = job.created_at
    session.add(JobEvent(job_id=job.id, event="created", state=state, host=HOST, message=message))
    return job


def mark_queued(session: Session, job_id: int) -> bool:
    """RECEIVED -> QUEUED once the task is on the broker; False if a worker already took it."""
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.RECEIVED:
        return False
    transition(session, job, JobState.QUEUED, "queued", "task sent to the worker queue", reason="")
    return True


def note_waiting(session: Session, why: str) -> None:
    """Say on every job still waiting to be queued why it waits (the broker is away)."""
    session.execute(update(Job).where(Job.state == JobState.RECEIVED, Job.reason != why).values(reason=why))


def requeue(session: Session, job: Job, why: str, state: JobState = JobState.QUEUED) -> None:
    """Put a job back to QUEUED (a retry by an admin, sent to the broker by the caller), or to
    RECEIVED (the scheduler's own, sent on its next pass however long the broker is away)."""
    job.worker = ""
    job.reason = ""
    job.finished_at = None
    job.lease_expires_at = None
    transition(session, job, state, "requeued", why)


def retry(session: Session, job_id: int, who: str) -> Job:
    """An admin's retry: a finished or stuck job runs again from the start (same output UIDs)."""
    job = _get(session, job_id)
    if job.rule is None:
        raise ValueError(
            f"job {job_id} was not routed to a segmenter ({job.reason}); there is nothing to retry"
        )
    if job.state == JobState.RUNNING:
        raise ValueError(f"job {job_id} is running on {job.worker}; cancel it first, or wait for it")
    _check_latest(session, job, "retry")
    requeue(session, job, f"retry requested by {who}")
    return job


def _check_latest(session: Session, job: Job, action: str) -> None:
    """A job made before its series grew covers part of it: run or sent again, it would wait for
    ever behind the newer instances. Another job of the same series (a re-run with another
    segmenter) is no reason to refuse."""
    if job.series.instance_count <= job.instance_count:
        return
    covering = session.scalar(
        select(func.max(Job.id)).where(
            Job.series_id == job.series_id, Job.instance_count >= job.series.instance_count
        )
    )
    if covering is not None:
        raise ValueError(
            f"job {job.id} ran before its series grew; job {covering} covers the series as it is now: "
            f"{action} that one"
        )
    raise ValueError(
        f"the series has grown to {job.series.instance_count} instances since job {job.id} took "
        f"{job.instance_count}; a new job runs with all of them once the series is complete"
    )


def cancel(session: Session, job_id: int, who: str) -> Job:
    """An admin's cancel: the job stops where it is (a worker running it discards its result,
    a pending delivery is not sent); a retry starts it again."""
    job = _get(session, job_id)
    if job.state in TERMINAL_STATES:
        raise ValueError(f"job {job_id} is {job.state.value} already; there is nothing to cancel")
    job.lease_expires_at = None
    transition(session, job, JobState.CANCELLED, "cancelled", reason=f"cancelled by {who}")
    return job


def rerun(session: Session, job_id: int, segmenter: str, who: str) -> Job:
    """A new job for the job's series with another segmenter, the same rule, outputs and
    destinations (its results get their own UIDs: another algorithm made them)."""
    job = _get(session, job_id)
    if job.rule is None:
        raise ValueError(f"job {job_id} was not routed ({job.reason}); no rule says where results go")
    busy = session.scalar(
        select(Job.id).where(Job.series_id == job.series_id, Job.state.not_in(TERMINAL_STATES))
    )
    if busy is not None:
        raise ValueError(f"job {busy} of this series is still under way; wait for it or cancel it first")
    new = create_job(
        session,
        job.series,
        rule=job.rule,
        segmenter=segmenter,
        destinations=list(job.destinations),
        state=JobState.RECEIVED,
        message=f"re-run of job {job_id} with segmenter {segmenter}, requested by {who}",
        outputs=list(job.outputs),
    )
    new.instance_count = job.series.instance_count  # the series as it is now
    record_event(session, job, "rerun", f"re-run as job {new.id} with segmenter {segmenter} by {who}")
    return new


def resend(session: Session, job_id: int, who: str, destination: str | None = None) -> Job:
    """Send a finished job's results again (to every destination, or to one): same files, same
    UIDs, so a PACS that has them stores nothing twice."""
    job = _get(session, job_id)
    if job.state not in (JobState.DELIVERED, JobState.FAILED) or not job.deliveries:
        raise ValueError(
            f"job {job_id} is {job.state.value} with no results to send; retry it instead"
            if job.state in TERMINAL_STATES
            else f"job {job_id} is {job.state.value}: it sends its results itself"
        )
    _check_latest(session, job, "resend")
    chosen = [d for d in job.deliveries if destination is None or d.destination == destination]
    if not chosen:
        raise ValueError(f"job {job_id} has nothing for destination {destination!r}")
    for delivery in chosen:
        delivery.state, delivery.attempts, delivery.next_attempt_at = DeliveryState.PENDING, 0, None
    job.reason = ""
    job.finished_at = None
    where = destination or "every destination"
    transition(
        session, job, JobState.SEGMENTED, "resend", f"results sent again to {where}, requested by {who}"
    )
    return job


def supersede(session: Session, job: Job, by: int) -> bool:
    """A job whose series grew after it was made stops where it is, as a cancelled one does (a
    worker running it discards its result, nothing more is sent); False if it had finished."""
    if job.state in TERMINAL_STATES:
        return False
    job.lease_expires_at = None
    reason = f"superseded by job {by}: the series grew after this job was made"
    transition(session, job, JobState.SUPERSEDED, "superseded", reason=reason)
    return True


def request_completion(session: Session, uid: str) -> list[str] | None:
    """Ask that the series ``uid``, or every series of the study ``uid``, be taken as complete;
    the UIDs of those still waiting for their job; None if no such series or study was received."""
    series = list(session.scalars(select(Series).where(Series.series_instance_uid == uid)))
    if not series:
        series = list(session.scalars(select(Series).join(Study).where(Study.study_instance_uid == uid)))
    if not series:
        return None
    waiting = [s for s in series if s.instance_count > s.assembled_count]
    for each in waiting:
        each.complete_requested_at = utcnow()
    return [s.series_instance_uid for s in waiting]


def _get(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    return job


def stale_jobs(session: Session, older_than: datetime) -> list[Job]:
    """Queued jobs that nobody has touched since ``older_than`` (a lost message), locked for the
    caller's transaction: a worker claiming one meanwhile waits, then finds it sent again."""
    query = select(Job).where(Job.state == JobState.QUEUED, Job.updated_at < older_than)
    return list(session.scalars(query.with_for_update()))


def jobs_with_due_deliveries(
    session: Session, now: datetime, suspended: Collection[str] = ()
) -> dict[int, int]:
    """SEGMENTED jobs with a pending delivery due by ``now`` to a destination not ``suspended``,
    whose series has not grown past them: job id -> the attempts its due deliveries have made (a
    new attempt since tells a new retry from an old one)."""
    due = Delivery.next_attempt_at.is_(None) | (Delivery.next_attempt_at <= now)
    if suspended:
        due = due & Delivery.destination.not_in(list(suspended))
    query = (
        select(Job.id, func.sum(Delivery.attempts))
        .join(Delivery, Delivery.job_id == Job.id)
        .join(Series, Series.id == Job.series_id)
        .where(
            Job.state == JobState.SEGMENTED,
            Delivery.state == DeliveryState.PENDING,
            due,
            Series.instance_count <= Job.instance_count,
        )
        .group_by(Job.id)
    )
    return {int(job_id): int(attempts or 0) for job_id, attempts in session.execute(query)}


def expired_leases(session: Session, now: datetime) -> list[Job]:
    """RUNNING jobs whose worker stopped renewing its lease: it died, hangs, or lost the database.
    Locked for the caller's transaction, so that a worker taking one over meanwhile is not undone
    (PostgreSQL reads a row changed since again, and leaves it out when it no longer matches)."""
    lapsed = Job.lease_expires_at.is_(None) | (Job.lease_expires_at < now)
    return list(session.scalars(select(Job).where(Job.state == JobState.RUNNING, lapsed).with_for_update()))
