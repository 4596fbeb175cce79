"""The Celery task bodies: bookkeeping around :mod:`workers.pipeline` and :mod:`workers.destinations`.

Tasks take job ids, never objects. Both are safe to run twice: ``process_job`` claims its job
atomically and ``deliver_job`` sends only what is still pending, with the same output UIDs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery, Task
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import Settings
from node.core.dicom import CT_IMAGE, excluded_image_type
from node.core.queue import DELIVER_JOB, PROCESS_JOB, JobQueue
from node.db.engine import session_scope
from node.db.jobs import claim, record_event, transition
from node.db.models import Delivery, DeliveryState, Instance, Job, JobState, utcnow
from segmenters import registry
from segmenters.base import Segmenter
from workers.destinations import send
from workers.errors import (
    DeliveryRefusedError,
    DestinationUnavailableError,
    PermanentError,
    SeriesRejectedError,
)
from workers.pipeline import segment_series

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = {"explicit": "1.2.840.10008.1.2.1", "jpeg2000": "1.2.840.10008.1.2.4.90"}


def worker_name(hostname: str | None) -> str:
    """The worker process as recorded on a job: Celery node name and process id."""
    return f"{hostname or 'worker'}/{os.getpid()}"


def is_dead_here(hostname: str | None) -> Callable[[str], bool]:
    """Whether a job's recorded worker was a process of this Celery node that no longer runs."""

    def is_dead(recorded: str) -> bool:
        node, _, pid = recorded.rpartition("/")
        if node != (hostname or "worker") or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(pid) == os.getpid() or _is_zombie(int(pid))

    return is_dead


def _is_zombie(pid: int) -> bool:
    """A killed process whose parent died too lingers as a zombie until init reaps it: it is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


@dataclass
class WorkerContext:
    """What the tasks of one worker process share: settings, sessions, loaded segmenters."""

    settings: Settings
    sessions: sessionmaker[Session]
    queue: JobQueue
    segmenters: dict[str, Segmenter] = field(default_factory=dict)

    def segmenter(self, name: str) -> Segmenter:
        """Loaded once per worker process, then reused for every job."""
        if name not in self.segmenters:
            self.segmenters[name] = build_segmenter(name, self.settings)
        return self.segmenters[name]


def build_segmenter(name: str, settings: Settings) -> Segmenter:
    """The segmenter a rule names: one the settings declare (a checkpoint, or an installed
    segmenter, either maybe cropped to the body), else an installed one."""
    declared = settings.segmenters.get(name)
    if declared is None:
        return registry.create(name)
    if declared.checkpoint is not None:
        from segmenters.checkpoint import NetworkSegmenter

        segmenter: Segmenter = NetworkSegmenter(
            declared.checkpoint,
            device=declared.device,
            amp=declared.amp,
            batch_size=declared.batch_size,
            threads=settings.worker.cpu_threads,
        )
    elif declared.base is not None:
        segmenter = registry.create(declared.base)
    else:  # the settings refuse this; the branch keeps the type checker honest
        raise ValueError(f"segmenter {name!r} names neither a checkpoint nor a base")
    if declared.crop_to_body:
        from segmenters.cropping import BodyCroppedSegmenter

        segmenter = BodyCroppedSegmenter(segmenter, declared.crop_margin_mm)
    return segmenter


def job_inputs(session: Session, job: Job, settings: Settings) -> list[Path]:
    """The CT image files of the job's series, as it stood when the job was created."""
    rows = session.execute(
        select(Instance.path, Instance.sop_class_uid, Instance.image_type)
        .where(Instance.series_id == job.series_id)
        .order_by(Instance.id)
        .limit(job.instance_count)
    ).all()
    rule = next((r for r in settings.rules if r.name == job.rule), None)
    excluded = rule.exclude_image_types if rule else ["LOCALIZER"]
    paths = [
        settings.storage_dir / r.path
        for r in rows
        if r.sop_class_uid == CT_IMAGE and not excluded_image_type(r.image_type, excluded)
    ]
    if not paths:
        raise SeriesRejectedError(
            f"none of the {len(rows)} instances is a CT image that can be segmented "
            "(scouts, reports and non-CT objects are stored but not segmented)"
        )
    return paths


