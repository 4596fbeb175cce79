"""What a worker records about the jobs it runs, each step one short transaction: the claim and its
lease, the result, the delivery attempts. Task bodies do the work and report here; nothing else in
the workers writes a job row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.engine import session_scope
from node.db.jobs import HOST, record_event, transition
from node.db.models import Delivery, DeliveryState, Instance, Job, JobEvent, JobState, utcnow
from node.db.operations import destination_answered, processing_suspended, suspended_destinations


@dataclass(frozen=True)
class InputRow:
    path: str  # relative to the storage folder
    sop_class_uid: str
    image_type: str
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class ClaimedJob:
    """A job as its worker took it: what to run on which instances, and where results go."""

    job_id: int
    series_uid: str
    rule: str | None
    segmenter: str
    destinations: list[str]
    outputs: list[str]
    inputs: list[InputRow]
    study_uid: str = ""


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: int
    destination: str
    output: str


@dataclass(frozen=True)
class DeliveryOutcome:
    delivered: bool
    permanent: bool  # refused in a way that will not change: no more attempts
    answer: str


class JobRuns:
    """A worker's bookkeeping. ``worker`` names the process on the rows it takes; ``lease_s`` is
    how long a claim holds without renewal."""

    def __init__(self, sessions: sessionmaker[Session], worker: str, lease_s: float) -> None:
        self.sessions = sessions
        self.worker = worker
        self.lease = timedelta(seconds=lease_s)

    def claim(self, job_id: int) -> ClaimedJob | None:
        """Take a waiting job, or a RUNNING one whose lease expired (its worker is gone) or that
        this worker itself holds (a retry after an error here). None: finished, gone, alive in
        another worker's hands (so a task delivered twice does nothing), or processing is
        suspended (the job stays QUEUED; resuming sends it again)."""
        now = utcnow()
        with session_scope(self.sessions) as session:
            current = session.get(Job, job_id)
            if current is None or processing_suspended(session) is not None:
                return None
            condition: ColumnElement[bool] = Job.state.in_([JobState.RECEIVED, JobState.QUEUED])
            note = ""
            if current.state == JobState.RUNNING and current.worker == self.worker:
                condition = (Job.state == JobState.RUNNING) & (Job.worker == self.worker)
                note = "; again by the same worker after an error"
            elif current.state == JobState.RUNNING and _lapsed(current.lease_expires_at, now):
                condition = (Job.state == JobState.RUNNING) & (Job.worker == current.worker)
                note = f"; taken over from worker {current.worker}, whose lease had expired"
            taken = session.execute(
                update(Job)
                .where(Job.id == job_id, condition)
                .values(
                    state=JobState.RUNNING,
                    worker=self.worker,
                    attempts=Job.attempts + 1,
                    started_at=now,
                    updated_at=now,
                    lease_expires_at=now + self.lease,
                )
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                return None
            job = session.get_one(Job, job_id, populate_existing=True)
            session.add(
                JobEvent(
                    job_id=job.id,
                    event="started",
                    state=JobState.RUNNING,
                    host=HOST,
                    message=f"worker {self.worker}, attempt {job.attempts}{note}",
                )
            )
            rows = session.execute(
                select(Instance.path, Instance.sop_class_uid, Instance.image_type, Instance.sop_instance_uid)
                .where(Instance.series_id == job.series_id)
                .order_by(Instance.id)
                .limit(job.instance_count)
            ).all()
            return ClaimedJob(
                job_id=job.id,
                series_uid=job.series.series_instance_uid,
                rule=job.rule,
                segmenter=job.segmenter or "",
                destinations=list(job.destinations),
                outputs=list(job.outputs),
                inputs=[InputRow(r.path, r.sop_class_uid, r.image_type, r.sop_instance_uid) for r in rows],
                study_uid=job.series.study.study_instance_uid,
            )

    def renew(self, job_id: int) -> bool:
        """Extend the lease; False when the job is no longer this worker's (cancelled, taken over)."""
        now = utcnow()
        with session_scope(self.sessions) as session:
            renewed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == self.worker)
                .values(lease_expires_at=now + self.lease)
            )
            return bool(renewed.rowcount == 1)  # type: ignore[attr-defined]

    def segmented(
        self, job_id: int, folder: Path, outputs: list[str], seg_uid: str, message: str, instances: int
    ) -> bool:
        """Record the results of ``instances`` instances, written to ``folder``; True when the job
        is this worker's and has destinations to deliver them to (one delivery per output and
        destination, due once the job's results are no longer held). A job that is no longer ours
        keeps its state, and one whose series grew while its results were held runs again: either
        way the results are discarded."""
        with session_scope(self.sessions) as session:
            job = self._ours(session, job_id)
            if job is None:
                return False
            job.lease_expires_at = None
            if _ran_short(session, job, instances):
                return False
            job.output_path = str(folder)
            job.output_sop_instance_uid = seg_uid
            now = utcnow()
            job.segmented_at = now
            held = job.hold_until if job.hold_until is not None and job.hold_until > now else None
            existing = {(d.destination, d.output): d for d in job.deliveries}
            for name in job.destinations:
                for output in outputs:
                    delivery = existing.get((name, output))
                    if delivery is None:
                        session.add(
                            Delivery(
                                job_id=job.id,
                                destination=name,
                                output=output,
                                state=DeliveryState.PENDING,
                                attempts=0,
                                next_attempt_at=held,
                            )
                        )
                    else:
                        delivery.state, delivery.attempts, delivery.next_attempt_at = (
                            DeliveryState.PENDING,
                            0,
                            held,
                        )
            transition(session, job, JobState.SEGMENTED, "segmented", message)
            if not job.destinations:
                transition(
                    session,
                    job,
                    JobState.DELIVERED,
                    "delivered",
                    "the rule names no destination; results kept",
                )
                return False
            return True

    def ended(self, job_id: int, state: JobState, reason: str, instances: int) -> bool:
        """The job FAILED or was REJECTED while this worker ran it on ``instances`` instances;
        False if it was no longer ours, or runs again because its series grew meanwhile."""
        with session_scope(self.sessions) as session:
            job = self._ours(session, job_id)
            if job is None:
                return False
            job.lease_expires_at = None
            if _ran_short(session, job, instances):
                return False
            transition(
                session, job, state, "failed" if state == JobState.FAILED else "rejected", reason=reason
            )
            return True

    def _ours(self, session: Session, job_id: int) -> Job | None:
        job = session.get_one(Job, job_id)
        if job.state != JobState.RUNNING or job.worker != self.worker:
            return None
        return job

    def claim_due_deliveries(self, job_id: int, hold_s: float) -> tuple[Path, list[DueDelivery]] | None:
        """The results' folder and the deliveries due now, each held ``hold_s`` ahead for this
        attempt (another worker's task finds it not due; a worker that dies mid-attempt leaves it
        due again then); none while the series has grown past the job (its next job, or this one
        run again, sends the results). None unless the job waits for delivery."""
        now = utcnow()
        due = Delivery.next_attempt_at.is_(None) | (Delivery.next_attempt_at <= now)
        with session_scope(self.sessions) as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.SEGMENTED:
                return None
            claimed: list[DueDelivery] = []
            if job.series.instance_count > job.instance_count:
                return Path(job.output_path), claimed
            suspended = suspended_destinations(session)
            for delivery in job.deliveries:
                if delivery.destination in suspended:
                    continue
                taken = session.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery.id, Delivery.state == DeliveryState.PENDING, due)
                    .values(next_attempt_at=now + timedelta(seconds=hold_s))
                )
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(DueDelivery(delivery.id, delivery.destination, delivery.output))
            return Path(job.output_path), claimed

    def hold_deliveries(self, delivery_ids: list[int], hold_s: float) -> bool:
        """Keep pending deliveries held ``hold_s`` ahead while they are being sent (a slow PACS, a
        long overlay): no other worker sends them meanwhile. False when none is pending any more."""
        with session_scope(self.sessions) as session:
            held = session.execute(
                update(Delivery)
                .where(Delivery.id.in_(delivery_ids), Delivery.state == DeliveryState.PENDING)
                .values(next_attempt_at=utcnow() + timedelta(seconds=hold_s))
            )
            return bool(held.rowcount)  # type: ignore[attr-defined]

    def attempted(
        self,
        job_id: int,
        delivery_id: int,
        outcome: DeliveryOutcome,
        max_attempts: int,
        backoff_s: Callable[[int], float],
    ) -> None:
        """One delivery attempt and its answer, and the job settled with it in one transaction, so
        a worker killed after it leaves no job waiting on deliveries that are over. A delivery still
        pending is due again after ``backoff_s`` of its attempts; it fails for good after
        ``max_attempts``."""
        with session_scope(self.sessions) as session:
            delivery = session.get_one(Delivery, delivery_id)
            job = session.get_one(Job, job_id)
            if delivery.state != DeliveryState.PENDING:
                # Settled meanwhile (an attempt that outlasted its hold, by another worker): a late
                # answer must not turn a delivered result into a failed one.
                return
            delivery.attempts += 1
            delivery.last_status = outcome.answer
            if outcome.delivered:
                delivery.state, delivery.delivered_at = DeliveryState.DELIVERED, utcnow()
            elif outcome.permanent or delivery.attempts >= max_attempts:
                delivery.state = DeliveryState.FAILED
            else:
                delivery.next_attempt_at = utcnow() + timedelta(seconds=backoff_s(delivery.attempts))
            event = "sent" if outcome.delivered else "send_failed"
            message = (
                f"{delivery.output} to {delivery.destination}, attempt {delivery.attempts}: {outcome.answer}"
            )
            if delivery.state == DeliveryState.PENDING:
                message += f"; next attempt in {backoff_s(delivery.attempts):g} s"
            record_event(session, job, event, message)
            # A refusal is an answer: the destination is up, whatever it thought of the files.
            reachable = outcome.delivered or outcome.permanent
            destination_answered(session, delivery.destination, reachable, outcome.answer)
            session.flush()
            _settle(session, job)


