"""The node's control loop: assemble complete series, hand jobs to the queue, rescue stuck jobs.

The database is the truth and the broker only carries messages: a job whose message was lost (a
broker restart, a worker killed before it acknowledged) is found here by its state and sent again.
Tasks are safe to run twice, so sending again is always safe.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import Settings
from node.core.outages import Outage
from node.core.queue import JobQueue
from node.db.engine import session_scope
from node.db.jobs import expired_leases, mark_queued, record_event, requeue, stale_jobs
from node.db.models import Job, JobState, utcnow
from node.jobs.assembly import assemble

log = logging.getLogger(__name__)

# While the broker is down, one warning a minute says so, not one per pass.
BROKER_WARNING_EVERY_S = 60.0


class Scheduler:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], queue: JobQueue) -> None:
        self.settings = settings
        self.sessions = sessions
        self.queue = queue
        self._last_broker_warning = -BROKER_WARNING_EVERY_S

    def tick(self) -> None:
        """One pass: assemble, send waiting jobs, take back lapsed leases, rescue stale jobs."""
        with session_scope(self.sessions) as session:
            assemble(session, self.settings, utcnow())
        self.send_received()
        self.take_back_lapsed()
        self.rescue_stale()

    def send_received(self) -> None:
        with self.sessions() as session:
            waiting = session.scalars(
                select(Job.id).where(Job.state == JobState.RECEIVED).order_by(Job.id)
            ).all()
        for job_id in waiting:
            try:
                self.queue.process(job_id)
            except Exception as err:  # noqa: BLE001 - broker down: the job stays RECEIVED and is sent later
                if time.monotonic() - self._last_broker_warning > BROKER_WARNING_EVERY_S:
                    self._last_broker_warning = time.monotonic()
                    log.warning("job %d: cannot reach the broker (%s); will keep trying", job_id, err)
                return
            with session_scope(self.sessions) as session:
                mark_queued(session, job_id)

    def take_back_lapsed(self) -> None:
        """RUNNING jobs whose worker stopped renewing the lease go back on the queue."""
        with session_scope(self.sessions) as session:
            lapsed = expired_leases(session, utcnow())
            for job in lapsed:
                requeue(
                    session,
                    job,
                    f"worker {job.worker or '(unknown)'} stopped renewing its lease "
                    "(it died, hangs or lost the database); queued again",
                )
            taken_back = [job.id for job in lapsed]
        for job_id in taken_back:
            self.queue.process(job_id)
            log.warning("job %d: its worker's lease lapsed; queued again", job_id)

    def rescue_stale(self) -> None:
        older_than = utcnow() - timedelta(seconds=self.settings.worker.stale_job_s)
        with session_scope(self.sessions) as session:
            for job in stale_jobs(session, older_than):
                if job.state == JobState.SEGMENTED:
                    record_event(session, job, "redispatched", "no delivery progress; delivery sent again")
                    job.updated_at = utcnow()
                    self.queue.deliver(job.id)
                else:
                    requeue(
                        session, job, f"no progress for {self.settings.worker.stale_job_s:g} s; sent again"
                    )
                    self.queue.process(job.id)
                log.warning("job %d: stale in %s; sent again", job.id, job.state)

    def run(self, stop: threading.Event) -> None:
        passes = Outage(log, "the scheduler's passes")
        while not stop.is_set():
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - the next pass tries again; the outage is logged
                passes.failed(err)
            else:
                passes.succeeded()
            stop.wait(self.settings.assembly_poll_s)
