"""The node's control loop: assemble complete series, hand jobs to the queue, rescue stuck jobs.

The database is the truth and the broker only carries messages: a job whose message was lost (a
broker restart, a worker killed before it acknowledged), a running job whose worker's lease lapsed,
a delivery whose retry is due, are found here by their state and sent again.
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
from node.core.outages import Outage, run_passes
from node.core.queue import JobQueue, broker_fault
from node.db.engine import session_scope
from node.db.jobs import (
    expired_leases,
    jobs_with_due_deliveries,
    mark_queued,
    note_waiting,
    requeue,
    stale_jobs,
)
from node.db.models import Job, JobState, utcnow
from node.db.operations import processing_suspended, suspended_destinations
from node.jobs.assembly import assemble

log = logging.getLogger(__name__)

# A job whose delivery was sent to the workers is sent again, if still due, after this many times
# worker.delivery_timeout_s (its task was lost, or its attempt died with its worker).
DISPATCH_AGAIN_STEPS = 4


class Scheduler:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], queue: JobQueue) -> None:
        self.settings = settings
        self.sessions = sessions
        self.queue = queue
        self._broker = Outage(log, "sending jobs to the broker")
        # job id -> (its deliveries' attempts, when it was last sent to the workers, monotonic)
        self._dispatched: dict[int, tuple[int, float]] = {}

    def tick(self) -> None:
        """One pass: assemble, send waiting jobs, take back lapsed leases, rescue stale jobs."""
        with session_scope(self.sessions) as session:
            assemble(session, self.settings, utcnow())
        self.take_back_lapsed()
        self.rescue_stale()
        self.send_received()
        self.send_due_deliveries()

    def send_received(self) -> None:
        """Jobs waiting to be queued go to the broker, unless an admin suspended processing: then
        they wait in the database, saying why, until processing is resumed."""
        with session_scope(self.sessions) as session:
            suspension = processing_suspended(session)
            if suspension is not None:
                since = suspension.since.strftime("%Y-%m-%d %H:%M UTC")
                note_waiting(session, f"processing suspended by {suspension.by} since {since}")
                return
        with self.sessions() as session:
            waiting = session.execute(
                select(Job.id, Job.segmenter).where(Job.state == JobState.RECEIVED).order_by(Job.id)
            ).all()
        for job_id, segmenter in waiting:
            try:
                self.queue.process(job_id, segmenter)
            except Exception as err:  # noqa: BLE001 - broker away: the job stays RECEIVED and is sent later
                why = broker_fault(err, self.settings.effective_broker_url)
                self._broker.failed(err, f"{why}; {len(waiting)} job(s) wait and go once it works")
                with session_scope(self.sessions) as session:
                    note_waiting(session, f"waiting for the broker: {why}")
                return
            self._broker.succeeded()
            with session_scope(self.sessions) as session:
                mark_queued(session, job_id)

    def take_back_lapsed(self) -> None:
        """RUNNING jobs whose worker stopped renewing the lease wait to be sent again (by
        send_received, which keeps them while the broker is away)."""
        with session_scope(self.sessions) as session:
            for job in expired_leases(session, utcnow()):
                requeue(
                    session,
                    job,
                    f"worker {job.worker or '(unknown)'} stopped renewing its lease "
                    "(it died, hangs or lost the database); queued again",
                    state=JobState.RECEIVED,
                )
                log.warning("job %d: its worker's lease lapsed; queued again", job.id)

    def send_due_deliveries(self) -> None:
        """Jobs with a delivery due go to a worker: the schedule of retries is the database's, so
        a worker that dies while a retry waits loses nothing. A job sent recently is not sent
        again before its attempt could have run (its task may wait behind a long job)."""
        now = time.monotonic()
        again_after = DISPATCH_AGAIN_STEPS * self.settings.worker.delivery_timeout_s
        with self.sessions() as session:
            due = jobs_with_due_deliveries(session, utcnow(), suspended_destinations(session))
        for job_id, attempts in due.items():
            sent = self._dispatched.get(job_id)
            if sent is None or sent[0] != attempts or now - sent[1] >= again_after:
                self.queue.deliver(job_id)
                self._dispatched[job_id] = (attempts, now)
        self._dispatched = {j: sent for j, sent in self._dispatched.items() if j in due}

    def rescue_stale(self) -> None:
        """Queued jobs nobody took for ``stale_job_s`` (a lost message) are sent again."""
        older_than = utcnow() - timedelta(seconds=self.settings.worker.stale_job_s)
        with session_scope(self.sessions) as session:
            for job in stale_jobs(session, older_than):
                why = f"no progress for {self.settings.worker.stale_job_s:g} s; sent again"
                requeue(session, job, why, state=JobState.RECEIVED)
                log.warning("job %d: stale in the queue; sent again", job.id)

    def run(self, stop: threading.Event) -> None:
        run_passes(stop, self.tick, self.settings.assembly_poll_s, log, "the scheduler's passes")
