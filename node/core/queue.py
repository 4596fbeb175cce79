"""The job queue as both sides see it: one Celery configuration, tasks named, never imported.

The node sends tasks by name, so it never imports worker code (the chain runs one way); the workers
build their app from the same function and register the task bodies on it.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

from celery import Celery
from kombu import Queue
from kombu.transport import sqlalchemy as sqlalchemy_transport
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.exc import DatabaseError

from node.core.config import Settings
from node.core.outages import summary

log = logging.getLogger(__name__)

PROCESS_JOB = "segnode.process_job"
DELIVER_JOB = "segnode.deliver_job"
# One queue per kind of work, so that each kind of worker takes only its own: GPU workers the
# networks, CPU workers the rest, and any worker the deliveries (`segnode worker --queues`).
SEGMENT_GPU = "segment-gpu"
SEGMENT_CPU = "segment-cpu"
DELIVER = "deliver"
QUEUES = (SEGMENT_GPU, SEGMENT_CPU, DELIVER)
DECLARE_ATTEMPTS = 3


class EmbeddedBrokerTransport(sqlalchemy_transport.Transport):
    """kombu's SQL transport (the embedded broker: a table), polled every 0.1 s instead of every 1 s.

    Idle workers poll the table; at kombu's default of once a second that added up to a second to
    every job and every delivery. One indexed query each 0.1 s costs nothing. The interval is a class
    attribute because kombu hands every transport option of this transport to ``create_engine``,
    which refuses ``polling_interval``.
    """

    polling_interval = 0.1


def make_celery(settings: Settings) -> Celery:
    """The Celery app for ``settings``: JSON only, late acknowledgement, one task at a time per process."""
    url = settings.effective_broker_url
    app = Celery("segnode", broker=url.removeprefix("sqla+"), set_as_current=False)
    if url.startswith("sqla+"):
        # Named by class, not by the URL's prefix, which would pick kombu's own class.
        app.conf.broker_transport = EmbeddedBrokerTransport
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        # A task whose worker process dies (SIGKILL, out of memory) goes back on the queue.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=SEGMENT_CPU,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    if settings.effective_broker_url.startswith("redis"):
        # Task events for Flower; the embedded broker has no broadcast to carry them.
        app.conf.update(worker_send_task_events=True, task_send_sent_event=True)
        # Unacknowledged tasks of a worker that vanished come back after this long.
        app.conf.broker_transport_options = {"visibility_timeout": settings.worker.stale_job_s}
    return app


def declare_queue(app: Celery) -> None:
    """Create the job queues on the broker, where each process starts: processes creating the
    embedded broker's tables and queue row at once fail all but one (a worker's consumer died of
    it); a later try finds what the other made."""
    for attempt in range(1, DECLARE_ATTEMPTS + 1):
        try:
            with app.connection_for_write() as connection:
                for name in QUEUES:
                    Queue(name).bind(connection.default_channel).declare()
            return
        except DatabaseError:
            if attempt == DECLARE_ATTEMPTS:
                raise


def broker_depth(app: Celery, timeout_s: float = 2.0) -> dict[str, int | None]:
    """Messages waiting on each queue at the broker; None where the broker cannot be asked."""
    found: dict[str, int | None] = dict.fromkeys(QUEUES)
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
            channel = connection.default_channel
            for name in QUEUES:
                found[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
    except Exception as err:  # noqa: BLE001 - an unreachable broker or a queue not yet declared: no figure
        log.debug("broker depth unknown (%s)", type(err).__name__)
    return found


def segment_queue(settings: Settings, segmenter: str | None) -> str:
    """Where a job of ``segmenter`` waits: a declared network (or TotalSegmentator) not pinned to
    the CPU goes to the GPU workers; everything else to the CPU workers."""
    declared = settings.segmenters.get(segmenter or "")
    if declared is None or declared.device == "cpu":
        return SEGMENT_CPU
    return SEGMENT_GPU if declared.network is not None or declared.totalsegmentator else SEGMENT_CPU


def broker_fault_now(app: Celery, broker_url: str, timeout_s: float = 2.0) -> str | None:
    """Why the broker cannot be reached now, in words; None when it answers."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
            connection.default_channel  # noqa: B018 - opening a channel talks to the broker
    except Exception as err:  # noqa: BLE001 - whatever it is, it is said in words
        return broker_fault(err, broker_url)
    return None


class JobQueue:
    """Sends job tasks to the workers, each to the queue of its kind of work."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def process(self, job_id: int, segmenter: str | None) -> None:
        self.app.send_task(PROCESS_JOB, args=[job_id], queue=segment_queue(self.settings, segmenter))

    def deliver(self, job_id: int) -> None:
        self.app.send_task(DELIVER_JOB, args=[job_id], queue=DELIVER)


def broker_fault(err: BaseException, broker_url: str) -> str:
    """What is wrong with the broker, and where, in words an admin can act on (kombu's own
    messages name a SQL statement or a socket)."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(c) for c in chain)
    if broker_url.startswith("sqla+sqlite:///"):
        path = Path(broker_url.removeprefix("sqla+sqlite:///"))
        where = f"the embedded broker's file {path}"
        if "disk is full" in text or any(getattr(c, "errno", None) == errno.ENOSPC for c in chain):
            free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
            return f"the disk holding {where} is full ({free // 1024} KiB free)"
        if "unable to open database file" in text or any(isinstance(c, PermissionError) for c in chain):
            return f"{where} cannot be opened or created (is its folder there and writable?)"
        return f"{where} failed: {summary(err)}"
    where = f"the broker at {maybe_sanitize_url(broker_url)}"
    if "MISCONF" in text:
        return f"{where} cannot save to its disk (full or not writable), so it refuses new messages"
    if any(isinstance(c, ConnectionRefusedError) for c in chain):
        return f"{where} refuses connections: is it running?"
    if any(isinstance(c, (TimeoutError, ConnectionError)) for c in chain):
        return f"{where} cannot be reached: {summary(err)}"
    return f"{where} failed: {summary(err)}"
