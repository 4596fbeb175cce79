"""The worker process: a Celery app with segnode's tasks, built from the settings at start."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from node.core.config import Settings
from node.core.queue import QUEUES, JobQueue, declare_queue, make_celery
from node.db.engine import check_schema, make_engine, make_sessionmaker
from segmenters.ct_series import allow_decoder_processes, start_decoder_server
from workers.heartbeat import Heartbeat
from workers.tasks import TRANSFER_SYNTAXES, WorkerContext, register_tasks
from workers.warm_up import warm_up

log = logging.getLogger(__name__)


def create_worker_app(settings: Settings) -> Celery:
    """The Celery app a worker runs: the shared queue configuration plus the task bodies."""
    engine = make_engine(settings.effective_database_url)
    check_schema(engine)
    # Loaded once here, before the pool forks: every worker process inherits it instead of taking
    # seconds to import it while its first job waits.
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    app = make_celery(settings)
    declare_queue(app)
    ctx = WorkerContext(settings=settings, sessions=make_sessionmaker(engine), queue=JobQueue(app, settings))
    register_tasks(app, ctx)

    def _after_fork(**_: Any) -> None:
        # Connections must not cross a fork; each child opens its own.
        engine.dispose(close=False)
        allow_decoder_processes()
        start_decoder_server()
        threads = settings.worker.cpu_threads or os.cpu_count() or 1
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
        warm_up(ctx, TRANSFER_SYNTAXES[settings.worker.seg_transfer_syntax])

    worker_process_init.connect(_after_fork, weak=False)
    beats: list[Heartbeat] = []

    def _ready(sender: Any, **_: Any) -> None:
        beats.append(
            Heartbeat(ctx.sessions, sender.hostname, settings.worker.concurrency, settings.worker.heartbeat_s)
        )
        beats[-1].start()

    def _shutdown(**_: Any) -> None:
        for heartbeat in beats:
            heartbeat.stop()

    worker_ready.connect(_ready, weak=False)
    worker_shutdown.connect(_shutdown, weak=False)
    return app


def run_worker(settings: Settings, name: str, queues: Sequence[str] = QUEUES, loglevel: str = "INFO") -> None:
    """Run a worker in the foreground (``segnode worker``), taking the work of ``queues``."""
    app = create_worker_app(settings)
    app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            f"--queues={','.join(queues)}",
            f"--concurrency={settings.worker.concurrency}",
            "--pool=prefork",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
