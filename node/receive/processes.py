"""The node's other listener processes (``scp.processes``): the same listener on the same port
(SO_REUSEPORT, the kernel spreads the connections), each with its own storage writer and database
connection, all counting associations against the node's one limit."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from typing import Any

from node.core.config import Settings
from node.core.logs import configure_logging
from node.db.engine import make_engine
from node.receive.listener import start_scp, stop_listening
from node.receive.slots import Semaphore
from node.receive.storage import Storage

log = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
# How often a listener process looks whether the node's main process is still there.
PARENT_CHECK_S = 0.5


def node_slots(settings: Settings) -> Semaphore | None:
    """The association limit shared by the node's listener processes; None with one process."""
    if settings.scp.processes == 1:
        return None
    return SPAWN.BoundedSemaphore(settings.scp.max_associations)


def _listen(values: dict[str, Any], slots: Semaphore, number: int, parent: int) -> None:
    """A listener process: serves until SIGTERM (the node stops it) or its main process is gone.

    Stopped by a signal, not a shared event: a process killed inside a shared primitive's lock
    would leave the others waiting on it for good.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    configure_logging()
    settings = Settings.model_validate(values)
    engine = make_engine(settings.effective_database_url)
    storage = Storage(settings.storage_dir, engine, settings.scp.min_free_bytes, owner=False)
    server = start_scp(settings.scp, storage, slots=slots)
    log.info("listener process %d of %d serving", number, settings.scp.processes)
    try:
        while not stop.wait(PARENT_CHECK_S) and os.getppid() == parent:
            pass
    finally:
        stop_listening(server, settings.scp.shutdown_grace_s)
        storage.close()
        engine.dispose()


class ListenerProcesses:
    """Listener processes 2..N of the node; the node's main process is listener 1."""

    def __init__(self, settings: Settings, slots: Semaphore) -> None:
        values = settings.model_dump(mode="json")
        self._processes = [
            SPAWN.Process(
                target=_listen,
                args=(values, slots, number, os.getpid()),
                name=f"segnode-listener-{number}",
                daemon=True,
            )
            for number in range(2, settings.scp.processes + 1)
        ]

    def start(self) -> None:
        for process in self._processes:
            process.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: it stops listening and closes its storage
        for process in self._processes:
            process.join(timeout_s)
            if process.is_alive():
                log.warning("%s did not stop in %g s; killed", process.name, timeout_s)
                process.kill()
                process.join()
