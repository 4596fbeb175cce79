"""The running node: DICOM listener plus scheduler, over one database and one queue."""

from __future__ import annotations

import logging
import threading

from node.config import Settings
from node.db.engine import check_schema, make_engine, make_sessionmaker
from node.queue import JobQueue, make_celery
from node.scheduler import Scheduler
from node.scp import start_scp
from node.storage import Storage

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
        self.queue = JobQueue(make_celery(settings))
        self.scheduler = Scheduler(settings, self.sessions, self.queue)

    def run(self, stop: threading.Event) -> None:
        """Listen and schedule until ``stop`` is set."""
        server = start_scp(self.settings.scp, self.storage)
        try:
            self.scheduler.run(stop)
        finally:
            server.shutdown()
            self.storage.close()
            self.engine.dispose()
            log.info("node stopped")
