"""The running node: DICOM listener plus scheduler, over one database and one queue."""

from __future__ import annotations

import logging
import threading

from node.core.config import Settings
from node.core.queue import JobQueue, declare_queue, make_celery
from node.db.engine import check_schema, make_engine, make_sessionmaker
from node.jobs.notifier import Notifier
from node.jobs.pulling import Puller
from node.jobs.scheduler import Scheduler
from node.receive.listener import start_scp, stop_listening
from node.receive.processes import ListenerProcesses, node_slots
from node.receive.storage import Storage

log = logging.getLogger(__name__)


class Node:
    """Built from settings; refuses to start on a database whose schema is not current."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.effective_database_url)
        check_schema(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        self.storage = Storage(settings.storage_dir, self.engine, settings.scp.min_free_bytes)
        celery = make_celery(settings)
        declare_queue(celery)
        self.queue = JobQueue(celery, settings)
        self.scheduler = Scheduler(settings, self.sessions, self.queue)
        self.notifier = Notifier(settings.notifications, self.sessions)
        self.puller = Puller(settings, self.sessions, self.storage)

    def run(self, stop: threading.Event) -> None:
        """Listen (in ``scp.processes`` processes) and schedule until ``stop`` is set."""
        slots = node_slots(self.settings)
        others = ListenerProcesses(self.settings, slots) if slots is not None else None
        server = start_scp(self.settings.scp, self.storage, slots=slots)
        if others is not None:
            others.start()
        notifier = threading.Thread(
            target=self.notifier.run, args=(stop,), name="segnode-notifier", daemon=True
        )
        notifier.start()
        puller = threading.Thread(target=self.puller.run, args=(stop,), name="segnode-pull", daemon=True)
        puller.start()
        try:
            self.scheduler.run(stop)
        finally:
            stop_listening(server, self.settings.scp.shutdown_grace_s)
            if others is not None:
                others.stop(timeout_s=self.settings.scp.shutdown_grace_s + 30)
            notifier.join(timeout=10)
            puller.join(timeout=10)
            self.storage.close()
            self.engine.dispose()
            log.info("node stopped")
