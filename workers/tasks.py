"""The Celery tasks: each runs a job's work (:mod:`workers.pipeline`, :mod:`workers.destinations`)
and reports every step to :class:`node.db.job_runs.JobRuns`, the one writer of job rows here.

Tasks take job ids, never objects. Both are safe to run twice: ``process_job`` claims its job
atomically and ``deliver_job`` sends only what is still pending, with the same output UIDs.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery, Task
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import Settings
from node.core.outputs import result_files
from node.core.queue import DELIVER_JOB, PROCESS_JOB, JobQueue
from node.db.job_runs import DeliveryOutcome, DueDelivery, JobRuns
from node.db.models import JobState
from segmenters import registry
from segmenters.base import Segmenter
from workers.destinations import send
from workers.errors import (
    DeliveryRefusedError,
    DestinationUnavailableError,
    JobLostError,
    PermanentError,
    SeriesRejectedError,
)
from workers.inputs import job_inputs
from workers.lease import lease_kept, renewed
from workers.pipeline import segment_series
from workers.remote import NodeClient, NodeUnreachableError
from workers.segmenter_factory import build_segmenter

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = {"explicit": "1.2.840.10008.1.2.1", "jpeg2000": "1.2.840.10008.1.2.4.90"}
# A lease is renewed this many times within its length: one missed renewal does not lose the job.
RENEWALS_PER_LEASE = 4
# A delivery attempt waits on the PACS at most this many times delivery_timeout_s (association,
# responses, release); its delivery is held that long for it.
ATTEMPT_HOLD_STEPS = 4


def worker_name(hostname: str | None) -> str:
    """The worker process as recorded on a job: Celery node name and process id."""
    return f"{hostname or 'worker'}/{os.getpid()}"


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

    def node(self) -> NodeClient | None:
        """The node's API, for a worker on another machine (worker.node_url); None with shared storage."""
        return NodeClient(self.settings) if self.settings.worker.node_url else None

    def runs(self, worker: str) -> JobRuns:
        return JobRuns(self.sessions, worker, self.settings.worker.lease_s)


def run_process_job(ctx: WorkerContext, job_id: int, worker: str) -> bool:
    """Segment one job; returns True when it is ready for delivery. Plain function: tested directly."""
    runs = ctx.runs(worker)
    job = runs.claim(job_id)
    if job is None:
        log.info("job %d: not waiting (already taken or finished); nothing to do", job_id)
        return False
    log.info("job %d series %s: running %s", job_id, job.series_uid, job.segmenter)
    folder = ctx.settings.output_dir / f"job-{job_id}"
    # This process's own: another worker on this machine may hold the job after a lapse.
    cache = ctx.settings.data_dir / "cache" / f"job-{job_id}-{os.getpid()}"
    node = ctx.node()
    every_s = ctx.settings.worker.lease_s / RENEWALS_PER_LEASE
    try:
        with lease_kept(runs, job_id, every_s) as lost:
            paths = job_inputs(job, ctx.settings, node, cache)
            result = segment_series(
                paths,
                ctx.segmenter(job.segmenter),
                folder,
                outputs=job.outputs,
                transfer_syntax=TRANSFER_SYNTAXES[ctx.settings.worker.seg_transfer_syntax],
                decode_workers=ctx.settings.worker.cpu_threads or None,
                fast_overlap=ctx.settings.worker.seg_fast_overlap,
                lost=lost,
            )
            if lost.is_set():  # cancelled or taken over while writing: nothing of this run is wanted
                raise JobLostError("the job is no longer this worker's")
            kept = node.upload(job_id, folder, worker) if node is not None else folder
    except JobLostError:
        log.info("job %d: no longer this worker's; stopped, and nothing handed back", job_id)
        return False
    except SeriesRejectedError as err:
        runs.ended(job_id, JobState.REJECTED, str(err), len(job.inputs))
        log.info("job %d series %s: rejected: %s", job_id, job.series_uid, err)
        return False
    except (PermanentError, registry.UnknownSegmenterError) as err:
        runs.ended(job_id, JobState.FAILED, str(err), len(job.inputs))
        log.warning("job %d series %s: failed: %s", job_id, job.series_uid, err)
        return False
    except (OperationalError, NodeUnreachableError):
        raise  # the database or the node away: Celery retries the task, which this worker claims again
    except Exception as err:  # noqa: BLE001 - the job fails with a reason; the log says where
        # Where it happened, not the exception's words: those may quote the data (a birth date).
        frames = "".join(traceback.format_tb(err.__traceback__))
        log.error(
            "job %d series %s: internal error (%s)\n%s", job_id, job.series_uid, type(err).__name__, frames
        )
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the worker's disk is full (writing the results): free space there, then retry the job"
        else:
            reason = f"internal error in the worker ({type(err).__name__}); the worker's log says where"
        runs.ended(job_id, JobState.FAILED, reason, len(job.inputs))
        return False
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # the series fetched from the node, if it was

    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    timing += f" ({len(paths)} slices decoded by {result.decode_processes} process(es))"
    message = f"{result.segments} segments; {', '.join(result.outputs)} written; {timing}"
    if not runs.segmented(job_id, kept, result.outputs, result.seg_uid, message, len(job.inputs)):
        log.info("job %d series %s: segmented (%s); nothing to send now", job_id, job.series_uid, timing)
        return False
    log.info("job %d series %s: segmented (%s)", job_id, job.series_uid, timing)
    return True