def _ran_short(session: Session, job: Job, instances: int) -> bool:
    """The run covered fewer instances than the job now has (its series grew while the results
    were held): back to RECEIVED, to run again with all of them."""
    if job.instance_count == instances:
        return False
    job.worker = ""
    transition(
        session,
        job,
        JobState.RECEIVED,
        "grew",
        f"ran with {instances} of the series' {job.instance_count} instances (it grew while the "
        "results were held); the results are discarded and it runs again with all of them",
    )
    return True


def _settle(session: Session, job: Job) -> None:
    """DELIVERED when every destination took every output, FAILED when one never will; else the
    job waits, and the scheduler sends it to a worker when its next delivery is due."""
    if job.state != JobState.SEGMENTED:
        return
    states = [d.state for d in job.deliveries]
    if all(s == DeliveryState.DELIVERED for s in states):
        transition(session, job, JobState.DELIVERED, "delivered", "every destination answered success")
        return
    if DeliveryState.PENDING in states:
        return
    reason = "; ".join(
        f"{d.destination} did not accept the {shown(d.output)} after {d.attempts} attempt(s): {d.last_status}"
        for d in job.deliveries
        if d.state == DeliveryState.FAILED
    )
    transition(
        session,
        job,
        JobState.FAILED,
        "failed",
        reason=f"{reason}. Fix the destination, then retry the job.",
    )


def shown(output: str) -> str:
    """An output as people name it: SEG, RTSTRUCT, SR, overlay images."""
    return "overlay images" if output == "overlay" else output.upper()


def _lapsed(expires_at: datetime | None, now: datetime) -> bool:
    """A lease that ran out; none at all is a claim from before leases existed."""
    return expires_at is None or expires_at < now