def run_process_job(ctx: WorkerContext, job_id: int, worker: str, is_dead: Callable[[str], bool]) -> bool:
    """Segment one job; returns True when it is ready for delivery. Plain function: tested directly."""
    with session_scope(ctx.sessions) as session:
        job = claim(session, job_id, worker, is_dead)
        if job is None:
            log.info("job %d: not waiting (already taken or finished); nothing to do", job_id)
            return False
        series_uid = job.series.series_instance_uid
        segmenter_name = job.segmenter or ""
        destinations = list(job.destinations)
    log.info("job %d series %s: running %s", job_id, series_uid, segmenter_name)
    output = ctx.settings.output_dir / f"job-{job_id}" / "seg.dcm"
    try:
        with ctx.sessions() as session:
            job = session.get_one(Job, job_id)
            paths = job_inputs(session, job, ctx.settings)
        segmenter = ctx.segmenter(segmenter_name)
        result = segment_series(
            paths,
            segmenter,
            output,
            transfer_syntax=TRANSFER_SYNTAXES[ctx.settings.worker.seg_transfer_syntax],
            decode_workers=ctx.settings.worker.cpu_threads or None,
        )
    except SeriesRejectedError as err:
        _finish(ctx, job_id, JobState.REJECTED, "rejected", str(err))
        log.info("job %d series %s: rejected: %s", job_id, series_uid, err)
        return False
    except (PermanentError, registry.UnknownSegmenterError) as err:
        _finish(ctx, job_id, JobState.FAILED, "failed", str(err))
        log.warning("job %d series %s: failed: %s", job_id, series_uid, err)
        return False
    except OperationalError:
        raise
    except Exception as err:
        log.exception("job %d series %s: internal error", job_id, series_uid)
        _finish(
            ctx,
            job_id,
            JobState.FAILED,
            "failed",
            f"internal error in the worker: {type(err).__name__}: {err}",
        )
        return False

    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    timing += f" ({len(paths)} slices decoded by {result.decode_processes} process(es))"
    with session_scope(ctx.sessions) as session:
        job = session.get_one(Job, job_id)
        if job.state != JobState.RUNNING or job.worker != worker:
            log.info("job %d: no longer ours (%s); result discarded", job_id, job.state)
            return False
        job.output_path = str(output)
        job.output_sop_instance_uid = result.sop_instance_uid
        existing = {d.destination: d for d in job.deliveries}
        for name in destinations:
            delivery = existing.get(name)
            if delivery is None:
                session.add(
                    Delivery(job_id=job.id, destination=name, state=DeliveryState.PENDING, attempts=0)
                )
            else:
                delivery.state, delivery.attempts = DeliveryState.PENDING, 0
        message = f"{result.segments} segments; {timing}"
        transition(session, job, JobState.SEGMENTED, "segmented", message)
        if not destinations:
            transition(
                session, job, JobState.DELIVERED, "delivered", "the rule names no destination; SEG kept"
            )
            return False
    log.info("job %d series %s: segmented (%s)", job_id, series_uid, timing)
    return True


def _finish(ctx: WorkerContext, job_id: int, state: JobState, event: str, reason: str) -> None:
    with session_scope(ctx.sessions) as session:
        transition(session, session.get_one(Job, job_id), state, event, reason=reason)


def backoff_s(settings: Settings, attempts: int) -> float:
    base = settings.worker.delivery_backoff_s * 2 ** max(attempts - 1, 0)
    return float(min(base, settings.worker.delivery_backoff_max_s))