def backoff_s(settings: Settings, attempts: int) -> float:
    base = settings.worker.delivery_backoff_s * 2 ** max(attempts - 1, 0)
    return float(min(base, settings.worker.delivery_backoff_max_s))


def run_deliver_job(ctx: WorkerContext, job_id: int, worker: str = "") -> None:
    """Send the job's results to every destination whose delivery is due. A failed attempt is due
    again after its backoff, kept in the database: the scheduler sends the job when it is."""
    runs = ctx.runs(worker)
    settings = ctx.settings
    hold_s = ATTEMPT_HOLD_STEPS * settings.worker.delivery_timeout_s
    due = runs.claim_due_deliveries(job_id, hold_s=hold_s)
    if due is None:
        return
    folder, claimed = due
    node = ctx.node()
    if node is not None and claimed:  # the node keeps the results; this machine may not have them
        folder = settings.output_dir / f"job-{job_id}"
        node.download(job_id, sorted({d.output for d in claimed}), folder)
    by_destination: dict[str, list[DueDelivery]] = {}
    for delivery in claimed:
        by_destination.setdefault(delivery.destination, []).append(delivery)
    for name, deliveries in by_destination.items():  # one association carries every output due
        files = [path for d in deliveries for path in result_files(folder, d.output)]
        # Held while it is sent, however long a slow PACS takes: no other worker sends it too.
        hold = functools.partial(runs.hold_deliveries, [d.delivery_id for d in deliveries], hold_s)
        with renewed(hold, hold_s / RENEWALS_PER_LEASE, f"job {job_id}'s delivery to {name}"):
            outcome = _deliver(settings, name, files)
        for delivery in deliveries:
            runs.attempted(
                job_id,
                delivery.delivery_id,
                outcome,
                settings.worker.delivery_max_attempts,
                lambda attempts: backoff_s(settings, attempts),
            )
        what = ", ".join(d.output for d in deliveries)
        log.info("job %d: %s to %s: %s", job_id, what, name, "sent" if outcome.delivered else outcome.answer)


def _deliver(settings: Settings, name: str, files: list[Path]) -> DeliveryOutcome:
    destination = settings.destinations.get(name)
    if destination is None:
        return DeliveryOutcome(False, True, f"destination {name!r} is no longer configured")
    try:
        return DeliveryOutcome(
            True,
            False,
            send(destination, files, settings.scp.ae_title, settings.worker.delivery_timeout_s),
        )
    except DestinationUnavailableError as err:
        return DeliveryOutcome(False, False, str(err))
    except DeliveryRefusedError as err:
        return DeliveryOutcome(False, True, str(err))
    except Exception as err:  # recorded as an attempt, never a loop of unrecorded ones
        log.warning("delivery to %s: internal error (%s)", name, type(err).__name__, exc_info=True)
        why = f"internal error while sending ({type(err).__name__}); the worker's log has the details"
        return DeliveryOutcome(False, True, why)


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Bind the task bodies to ``app``; retries for lost database connections are Celery's."""

    @app.task(
        name=PROCESS_JOB,
        bind=True,
        autoretry_for=(OperationalError, NodeUnreachableError),
        retry_backoff=True,
        max_retries=10,
    )
    def process_job(self: Task, job_id: int) -> None:
        worker = worker_name(self.request.hostname)
        if run_process_job(ctx, job_id, worker):
            # The first delivery attempt runs right here (no second trip through the broker);
            # retries are due in the database, and the scheduler sends them.
            run_deliver_job(ctx, job_id, worker)

    @app.task(
        name=DELIVER_JOB,
        bind=True,
        autoretry_for=(OperationalError, NodeUnreachableError),
        retry_backoff=True,
        max_retries=10,
    )
    def deliver_job(self: Task, job_id: int) -> None:
        run_deliver_job(ctx, job_id, worker_name(self.request.hostname))

    del process_job, deliver_job


__all__ = ["WorkerContext", "register_tasks", "run_deliver_job", "run_process_job"]
