"""The one place where a job changes state.

Every change writes a :class:`JobEvent` in the same transaction, so the event log is the job's
complete history: who did what, on which host, and why.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from node.db.models import (
    TERMINAL_STATES,
    Job,
    JobEvent,
    JobState,
    Series,
    utcnow,
)

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
) -> Job:
    """A new job for ``series`` as it is now, with its first event."""
    job = Job(
        series_id=series.id,
        rule=rule,
        segmenter=segmenter,
        destinations=list(destinations),
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
    transition(session, job, JobState.QUEUED, "queued", "task sent to the worker queue")
    return True


def claim(session: Session, job_id: int, worker: str, is_dead: Callable[[str], bool]) -> Job | None:
    """Atomically take a job for ``worker``: a waiting one, or a RUNNING one whose worker is dead.

    ``is_dead(worker)`` tells whether the worker named on a RUNNING job is known to be gone (a
    process killed mid-job whose task came back through acks_late). Returns None when the job is
    gone, finished, or alive in another worker's hands: a task delivered twice then does nothing.
    """
    now = utcnow()
    takeover = ""
    condition: ColumnElement[bool] = Job.state.in_([JobState.RECEIVED, JobState.QUEUED])
    current = session.get(Job, job_id)
    if current is None:
        return None
    if current.state == JobState.RUNNING and current.worker and is_dead(current.worker):
        condition = (Job.state == JobState.RUNNING) & (Job.worker == current.worker)
        takeover = f"; taken over from worker {current.worker}, which died mid-job"
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, condition)
        .values(
            state=JobState.RUNNING, worker=worker, attempts=Job.attempts + 1, started_at=now, updated_at=now
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    session.add(
        JobEvent(
            job_id=job.id,
            event="started",
            state=JobState.RUNNING,
            host=HOST,
            message=f"worker {worker}, attempt {job.attempts}{takeover}",
        )
    )
    return job


def requeue(session: Session, job: Job, why: str) -> None:
    """Put a job back to QUEUED (a retry by an admin, or an orphan of a dead worker)."""
    job.worker = ""
    job.reason = ""
    job.finished_at = None
    transition(session, job, JobState.QUEUED, "requeued", why)


def retry(session: Session, job_id: int, who: str) -> Job:
    """An admin's retry: a finished or stuck job runs again from the start (same output UIDs)."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    if job.rule is None:
        raise ValueError(
            f"job {job_id} was not routed to a segmenter ({job.reason}); there is nothing to retry"
        )
    requeue(session, job, f"retry requested by {who}")
    return job


def stale_jobs(session: Session, older_than: datetime) -> list[Job]:
    """Jobs waiting or running that nobody has touched since ``older_than``."""
    waiting = [JobState.QUEUED, JobState.RUNNING, JobState.SEGMENTED]
    return list(session.scalars(select(Job).where(Job.state.in_(waiting), Job.updated_at < older_than)))