def run_deliver_job(ctx: WorkerContext, job_id: int) -> float | None:
    """Send the job's SEG to every pending destination; returns seconds until a retry, or None."""
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.SEGMENTED:
            return None
        output = Path(job.output_path)
        pending = [(d.id, d.destination) for d in job.deliveries if d.state == DeliveryState.PENDING]
    settings = ctx.settings
    for delivery_id, name in pending:
        destination = settings.destinations.get(name)
        answer, state, event = "", DeliveryState.PENDING, "send_failed"
        if destination is None:
            answer, state = f"destination {name!r} is no longer configured", DeliveryState.FAILED
        else:
            try:
                answer = send(destination, [output], settings.scp.ae_title)
                state, event = DeliveryState.DELIVERED, "sent"
            except DestinationUnavailableError as err:
                answer = str(err)
            except DeliveryRefusedError as err:
                answer, state = str(err), DeliveryState.FAILED
        with session_scope(ctx.sessions) as session:
            delivery = session.get_one(Delivery, delivery_id)
            job = session.get_one(Job, job_id)
            delivery.attempts += 1
            delivery.last_status = answer
            if state == DeliveryState.PENDING and delivery.attempts >= settings.worker.delivery_max_attempts:
                state = DeliveryState.FAILED
            delivery.state = state
            if state == DeliveryState.DELIVERED:
                delivery.delivered_at = utcnow()
            record_event(session, job, event, f"to {name}, attempt {delivery.attempts}: {answer}")
        log.info("job %d: delivery to %s attempt: %s", job_id, name, state)

    with session_scope(ctx.sessions) as session:
        job = session.get_one(Job, job_id)
        states = [d.state for d in job.deliveries]
        if all(s == DeliveryState.DELIVERED for s in states):
            transition(session, job, JobState.DELIVERED, "delivered", "every destination answered success")
            return None
        if DeliveryState.PENDING in states:
            attempts = max(d.attempts for d in job.deliveries if d.state == DeliveryState.PENDING)
            return backoff_s(settings, attempts)
        failed = [d for d in job.deliveries if d.state == DeliveryState.FAILED]
        reason = "; ".join(
            f"{d.destination} did not accept the SEG after {d.attempts} attempt(s): {d.last_status}"
            for d in failed
        )
        transition(
            session,
            job,
            JobState.FAILED,
            "failed",
            reason=f"{reason}. Fix the destination, then retry the job.",
        )
        return None


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Bind the task bodies to ``app``; retries for lost database connections are Celery's."""

    @app.task(
        name=PROCESS_JOB,
        bind=True,
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        max_retries=10,
    )
    def process_job(self: Task, job_id: int) -> None:
        hostname = self.request.hostname
        if run_process_job(ctx, job_id, worker_name(hostname), is_dead_here(hostname)):
            # The first delivery attempt runs right here (no second trip through the broker);
            # retries go through deliver_job with their backoff.
            delay = run_deliver_job(ctx, job_id)
            if delay is not None:
                ctx.queue.deliver(job_id, countdown=delay)

    @app.task(
        name=DELIVER_JOB,
        bind=True,
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        max_retries=10,
    )
    def deliver_job(self: Task, job_id: int) -> None:
        delay = run_deliver_job(ctx, job_id)
        if delay is not None:
            raise self.retry(countdown=delay, max_retries=None)

    del process_job, deliver_job


def rescue_orphans(ctx: WorkerContext, hostname: str | None) -> list[int]:
    """At worker start: jobs left RUNNING by a dead process of this node go back to the queue."""
    is_dead = is_dead_here(hostname)
    rescued = []
    with session_scope(ctx.sessions) as session:
        running = session.scalars(select(Job).where(Job.state == JobState.RUNNING)).all()
        for job in running:
            if job.worker and is_dead(job.worker):
                job.worker = ""
                transition(session, job, JobState.QUEUED, "requeued", "its worker died mid-job; queued again")
                rescued.append(job.id)
    for job_id in rescued:
        ctx.queue.process(job_id)
        log.warning("job %d: worker died mid-job; queued again", job_id)
    return rescued


__all__ = [
    "WorkerContext",
    "build_segmenter",
    "register_tasks",
    "rescue_orphans",
    "run_deliver_job",
    "run_process_job",
]
